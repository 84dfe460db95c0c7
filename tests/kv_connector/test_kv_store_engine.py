"""End to end: the engine with a tiered KV store gives the cold run's greedy tokens from every tier.

Gemma 3 270M in float32 (its sliding-window layers load only their window),
a 1,100-token prompt = four full 256-token chunks + a recomputed tail.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from pagoda import LLM, SamplingParams

pytestmark = pytest.mark.slow

KV_BYTES = 256 << 20
PROMPT_LEN = 1100
NUM_STORED = 1024  # four full chunks; the last 76 tokens are always recomputed
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def make_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [2] + [rng.randrange(1000, 200000) for _ in range(length - 1)]


PROMPT = make_prompt(PROMPT_LEN, 0)
# Shares the first 600 tokens (two full chunks) with PROMPT.
PARTIAL_PROMPT = PROMPT[:600] + make_prompt(500, 1)[1:]


def store_engine(model_path: Path, kv_store: str, **kwargs) -> LLM:
    return LLM(str(model_path), dtype="float32", kv_cache_memory=KV_BYTES, max_model_len=2048, kv_store=kv_store,
               **kwargs)


@pytest.fixture(scope="module")
def cold(gemma_path: Path) -> dict[str, list[int]]:
    """Greedy tokens of each prompt from an engine without a store."""
    llm = LLM(str(gemma_path), dtype="float32", kv_cache_memory=KV_BYTES, max_model_len=2048)
    outputs = llm.generate([PROMPT, PARTIAL_PROMPT], PARAMS, use_tqdm=False)
    llm.shutdown()
    return {"full": outputs[0].outputs[0].token_ids, "partial": outputs[1].outputs[0].token_ids}


def generate_one(llm: LLM, prompt: list[int]):
    return llm.generate([prompt], PARAMS, use_tqdm=False)[0]


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


def test_corrupted_disk_entries_are_dropped_and_recomputed(gemma_path, tmp_path, cold):
    disk = tmp_path / "kv"
    llm = store_engine(gemma_path, f"disk:{disk}:1GiB", kv_store_load_mode="bulk")
    generate_one(llm, PROMPT)
    llm.flush_kv_store()
    llm.shutdown()

    files = sorted(p for p in disk.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert len(files) >= 4 * 18  # one entry per chunk and layer
    flipped, truncated, swapped_from, swapped_to = files[0], files[1], files[2], files[3]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:1000])
    swapped_to.write_bytes(swapped_from.read_bytes())  # a whole, valid entry of another key

    llm = store_engine(gemma_path, f"disk:{disk}:1GiB", kv_store_load_mode="bulk")
    assert llm.reset_prefix_cache()
    out = generate_one(llm, PROMPT)
    assert out.outputs[0].token_ids == cold["full"]
    assert sum(out.metrics.kv_store_tokens.values()) < NUM_STORED
    assert llm.get_metrics()["kv_store.disk.corrupt_dropped"] >= 1
    llm.shutdown()


def test_unwritable_and_full_disk_tiers_never_fail_requests(gemma_path, tmp_path, cold):
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


def test_two_engine_processes_share_redis(gemma_path, redis_server, cold):
    spec = f"{redis_server.url}+namespace=share-test"
    first = store_engine(gemma_path, spec, engine_mode="mp")
    assert generate_one(first, PROMPT).outputs[0].token_ids == cold["full"]
    assert first.flush_kv_store()
    first.shutdown()

    second = store_engine(gemma_path, spec, engine_mode="mp")
    out = generate_one(second, PROMPT)
    assert out.outputs[0].token_ids == cold["full"]
    assert out.metrics.kv_store_tokens == {"redis": NUM_STORED}
    assert out.num_cached_tokens == NUM_STORED
    metrics = second.get_metrics()
    assert metrics["kv_store.redis.hit_tokens"] == NUM_STORED
    # Only the uncached tail was computed: the engine's own prefix cache never hit.
    assert metrics["prefix_cache_hits"] == 0
    second.shutdown()


def test_redis_killed_mid_run_then_back(gemma_path, redis_server, cold, caplog):
    spec = f"{redis_server.url}+namespace=fault-test"
    llm = store_engine(gemma_path, spec)
    redis_server.stop()
    with caplog.at_level(logging.WARNING):
        for prompt, expected in ((PROMPT, cold["full"]), (PARTIAL_PROMPT, cold["partial"])):
            assert generate_one(llm, prompt).outputs[0].token_ids == expected
            llm.flush_kv_store()
            llm.reset_prefix_cache()
    redis_warnings = [r for r in caplog.records if r.name.startswith("pagoda.kvstore") and r.levelno == logging.WARNING]
    assert len(redis_warnings) == 1, [r.getMessage() for r in redis_warnings]

    redis_server.restart()
    import time

    time.sleep(1.5)  # past the tier's retry interval
    generate_one(llm, PROMPT)  # saved again now that Redis is back
    llm.flush_kv_store()
    assert llm.reset_prefix_cache()
    out = generate_one(llm, PROMPT)
    assert out.outputs[0].token_ids == cold["full"]
    assert out.metrics.kv_store_tokens == {"redis": NUM_STORED}
    llm.shutdown()
