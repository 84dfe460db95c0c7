"""kvstore/ is pure Python: importing any of it (the scheduler side does) must not load torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

_SCRIPT = """
import sys
import pagoda.kvstore.keys, pagoda.kvstore.policies, pagoda.kvstore.token_database
import pagoda.kvstore.entry, pagoda.kvstore.storage_manager
import pagoda.kvstore.tiers.cpu, pagoda.kvstore.tiers.disk, pagoda.kvstore.tiers.redis
import pagoda.kvstore.build, pagoda.kvstore.lookup
assert "torch" not in sys.modules, "torch was imported"
print("ok")
"""


def test_kvstore_never_imports_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
