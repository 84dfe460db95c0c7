"""`pagoda serve --kv-store`: a prompt's KV comes back from the store, reported in usage and on /metrics."""

from __future__ import annotations

import httpx
import pytest
from openai_server_helpers import start_server

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
PROMPT = [1] + [1000 + (i * 7919) % 40000 for i in range(599)]  # 600 tokens: two full 256-token chunks


@pytest.fixture(scope="module")
def store_server(tmp_path_factory):
    server = start_server(tmp_path_factory, "--kv-store", "cpu:256MiB")
    yield server
    server.stop()


def complete(http: httpx.Client) -> dict:
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4,
                                                 "temperature": 0.0, "ignore_eos": True})
    assert response.status_code == 200, response.text
    return response.json()


def test_store_hit_reported_in_usage_and_metrics(store_server):
    with httpx.Client(base_url=store_server.url, timeout=120) as http:
        cold = complete(http)
        assert cold["usage"]["prompt_tokens_details"] == {"cached_tokens": 0, "kv_store_tokens": {}}
        # Saves reach the store in the background: the first retry nearly always finds them.
        for _ in range(5):
            assert http.post("/reset_prefix_cache").status_code == 200
            warm = complete(http)
            if warm["usage"]["prompt_tokens_details"]["kv_store_tokens"]:
                break
        assert warm["usage"]["prompt_tokens_details"] == {"cached_tokens": 512, "kv_store_tokens": {"cpu": 512}}
        assert warm["choices"][0]["text"] == cold["choices"][0]["text"]
        metrics = http.get("/metrics").text
        assert f'pagoda:kv_store_hit_tokens_total{{model_name="{MODEL}",tier="cpu"}} 512.0' in metrics
        assert 'pagoda:kv_store_corrupt_dropped_total{' in metrics
