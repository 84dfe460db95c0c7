"""The engine process dying under a real `pagoda serve`: clear 5xx errors within seconds, `/health` 503, no hang."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from openai_server_helpers import start_server

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
# Errors must come back this fast once the engine is gone (generous for a loaded 2-core machine).
ERROR_DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def doomed_server(tmp_path_factory):
    """A server of its own: this test kills its engine."""
    server = start_server(tmp_path_factory)
    yield server
    server.stop()


async def _in_flight_then_kill(server) -> tuple[httpx.Response, list[str], float]:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        plain = asyncio.ensure_future(client.post("/v1/completions", json=body))

        async def stream() -> list[str]:
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
                return [line async for line in response.aiter_lines() if line]

        streamed = asyncio.ensure_future(stream())
        await asyncio.sleep(2.0)  # both requests are decoding by now
        killed_at = time.monotonic()
        server.engine_process().kill()
        plain_response, lines = await asyncio.gather(plain, streamed)
        return plain_response, lines, time.monotonic() - killed_at


def test_engine_death_fails_requests_fast_and_health_turns_503(doomed_server):
    plain, lines, elapsed = asyncio.run(_in_flight_then_kill(doomed_server))
    assert elapsed < ERROR_DEADLINE_S
    assert plain.status_code == 503
    assert "engine process died" in plain.json()["error"]["message"]
    # The stream had already answered 200: it ends with an error event, then [DONE].
    assert '"code": "engine_dead"' in lines[-2] and lines[-1] == "data: [DONE]"

    started = time.monotonic()
    new = httpx.post(f"{doomed_server.url}/v1/completions", json={"model": MODEL, "prompt": "Hi"}, timeout=30)
    assert new.status_code == 503 and new.json()["error"]["code"] == "engine_dead"
    health = httpx.get(f"{doomed_server.url}/health", timeout=30)
    assert health.status_code == 503
    assert time.monotonic() - started < ERROR_DEADLINE_S


@pytest.fixture(scope="module")
def server_with_worker_process(tmp_path_factory):
    """A server whose engine runs its rank in a worker process (`--distributed-executor-backend mp`)."""
    server = start_server(tmp_path_factory, "--distributed-executor-backend", "mp")
    yield server
    server.stop()


def test_a_dead_worker_process_fails_requests_fast_and_health_turns_503(server_with_worker_process):
    import psutil

    server = server_with_worker_process
    (engine,) = [p for p in psutil.Process(server.process.pid).children() if "spawn_main" in " ".join(p.cmdline())]
    (worker,) = [p for p in engine.children() if "spawn_main" in " ".join(p.cmdline())]
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True}

    async def in_flight_then_kill() -> tuple[httpx.Response, float]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            pending = asyncio.ensure_future(client.post("/v1/completions", json=body))
            await asyncio.sleep(2.0)
            killed_at = time.monotonic()
            worker.kill()
            return await pending, time.monotonic() - killed_at

    response, elapsed = asyncio.run(in_flight_then_kill())
    assert elapsed < ERROR_DEADLINE_S and response.status_code == 503
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 503
    engine.wait(ERROR_DEADLINE_S)  # the engine process ended with its worker
