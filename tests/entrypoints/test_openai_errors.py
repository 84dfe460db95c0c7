"""Bad input and misbehaving clients against a real `pagoda serve`: OpenAI error bodies, and the server carries on.

Raw HTTP (httpx) here, since the SDK refuses to send some of these requests.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"  # what the `openai_server` fixture serves


def assert_error(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    return error


@pytest.mark.parametrize(("extra", "param"), [
    ({"temperature": -1}, "temperature"),
    ({"n": 0}, "n"),
    ({"n": 200}, "n"),
    ({"top_p": 2}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 5000}, "max_tokens"),
    ({"logprobs": 50}, "logprobs"),
    ({"logit_bias": {"49152": 5}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"prompt": [1, 2, 10**9]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "word " * 3000}, "prompt"),
])
def test_bad_completion_parameters_are_400_naming_the_field(http, extra, param):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, **extra}
    error = assert_error(http.post("/v1/completions", json=body), 400, param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("extra", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
    ({"max_completion_tokens": -3}, "max_completion_tokens"),
])
def test_bad_chat_parameters_are_400_naming_the_field(http, extra, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **extra}
    assert_error(http.post("/v1/chat/completions", json=body), 400, param)


def test_unknown_model_is_404(http):
    error = assert_error(http.post("/v1/completions", json={"model": "gpt-9", "prompt": "Hi"}), 404, "model")
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/tokenize"),
    ("POST", "/detokenize"), ("GET", "/metrics"), ("POST", "/reset_prefix_cache"), ("GET", "/openapi.json"),
    ("GET", "/docs"), ("GET", "/no-such-route"),
])
def test_missing_or_wrong_api_key_is_401_on_every_route_but_health(openai_server, method, path):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key"},
                    {"Authorization": "Bearer test-key-and-more"}, {"Authorization": "Basic test-key"}):
        response = httpx.request(method, f"{openai_server.url}{path}", json=body, headers=headers)
        assert_error(response, 401, None)
    assert httpx.get(f"{openai_server.url}/health").status_code == 200


def test_huge_body_is_413(http):
    response = http.post("/v1/completions", content=b'{"prompt": "' + b"a" * (17 << 20) + b'"}',
                         headers={"Content-Type": "application/json"})
    assert_error(response, 413, None)


def test_server_keeps_serving_after_bad_requests(http):
    http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "temperature": -5})
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2


async def _disconnect_mid_stream(client: httpx.AsyncClient, index: int) -> None:
    body = {"model": MODEL, "prompt": f"Story number {index}:", "max_tokens": 1000, "ignore_eos": True,
            "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break  # leaving the block closes the connection mid-stream


def _kv_gauges(http: httpx.Client) -> dict[str, float]:
    gauges = {}
    for line in http.get("/metrics").text.splitlines():
        for name in ("kv_cache_usage_perc", "num_requests_running", "num_requests_waiting"):
            if line.startswith(f"pagoda:{name}{{"):
                gauges[name] = float(line.rsplit(" ", 1)[1])
    return gauges


def test_clients_disconnecting_mid_stream_free_their_blocks(openai_server, http):
    async def run() -> None:
        async with httpx.AsyncClient(base_url=openai_server.url, headers=http.headers, timeout=120) as client:
            await asyncio.gather(*(_disconnect_mid_stream(client, i) for i in range(50)))

    asyncio.run(run())
    # Aborts travel to the engine asynchronously; the gauges are read from the engine at each scrape.
    for _ in range(50):
        gauges = _kv_gauges(http)
        if gauges == {"kv_cache_usage_perc": 0.0, "num_requests_running": 0.0, "num_requests_waiting": 0.0}:
            break
        time.sleep(0.2)
    assert gauges == {"kv_cache_usage_perc": 0.0, "num_requests_running": 0.0, "num_requests_waiting": 0.0}
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert response.status_code == 200
