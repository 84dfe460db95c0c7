"""End to end: Redis dies after the engine connected — after a lookup, during a load, with saves in flight.

The engine runs in this process, so the test stops redis-server from inside
the Redis tier's own calls, at the moment each fault needs: right after the
lookup that found PROMPT (its load then finds nothing), after some entries
of a load arrived (the rest are missing), and before most of a request's
saves went out (they are refused). Each time the output is the cold run's
and the store logs exactly one warning; Redis then comes back empty, the
engine saves PROMPT into it again, and the next load is whole.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from store_helpers import NUM_STORED, PROMPT, generate_one, store_engine, store_warnings

from pagoda.kvstore.tiers.redis import RedisTier

pytestmark = pytest.mark.slow

# A load of PROMPT reads 42 entries (3 full-attention layers x 4 chunks, 15 sliding-window layers x 2 in the
# window); its save writes 72. Redis dies after this many reads, and before this write: mid-load and mid-save.
KILL_AFTER_GET = 20
KILL_BEFORE_PUT = 30
RETRY_WAIT_S = 1.2  # past the tier's retry interval (1 s): the next call tries Redis again


class RedisKiller:
    """Wraps one RedisTier method so that its `nth` call stops redis-server, before it runs or after it returned."""

    def __init__(self, server, method: str, nth: int, before: bool) -> None:
        self.server, self.nth, self.before = server, nth, before
        self.original = getattr(RedisTier, method)
        self.calls = 0
        self.result_when_killed: object = None
        self._lock = threading.Lock()

    def __call__(self, tier: RedisTier, *args: object) -> object:
        with self._lock:
            self.calls += 1
            fire = self.calls == self.nth
        if fire and self.before:
            self.server.stop()
        result = self.original(tier, *args)
        if fire and not self.before:
            self.result_when_killed = result
            self.server.stop()
        return result


@contextmanager
def redis_dies_in(monkeypatch: pytest.MonkeyPatch, server, method: str, nth: int = 1,
                  before: bool = False) -> Iterator[RedisKiller]:
    killer = RedisKiller(server, method, nth, before)
    with monkeypatch.context() as patch:
        # A plain function, so that it binds to the tier like the method it replaces.
        patch.setattr(RedisTier, method, lambda tier, *args: killer(tier, *args))
        yield killer
    assert killer.calls >= nth, f"RedisTier.{method} was called {killer.calls} times, never reaching call {nth}"
    assert not server.running


def come_back(server) -> None:
    server.start()
    time.sleep(RETRY_WAIT_S)


def run_prompt(llm, caplog: pytest.LogCaptureFixture, cold) -> object:
    """PROMPT computed or loaded with an empty prefix cache, its saves flushed; the output must be the cold run's."""
    caplog.clear()
    assert llm.reset_prefix_cache()
    out = generate_one(llm, PROMPT)
    llm.flush_kv_store()
    assert out.outputs[0].token_ids == cold["full"]
    return out


@pytest.mark.parametrize("load_mode", ["layerwise", "async"])
def test_redis_dies_after_lookup_during_load_and_with_saves_in_flight(gemma_path, redis_server, cold, caplog,
                                                                      monkeypatch, load_mode):
    llm = store_engine(gemma_path, f"{redis_server.url}+namespace=outage-{load_mode}", kv_store_load_mode=load_mode)
    caplog.set_level(logging.WARNING)
    try:
        run_prompt(llm, caplog, cold)  # connects, saves PROMPT

        def failed_loads() -> float:
            return llm.get_metrics()["kv_store.connector.failed_loads"]

        before = failed_loads()
        with redis_dies_in(monkeypatch, redis_server, "contains_many") as killer:
            out = run_prompt(llm, caplog, cold)
        assert killer.result_when_killed == [True] * 4  # the lookup promised PROMPT; its load found Redis gone
        assert out.metrics.kv_store_tokens == {}
        assert failed_loads() == before + 1
        assert len(store_warnings(caplog.records)) == 1, store_warnings(caplog.records)

        come_back(redis_server)  # empty: this run computes PROMPT and saves it, until Redis dies mid-save
        refused_before = llm.get_metrics()["kv_store.redis.failed_puts"]
        with redis_dies_in(monkeypatch, redis_server, "put", KILL_BEFORE_PUT, before=True):
            run_prompt(llm, caplog, cold)
        assert llm.get_metrics()["kv_store.redis.failed_puts"] >= refused_before + 72 - KILL_BEFORE_PUT
        assert len(store_warnings(caplog.records)) == 1, store_warnings(caplog.records)

        come_back(redis_server)
        run_prompt(llm, caplog, cold)  # saves PROMPT again
        before = failed_loads()
        with redis_dies_in(monkeypatch, redis_server, "get", KILL_AFTER_GET):
            out = run_prompt(llm, caplog, cold)
        assert out.metrics.kv_store_tokens == {}
        assert failed_loads() == before + 1
        assert len(store_warnings(caplog.records)) == 1, store_warnings(caplog.records)

        come_back(redis_server)
        run_prompt(llm, caplog, cold)
        hit = run_prompt(llm, caplog, cold)
        assert hit.metrics.kv_store_tokens == {"redis": NUM_STORED}
        assert store_warnings(caplog.records) == []
    finally:
        llm.shutdown()
