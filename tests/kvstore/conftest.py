"""KV store test fixtures: a private redis-server per test (tests kill and restart it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis_server import RedisServer, redis_server_available


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    if not redis_server_available():
        pytest.skip("redis-server is not installed (`make install` installs it)")
    with RedisServer() as server:
        yield server
