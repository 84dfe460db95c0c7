"""pagoda/multimodal is the front end's: importing all of it loads neither torch nor transformers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_SCRIPT = """
import importlib, pkgutil, sys
import pagoda.multimodal
names = [module.name for module in pkgutil.iter_modules(pagoda.multimodal.__path__)]
for name in names:
    importlib.import_module("pagoda.multimodal." + name)
assert "torch" not in sys.modules, "torch was imported"
assert "transformers" not in sys.modules, "transformers was imported"
print(len(names))
"""


def test_multimodal_never_imports_torch_or_transformers() -> None:
    result = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=Path(__file__).resolve().parents[2],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 6


def test_processor_cache_is_pure_python() -> None:
    # The engine side's receiver cache imports it: no numpy, PIL or torch behind it.
    script = ("import sys; import pagoda.multimodal.processor_cache; "
              "assert not {'numpy', 'PIL', 'torch'} & set(sys.modules), sorted({'numpy', 'PIL', 'torch'} & set(sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
