"""End to end: the engine with a tiered KV store gives the cold run's greedy tokens from every tier.

Prompts, engines and the `cold` fixture: store_helpers.py and conftest.py.
Faults have their own modules: test_kv_store_corruption (damaged entries),
test_kv_store_redis_outage (Redis dies), test_kv_store_full_disk (a full
filesystem), test_kv_store_shared_redis (engines at the same time).
"""

from __future__ import annotations

import pytest
from store_helpers import NUM_STORED, PARTIAL_PROMPT, PROMPT, generate_one, store_engine

pytestmark = pytest.mark.slow


def test_cpu_tier_full_and_partial_hits_then_disk_after_restart(gemma_path, tmp_path, cold):
    disk = tmp_path / "kv"
    llm = store_engine(gemma_path, f"cpu:512MiB,disk:{disk}:1GiB")
    first = generate_one(llm, PROMPT)
    assert first.outputs[0].token_ids == cold["full"]
    assert first.metrics.kv_store_tokens == {}
    llm.flush_kv_store()
    assert llm.reset_prefix_cache()  # the engine forgets: only the store can help now

    hit = generate_one(llm, PROMPT)
    assert hit.outputs[0].token_ids == cold["full"]
    assert hit.metrics.kv_store_tokens == {"cpu": NUM_STORED}
    assert hit.num_cached_tokens == NUM_STORED
    assert llm.get_metrics()["kv_store.cpu.hit_tokens"] >= NUM_STORED

    assert llm.reset_prefix_cache()
    partial = generate_one(llm, PARTIAL_PROMPT)
    assert partial.outputs[0].token_ids == cold["partial"]
    assert partial.metrics.kv_store_tokens == {"cpu": 512}
    llm.shutdown()

    # A new engine on the same disk directory finds what the first one saved.
    restarted = store_engine(gemma_path, f"cpu:512MiB,disk:{disk}:1GiB", kv_store_load_mode="async")
    again = generate_one(restarted, PROMPT)
    assert again.outputs[0].token_ids == cold["full"]
    assert again.metrics.kv_store_tokens == {"disk": NUM_STORED}
    metrics = restarted.get_metrics()
    assert metrics["kv_store.disk.hit_tokens"] == NUM_STORED
    assert metrics["prefix_cache_hits"] == 0
    restarted.shutdown()


def test_unwritable_disk_and_a_tier_budget_too_small_never_fail_requests(gemma_path, tmp_path, cold):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for spec in (f"disk:{blocker}/kv:1GiB", f"disk:{tmp_path / 'small'}:1MiB"):
        llm = store_engine(gemma_path, spec)
        for _ in range(2):
            out = generate_one(llm, PROMPT)
            assert out.outputs[0].token_ids == cold["full"]
            llm.flush_kv_store()
            llm.reset_prefix_cache()
        llm.shutdown()
