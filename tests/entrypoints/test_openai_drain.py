"""SIGTERM drains the server: new requests get 503 at once, running ones finish (or end with finish_reason
"abort" at the deadline), and the process exits with status 0, leaving no engine process behind."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import psutil
import pytest
from openai_server_helpers import start_server

pytestmark = pytest.mark.slow

SHUTDOWN_TIMEOUT_S = 10.0


class Stream(threading.Thread):
    """One streamed completion read to its end in a thread: its chunks, and an event set at the first."""

    def __init__(self, url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.chunks: list[dict] = []
        self.done_marker = False
        self.started_streaming = threading.Event()
        self.status_code: int | None = None

    def run(self) -> None:
        body = {"prompt": "Once upon a time", "max_tokens": self.max_tokens, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=120) as response:
            self.status_code = response.status_code
            for line in response.iter_lines():
                if line == "data: [DONE]":
                    self.done_marker = True
                elif line.startswith("data: "):
                    self.chunks.append(json.loads(line[len("data: "):]))
                    self.started_streaming.set()

    @property
    def finish_reason(self) -> str | None:
        return self.chunks[-1]["choices"][0]["finish_reason"] if self.chunks else None


def test_sigterm_drains_running_requests_refuses_new_ones_and_exits_0(tmp_path_factory):
    server = start_server(tmp_path_factory, "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S))
    try:
        engine = server.engine_process()
        endless, short = Stream(server.url, max_tokens=2000), Stream(server.url, max_tokens=16)
        endless.start()
        # SERVER_ARGS cap the context at 2048 tokens: a longer max_tokens would be refused with a 400.
        assert endless.started_streaming.wait(60), endless.status_code
        short.start()
        assert short.started_streaming.wait(60)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)

        refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 503
        assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 200

        short.join(60)
        assert short.finish_reason == "length" and short.done_marker
        assert sum(len(c["choices"][0]["text"]) > 0 for c in short.chunks) > 1
        endless.join(60)
        assert endless.finish_reason == "abort" and endless.done_marker
        assert server.process.wait(timeout=60) == 0
        assert time.monotonic() - signalled < SHUTDOWN_TIMEOUT_S + 20
        assert not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE
    finally:
        server.stop()
