"""`pagoda generate` and `pagoda convert` as a user runs them (what `make run` calls)."""

from __future__ import annotations

import json
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


SMALL_ENGINE = ["--model", "smollm2-135m", "--kv-cache-memory", "64MiB", "--max-model-len", "512"]


def test_bench_throughput_prints_vllms_line_and_writes_json(smollm_path, tmp_path):
    path = tmp_path / "throughput.json"
    result = pagoda("bench", "throughput", *SMALL_ENGINE, "--input-len", "32", "--output-len", "8",
                    "--num-prompts", "4", "--output-json", str(path))
    assert result.returncode == 0, result.stderr
    assert "Throughput: " in result.stdout and "output tokens/s" in result.stdout
    results = json.loads(path.read_text())
    assert results["num_requests"] == 4 and results["total_num_tokens"] == 4 * (32 + 8)
    assert results["output_tokens_per_second"] > 0


def test_bench_latency_prints_the_average_and_percentiles(smollm_path, tmp_path):
    path = tmp_path / "latency.json"
    result = pagoda("bench", "latency", *SMALL_ENGINE, "--input-len", "16", "--output-len", "4", "--batch-size",
                    "2", "--num-iters-warmup", "1", "--num-iters", "3", "--output-json", str(path))
    assert result.returncode == 0, result.stderr
    assert "Avg latency: " in result.stdout and "99% percentile latency: " in result.stdout
    results = json.loads(path.read_text())
    assert len(results["latencies"]) == 3 and results["avg_latency"] > 0
