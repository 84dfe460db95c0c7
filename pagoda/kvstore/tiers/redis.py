"""KV store layer: the Redis tier, a remote store shared by every engine that names the same server and namespace.

Entries are stored as plain Redis strings under
`"{namespace}:{key.to_string()}"`, readable in `redis-cli`; engines with the
same namespace share KV and engines with different ones never see each
other's. A key collision can never serve wrong KV: every entry's header
holds its full key, checked on read. Redis bounds its own memory (`maxmemory` and its
eviction policy); this tier neither tracks sizes nor evicts.

The server may go away at any time. The first connection error or timeout
marks the tier down and logs one warning; while down, every call is a miss
(or a refused put) without touching the network, except one attempt per
`retry_interval_s`. The first attempt that succeeds logs that the tier is
back and the tier works again. redis-py's own retries are off: a down server
must cost a caller one short timeout at most, never a backoff loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from pagoda.kv_store_spec import REDIS_SCHEMES, redact_url
from pagoda.kvstore.keys import CacheEngineKey
from pagoda.kvstore.tiers.base import StorageTier

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that mean "the server cannot be reached now", as opposed to a command the server refused.
_OUTAGE_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class RedisTier(StorageTier):
    name = "redis"
    is_local = False
    supports_async_put = False

    def __init__(
        self,
        url: str,
        namespace: str = "pagoda-kv",
        *,
        name: str = "redis",
        retry_interval_s: float = 1.0,
        connect_timeout_s: float = 1.0,
        timeout_s: float = 2.0,
    ) -> None:
        super().__init__()
        if not url.startswith(REDIS_SCHEMES):
            raise ValueError(f"Redis URL must start with redis:// or rediss://, got {redact_url(url)!r}")
        if not namespace:
            raise ValueError("Redis namespace must not be empty")
        if retry_interval_s <= 0 or connect_timeout_s <= 0 or timeout_s <= 0:
            raise ValueError(
                f"retry_interval_s, connect_timeout_s and timeout_s must be positive, got "
                f"{retry_interval_s}, {connect_timeout_s}, {timeout_s}"
            )
        self.name = name
        self.url = url
        self.namespace = namespace
        self.retry_interval_s = retry_interval_s
        self._client = redis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._state_lock = threading.Lock()
        self._down_since: float | None = None  # monotonic time of the failure that started the outage
        self._last_attempt = 0.0  # monotonic time of the last call allowed through while down

    @property
    def is_down(self) -> bool:
        return self._down_since is not None

    def redis_key(self, key: CacheEngineKey) -> bytes:
        """The Redis key of an entry."""
        return f"{self.namespace}:{key.to_string()}".encode()

    def contains(self, key: CacheEngineKey) -> bool:
        return self._call(lambda client: client.exists(self.redis_key(key)) == 1, False)

    def contains_many(self, keys: Sequence[CacheEngineKey]) -> list[bool]:
        """One pipelined round trip of EXISTS, one per key (a multi-key EXISTS only returns a count)."""
        if not keys:
            return []

        def ask(client: redis.Redis) -> list[bool]:
            pipeline = client.pipeline(transaction=False)
            for key in keys:
                pipeline.exists(self.redis_key(key))
            return [count == 1 for count in pipeline.execute()]

        return self._call(ask, [False] * len(keys))

    def get(self, key: CacheEngineKey) -> bytes | None:
        return self._call(lambda client: client.get(self.redis_key(key)), None)

    def put(self, key: CacheEngineKey, entry: bytes) -> bool:
        # A plain SET, not SET NX: overwriting an equal entry costs a transfer but also heals a damaged one.
        accepted = self._call(lambda client: bool(client.set(self.redis_key(key), entry)), False)
        if not accepted:
            self.metrics.failed_puts += 1
        return accepted

    def remove(self, key: CacheEngineKey) -> bool:
        return self._call(lambda client: client.delete(self.redis_key(key)) > 0, False)

    def close(self) -> None:
        self._client.close()

    def _call(self, command: Callable[[redis.Redis], T], when_down: T) -> T:
        """Run one command unless the tier is down and its retry is not due; an outage returns `when_down`."""
        with self._state_lock:
            if self._down_since is not None:
                now = time.monotonic()
                if now - self._last_attempt < self.retry_interval_s:
                    return when_down
                self._last_attempt = now  # other threads keep missing while this one retries
        try:
            result = command(self._client)
        except _OUTAGE_ERRORS as exc:
            self._mark_down(exc)
            return when_down
        if self._down_since is not None:
            self._mark_up()
        return result

    def _mark_down(self, exc: BaseException) -> None:
        with self._state_lock:
            now = time.monotonic()
            self._last_attempt = now
            if self._down_since is not None:
                return
            self._down_since = now
        logger.warning(
            "KV store: Redis tier %s at %s is unreachable (%s); it counts as empty until it answers again "
            "(retrying every %.1f s)",
            self.name,
            redact_url(self.url),
            exc,
            self.retry_interval_s,
        )

    def _mark_up(self) -> None:
        with self._state_lock:
            if self._down_since is None:
                return
            outage = time.monotonic() - self._down_since
            self._down_since = None
        logger.info("KV store: Redis tier %s at %s reconnected after %.1f s", self.name, redact_url(self.url), outage)
