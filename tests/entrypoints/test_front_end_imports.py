"""The HTTP front end never imports torch: the engine process owns the model (and start-up stays short)."""

from __future__ import annotations

import subprocess
import sys


def test_api_server_and_async_llm_import_without_torch():
    code = ("import sys, pagoda.entrypoints.openai.api_server, pagoda.engine.async_llm, pagoda.models.resolve; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
