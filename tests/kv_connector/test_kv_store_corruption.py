"""End to end: stored entries damaged after the engine indexed them are dropped at read time, counted, recomputed.

The engine saves PROMPT, then, before each reload, one entry that the load
reads is damaged in place (the store's index still lists it): a flipped
byte in a sliding-window layer's chunk, a truncated full-attention entry,
and a whole valid entry of another chunk under this chunk's name. Only the
entry's checks at read time can catch them: the checksum the flip, the
length (and checksum) the truncation, the key the swap. Each time the output
is the cold run's, the store supplies nothing (see store_helpers: one bad
entry costs the whole prompt), exactly one more entry is counted dropped,
and the recomputed chunks are saved again, so the last load is whole.
"""

from __future__ import annotations

import pytest
import redis
from store_helpers import (
    CORRUPTIONS,
    NUM_STORED,
    PROMPT,
    StoredEntry,
    corrupt,
    describe,
    generate_one,
    pick,
    store_engine,
)

pytestmark = pytest.mark.slow

# (chunk, full attention?) of the entry each corruption damages; all are read by a load of PROMPT.
TARGETS = {"flipped": (2, False), "truncated": (1, True), "another key's entry": (2, True)}


def reload_after_each_corruption(llm, tier: str, entries, read, write, cold) -> None:
    """Damage one entry per kind, reload PROMPT each time, then check the store healed."""
    generate_one(llm, PROMPT)
    assert llm.flush_kv_store()
    stored = entries()
    assert len(stored) == 4 * 18  # one entry per chunk and layer
    for kind in CORRUPTIONS:
        chunk, full_attention = TARGETS[kind]
        target = pick(stored, chunk, full_attention=full_attention)
        donor = pick(stored, chunk + 1, full_attention=full_attention)  # same layer, the next chunk
        assert donor.layer == target.layer
        write(target, corrupt(read(target), kind, read(donor)))
        dropped_before = llm.get_metrics()[f"kv_store.{tier}.corrupt_dropped"]
        assert llm.reset_prefix_cache()
        out = generate_one(llm, PROMPT)
        assert out.outputs[0].token_ids == cold["full"], kind
        assert out.metrics.kv_store_tokens == {}, kind
        assert llm.get_metrics()[f"kv_store.{tier}.corrupt_dropped"] == dropped_before + 1, kind
        assert llm.flush_kv_store()
    assert llm.reset_prefix_cache()
    healed = generate_one(llm, PROMPT)
    assert healed.outputs[0].token_ids == cold["full"]
    assert healed.metrics.kv_store_tokens == {tier: NUM_STORED}


def test_corrupted_disk_entries_are_dropped_at_read_time(gemma_path, tmp_path, cold):
    disk = tmp_path / "kv"
    llm = store_engine(gemma_path, f"disk:{disk}:1GiB", kv_store_load_mode="bulk")

    def entries() -> list[StoredEntry]:
        return [describe(path, path.read_bytes(), PROMPT) for path in sorted(disk.glob("*.kv"))]

    def write(entry: StoredEntry, data: bytes) -> None:
        entry.location.write_bytes(data)

    try:
        reload_after_each_corruption(llm, "disk", entries, lambda e: e.location.read_bytes(), write, cold)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("load_mode", ["layerwise", "async"])
def test_corrupted_redis_entries_are_dropped(gemma_path, redis_server, cold, load_mode):
    namespace = f"corrupt-{load_mode}"
    client = redis.Redis.from_url(redis_server.url)
    llm = store_engine(gemma_path, f"{redis_server.url}+namespace={namespace}", kv_store_load_mode=load_mode)

    def entries() -> list[StoredEntry]:
        return [describe(name, client.get(name), PROMPT) for name in sorted(client.scan_iter(f"{namespace}:*"))]

    def write(entry: StoredEntry, data: bytes) -> None:
        client.set(entry.location, data)

    try:
        reload_after_each_corruption(llm, "redis", entries, lambda e: client.get(e.location), write, cold)
    finally:
        llm.shutdown()
        client.close()
