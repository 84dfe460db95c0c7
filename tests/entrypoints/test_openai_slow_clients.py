"""Slow clients: request bodies that trickle in never tie up the engine or the other clients, and a body not
all received within --request-body-timeout gets a 408 (OpenAI's error body) and its connection back."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from openai_server_helpers import start_server

pytestmark = pytest.mark.slow

BODY_TIMEOUT_S = 2.0
NUM_SLOW = 40


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_server(tmp_path_factory, "--request-body-timeout", str(BODY_TIMEOUT_S))
    yield server
    server.stop()


def _start_trickle(port: int) -> socket.socket:
    """A request whose headers promise 200 bytes of body, of which only a few ever come."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 200\r\n\r\n{\"prompt\": \"Hel")
    return connection


def _response_head(connection: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = connection.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_trickling_bodies_neither_stall_others_nor_stay_forever(server):
    slow = [_start_trickle(server.port) for _ in range(NUM_SLOW)]
    try:
        started = time.monotonic()
        answer = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4,
                                                                  "temperature": 0}, timeout=30)
        assert answer.status_code == 200 and time.monotonic() - started < BODY_TIMEOUT_S
        for connection in slow:
            connection.sendall(b"l")  # a byte now and then does not extend the deadline
        for connection in slow:
            status, body = _response_head(connection)
            assert status == 408 and "did not arrive within 2 s" in body["error"]["message"]
        assert time.monotonic() - started < BODY_TIMEOUT_S + 10
    finally:
        for connection in slow:
            connection.close()
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
