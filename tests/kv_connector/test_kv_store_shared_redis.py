"""End to end: two engine processes on one Redis at the same time, each loading what the other saved.

Both engines run in processes of their own (`engine_mode="mp"`), driven
from two threads, and the test checks that their requests really overlapped
in time. Round one: each computes its own prompt and saves it while the
other does the same. Round two: each loads the other's prompt, both at once.
Round three: both run PARTIAL_PROMPT at once, each loading its shared
first two chunks. Every output is the cold run's, and no entry is corrupt.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from store_helpers import NUM_STORED, OTHER_PROMPT, PARTIAL_PROMPT, PROMPT, generate_one, store_engine

pytestmark = pytest.mark.slow


def run_together(engines, prompts):
    """Each engine runs its prompt, all starting at once; their outputs, and whether the runs overlapped."""
    barrier = threading.Barrier(len(engines))

    def run(engine, prompt):
        barrier.wait()
        started = time.monotonic()
        output = generate_one(engine, prompt)
        return output, started, time.monotonic()

    with ThreadPoolExecutor(len(engines)) as pool:
        results = list(pool.map(run, engines, prompts))
    overlapped = max(started for _, started, _ in results) < min(ended for _, _, ended in results)
    return [output for output, _, _ in results], overlapped


def test_two_engine_processes_share_redis_at_the_same_time(gemma_path, redis_server, cold):
    spec = f"{redis_server.url}+namespace=share-test"
    engines = [store_engine(gemma_path, spec, engine_mode="mp") for _ in range(2)]
    try:
        outputs, overlapped = run_together(engines, [PROMPT, OTHER_PROMPT])
        assert overlapped
        assert [o.outputs[0].token_ids for o in outputs] == [cold["full"], cold["other"]]
        assert all(o.metrics.kv_store_tokens == {} for o in outputs)
        assert all(engine.flush_kv_store() for engine in engines)

        assert all(engine.reset_prefix_cache() for engine in engines)
        outputs, overlapped = run_together(engines, [OTHER_PROMPT, PROMPT])
        assert overlapped
        assert [o.outputs[0].token_ids for o in outputs] == [cold["other"], cold["full"]]
        assert all(o.metrics.kv_store_tokens == {"redis": NUM_STORED} for o in outputs)

        assert all(engine.reset_prefix_cache() for engine in engines)
        outputs, overlapped = run_together(engines, [PARTIAL_PROMPT, PARTIAL_PROMPT])
        assert overlapped
        assert all(o.outputs[0].token_ids == cold["partial"] for o in outputs)
        assert all(o.metrics.kv_store_tokens == {"redis": 512} for o in outputs)
        for engine in engines:
            metrics = engine.get_metrics()
            assert metrics["kv_store.redis.corrupt_dropped"] == 0
            assert metrics["kv_store.redis.errors"] == 0
            assert metrics["prefix_cache_hits"] == 0
    finally:
        for engine in engines:
            engine.shutdown()
