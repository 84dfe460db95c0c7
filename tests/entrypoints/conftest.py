"""Entrypoints fixtures: one real `pagoda serve` (behind an API key) shared by the OpenAI API tests, and clients."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai_server_helpers import API_KEY, RemoteServer, start_server


@pytest.fixture(scope="session")
def openai_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    """One server for the API tests, behind an API key."""
    server = start_server(tmp_path_factory, "--api-key", API_KEY)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(openai_server: RemoteServer):
    import openai

    return openai.OpenAI(base_url=f"{openai_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def http(openai_server: RemoteServer):
    """Raw HTTP to the server, with the API key (tests of bad input need what the SDK would refuse to send)."""
    import httpx

    with httpx.Client(base_url=openai_server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=120) as http_client:
        yield http_client
