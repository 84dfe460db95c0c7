"""The KV store under tensor parallelism, through the multiprocess executor (gloo on CPU, float32).

SmolLM2 at TP=3 splits its 3 KV heads (one per rank: three shards on disk,
every key carrying its rank); Gemma 3 270M at TP=2 replicates its one KV head
(rank 0 saves one copy, both ranks load it). A second, fresh engine loads the
prompt from the store and samples the cold engine's greedy tokens.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pagoda import LLM, SamplingParams
from pagoda.kvstore.entry import FIXED_HEADER_SIZE, peek_entry_key
from pagoda.kvstore.keys import CacheEngineKey
from pagoda.kvstore.token_database import ChunkedTokenDatabase

pytestmark = pytest.mark.slow

PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
NUM_STORED = 1024  # a 1,100-token prompt: four full 256-token chunks, the tail recomputed


def make_prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [1] + [rng.randrange(1000, 40000) for _ in range(1099)]  # inside both models' vocabularies


PROMPT = make_prompt(0)


def engine(model_path: Path, tp: int, disk: Path, load_mode: str = "layerwise") -> LLM:
    return LLM(str(model_path), dtype="float32", kv_cache_memory=256 << 20, max_model_len=2048,
               tensor_parallel_size=tp, distributed_executor_backend="mp" if tp > 1 else None,
               kv_store=f"disk:{disk}:1GiB", kv_store_load_mode=load_mode)


def run(llm: LLM, prompt: list[int] = PROMPT, metrics: dict[str, float] | None = None):
    """The request's output, with the engine's metrics (rank 0's store counters) copied into `metrics`."""
    try:
        output = llm.generate([prompt], PARAMS, use_tqdm=False)[0]
        assert llm.flush_kv_store()
        if metrics is not None:
            metrics.update(llm.get_metrics())
        return output
    finally:
        llm.shutdown()


def stored_keys(folder: Path) -> list[CacheEngineKey]:
    return [peek_entry_key(path.read_bytes())[0] for path in sorted(folder.glob("*.kv"))]


@pytest.mark.parametrize(("model", "tp", "num_kv_heads"), [("smollm2-135m", 3, 3), ("gemma3-270m", 2, 1)])
def test_a_fresh_tensor_parallel_engine_loads_what_another_saved(model: str, tp: int, num_kv_heads: int,
                                                                 model_paths: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    disk = tmp_path / "kv"
    cold = run(engine(model_paths[model], tp, disk))
    assert cold.metrics.kv_store_tokens == {}
    shards = sorted(path.name for path in disk.iterdir())
    if num_kv_heads >= tp:  # split heads: one folder per rank, each key naming its rank
        assert shards == [f"tp{tp}-shard{rank}" for rank in range(tp)]
    else:  # replicated heads: rank 0 saved the one copy every rank loads
        assert shards == [f"tp{tp}-shard0"]
    for shard in shards:
        keys = stored_keys(disk / shard)
        assert keys and {(key.world_size, key.worker_id) for key in keys} == {(tp, int(shard[-1]))}
    assert not list(disk.glob("*.kv"))
    counts = {len(stored_keys(disk / shard)) for shard in shards}
    assert len(counts) == 1  # every shard holds the same chunks

    warm = run(engine(model_paths[model], tp, disk))
    assert warm.metrics.kv_store_tokens == {"disk": NUM_STORED}
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids


def test_an_async_load_is_reported_once_every_rank_finished_it(smollm_path: Path, tmp_path: Path) -> None:
    disk = tmp_path / "kv"
    cold = run(engine(smollm_path, 3, disk, "async"))
    warm = run(engine(smollm_path, 3, disk, "async"))
    assert warm.metrics.kv_store_tokens == {"disk": NUM_STORED}
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids


def test_world_sizes_do_not_share_entries(smollm_path: Path, tmp_path: Path) -> None:
    """KV of another world size sums its partial products in another order: never taken for this one's."""
    disk = tmp_path / "kv"
    one = run(engine(smollm_path, 1, disk))
    assert stored_keys(disk)  # TP=1 keeps its entries in the folder itself
    three = run(engine(smollm_path, 3, disk))
    assert three.metrics.kv_store_tokens == {}
    assert three.outputs[0].token_ids == one.outputs[0].token_ids


def test_a_corrupt_entry_on_one_rank_is_recomputed_on_every_rank(smollm_path: Path, tmp_path: Path) -> None:
    """Rank 1's chunk 1 is damaged: rank 0 could load all four chunks, but the ranks agree on chunk 0 only."""
    disk = tmp_path / "kv"
    cold = run(engine(smollm_path, 3, disk))
    hashes = [h for _, _, h in ChunkedTokenDatabase(256).process_tokens(PROMPT)]
    target = next(path for path in sorted((disk / "tp3-shard1").glob("*.kv"))
                  if peek_entry_key(path.read_bytes())[0].chunk_hash == hashes[1])
    damaged = bytearray(target.read_bytes())
    damaged[FIXED_HEADER_SIZE + 100] ^= 0x40
    target.write_bytes(bytes(damaged))

    metrics: dict[str, float] = {}
    recomputed = run(engine(smollm_path, 3, disk), metrics=metrics)
    assert recomputed.metrics.kv_store_tokens == {}  # a short load is rewound, the rest recomputed
    assert recomputed.outputs[0].token_ids == cold.outputs[0].token_ids
    # Rank 0 read only good entries, yet counts the load as failed: it learnt of rank 1's bad one.
    assert metrics["kv_store.disk.corrupt_dropped"] == 0
    assert metrics["kv_store.connector.failed_loads"] == 1
    # Rank 1 dropped the bad entry and saved the recomputed chunk again.
    assert target.exists() and target.read_bytes() != bytes(damaged)
