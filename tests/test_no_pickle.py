"""No pickle on any socket, pipe or storage tier: bytes from another process, a disk or a shared Redis are
decoded by msgspec or checked raw, never unpickled. This reads Pagoda's own source and fails on any way in.

(Ray pickles the actor calls it makes itself; Pagoda sends its messages over its own queue, not Ray's.)
"""

from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "pagoda"
PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib",
                    "copyreg"}
# Methods that unpickle or pickle what they carry: pyzmq's *_pyobj, multiprocessing Connection.send/recv.
PICKLING_METHODS = {"recv_pyobj", "send_pyobj", "recv_serialized", "send_serialized", "loads_pickle"}
PICKLING_CONNECTION_CALLS = {"recv", "send"}


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLING_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            owner = ast.unparse(node.func.value)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if name in PICKLING_METHODS:
                found.append(f"{where}: {owner}.{name}()")
            elif name in PICKLING_CONNECTION_CALLS and ("pipe" in owner.lower() or "conn" in owner.lower()):
                found.append(f"{where}: {owner}.{name}() pickles; use {name}_bytes() with msgpack")
            elif name == "load" and owner == "torch" and keywords.get("weights_only") != "True":
                found.append(f"{where}: torch.load without weights_only=True")
            elif keywords.get("allow_pickle") not in (None, "False"):
                found.append(f"{where}: {owner}.{name}(allow_pickle=...)")
    return found


def test_the_scan_finds_each_way_in(tmp_path: Path) -> None:
    bad = tmp_path / "probe.py"
    bad.write_text("import pickle\nfrom dill import loads\nsock.recv_pyobj()\nready_pipe.recv()\n"
                   "torch.load(f)\nnp.load(f, allow_pickle=True)\ntorch.load(f, weights_only=True)\n")
    assert len(_violations(bad)) == 6


def test_no_module_unpickles() -> None:
    files = sorted(SOURCE.rglob("*.py"))
    assert len(files) > 100
    assert [v for path in files for v in _violations(path)] == []
