"""core/ is pure Python: importing every module must not load torch."""

from __future__ import annotations

import subprocess
import sys

from core_helpers import REPO_ROOT

_SCRIPT = """
import importlib, pkgutil, sys
import pagoda.core
for module in pkgutil.iter_modules(pagoda.core.__path__):
    importlib.import_module("pagoda.core." + module.name)
assert "torch" not in sys.modules, "torch was imported"
print(len(list(pkgutil.iter_modules(pagoda.core.__path__))))
"""


def test_core_never_imports_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 10  # every core module was really imported
