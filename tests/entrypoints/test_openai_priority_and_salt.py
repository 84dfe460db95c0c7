"""`cache_salt` and `priority` over HTTP: salted prefixes are shared only between equal salts, and a server
started with --scheduling-policy priority runs the lowest value first (others refuse a priority with a 400)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from openai_server_helpers import RemoteServer, start_server

pytestmark = pytest.mark.slow

# ~300 tokens: several full blocks of shared prefix.
LONG_PROMPT = " ".join(f"word{i}" for i in range(150))


def _cached(http: httpx.Client, **extra: object) -> int:
    response = http.post("/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 1, **extra})
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_a_salted_prefix_is_shared_only_with_the_same_salt(http: httpx.Client):
    http.post("/reset_prefix_cache")
    assert _cached(http, cache_salt="tenant-a") == 0
    assert _cached(http, cache_salt="tenant-a") > 0
    assert _cached(http, cache_salt="tenant-b") == 0
    assert _cached(http) == 0  # unsalted requests see no salted blocks either
    assert _cached(http, cache_salt="tenant-b") > 0


def test_an_empty_salt_is_a_400(http: httpx.Client):
    response = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "cache_salt": ""})
    assert response.status_code == 400 and response.json()["error"]["param"] == "cache_salt"


def test_priority_on_a_first_come_first_served_server_is_a_400_saying_how(http: httpx.Client):
    response = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "priority": 3})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "priority"
    assert "--scheduling-policy priority" in error["message"]


@pytest.fixture(scope="module")
def priority_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    server = start_server(tmp_path_factory, "--scheduling-policy", "priority", "--max-num-seqs", "1")
    yield server
    server.stop()


def test_the_lowest_priority_value_runs_first(priority_server: RemoteServer):
    finished: list[str] = []

    def complete(name: str, priority: int, max_tokens: int) -> None:
        body = {"prompt": f"{name}:", "max_tokens": max_tokens, "ignore_eos": True, "priority": priority}
        response = httpx.post(f"{priority_server.url}/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        finished.append(name)

    busy = threading.Thread(target=complete, args=("busy", 0, 300))
    busy.start()
    time.sleep(1.0)  # the one sequence slot is taken; the next two wait
    late = [threading.Thread(target=complete, args=(name, priority, 4)) for name, priority in
            (("later", 10), ("sooner", -5))]
    for thread in late:
        thread.start()
        time.sleep(0.2)
    for thread in [busy, *late]:
        thread.join(120)
    assert finished == ["busy", "sooner", "later"]
