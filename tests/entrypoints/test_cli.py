"""`pagoda generate` and `pagoda convert` as a user runs them (what `make run` calls)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def pagoda(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pagoda.entrypoints.cli", *args],
                          capture_output=True, text=True, timeout=300)


def test_generate_prints_text_and_speed(smollm_path):
    result = pagoda("generate", "smollm2-135m", "--prompt", "The capital of France is", "--max-tokens", "6",
                    "--kv-cache-memory", str(64 << 20), "--max-model-len", "512")
    assert result.returncode == 0, result.stderr
    assert "--- 'The capital of France is'" in result.stdout
    assert "output tok/s" in result.stdout


def test_convert_prints_the_cached_folder(smollm_path):
    result = pagoda("convert", "smollm2-135m")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(smollm_path)


def test_unknown_model_is_a_clear_error_not_a_traceback():
    result = pagoda("generate", "no-such-model")
    assert result.returncode == 2
    assert "pagoda: error:" in result.stderr and "no-such-model" in result.stderr
    assert "Traceback" not in result.stderr
