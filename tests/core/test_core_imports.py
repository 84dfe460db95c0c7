"""core/ owns the connector contract and implements none of it: it imports no layer above, no store, no torch."""

from __future__ import annotations

import ast
import subprocess
import sys

from core_helpers import REPO_ROOT

FORBIDDEN = ("pagoda.kv_connector", "pagoda.ec_connector", "pagoda.kvstore", "pagoda.worker", "pagoda.engine",
             "pagoda.models", "pagoda.entrypoints", "torch")

_SCRIPT = f"""
import importlib, pkgutil, sys
import pagoda.core
names = [module.name for module in pkgutil.walk_packages(pagoda.core.__path__, "pagoda.core.")]
for name in names:
    importlib.import_module(name)
loaded = sorted(name for name in sys.modules if name.startswith({FORBIDDEN!r}))
assert not loaded, loaded
print(len(names))
"""


def _imported_modules(tree: ast.AST) -> list[str]:
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.append(node.module)
    return names


def test_no_core_module_names_a_forbidden_package() -> None:
    # Static, so an import inside a function or under TYPE_CHECKING counts too.
    offenders = []
    for path in sorted((REPO_ROOT / "pagoda" / "core").rglob("*.py")):
        for name in _imported_modules(ast.parse(path.read_text(), str(path))):
            if any(name == forbidden or name.startswith(forbidden + ".") for forbidden in FORBIDDEN):
                offenders.append(f"{path.relative_to(REPO_ROOT)}: {name}")
    assert offenders == []


def test_importing_all_of_core_loads_no_forbidden_package() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 15  # every core module, the connector contract's included
