"""End to end: `cache_salt` keeps tenants apart in the KV store too. KV saved to Redis under one salt is
loaded only by requests with that salt, never by another salt's or an unsalted one, and each output is the
cold run's; the salt also separates the entries' keys in Redis itself."""

from __future__ import annotations

import pytest
import redis
from store_helpers import NUM_STORED, PARAMS, PROMPT, store_engine

pytestmark = pytest.mark.slow

NAMESPACE = "salt-test"


def _run(llm, salt: str | None):
    prompt = {"prompt_token_ids": PROMPT} if salt is None else {"prompt_token_ids": PROMPT, "cache_salt": salt}
    assert llm.reset_prefix_cache()  # Redis is the only place a hit can come from
    return llm.generate([prompt], PARAMS, use_tqdm=False)[0]


def test_stored_kv_is_shared_only_between_equal_salts(gemma_path, redis_server, cold):
    llm = store_engine(gemma_path, f"{redis_server.url}+namespace={NAMESPACE}")
    client = redis.Redis.from_url(redis_server.url)
    try:
        first = _run(llm, "tenant-a")
        assert first.outputs[0].token_ids == cold["full"] and first.metrics.kv_store_tokens == {}
        assert llm.flush_kv_store()
        salted_keys = set(client.keys(f"{NAMESPACE}:*"))
        assert salted_keys

        for salt in (None, "tenant-b"):
            other = _run(llm, salt)
            assert other.outputs[0].token_ids == cold["full"], salt
            assert other.metrics.kv_store_tokens == {}, salt
        assert llm.flush_kv_store()
        # The unsalted and tenant-b runs saved entries of their own, under other keys.
        assert len(set(client.keys(f"{NAMESPACE}:*"))) == 3 * len(salted_keys)

        again = _run(llm, "tenant-a")
        assert again.outputs[0].token_ids == cold["full"]
        assert again.metrics.kv_store_tokens == {"redis": NUM_STORED}
    finally:
        client.close()
        llm.shutdown()

