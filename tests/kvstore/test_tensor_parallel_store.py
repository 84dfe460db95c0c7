"""A store under tensor parallelism, unit by unit: the rank that reads another rank's folder, the per-rank
lookup servers whose answers a hit needs all of, and the encoder-output store's rank-0-saves rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pagoda.config import ECTransferConfig
from pagoda.core.connector.ec_metadata import ECConnectorMetadata, ECLoadSpec
from pagoda.ec_connector.factory import encoder_output_keys
from pagoda.ec_connector.worker_side import ECConnectorWorker
from pagoda.kv_store_spec import parse_kv_store_spec
from pagoda.kvstore.build import RankStore, build_storage_manager
from pagoda.kvstore.keys import CacheEngineKey
from pagoda.kvstore.lookup import LookupServer, TensorParallelLookup, rank_lookup_address
from tests.ec_connector.ec_helpers import make_config

VALUES = np.arange(64, dtype=np.float32)
TEMPLATE = CacheEngineKey("model", "float32", "layer0", 2, 0, b"")


def key(chunk: int, worker_id: int = 0) -> CacheEngineKey:
    return CacheEngineKey("model", "float32", "layer0", 2, worker_id, bytes([chunk]) * 32)


def put(manager, *keys: CacheEngineKey) -> None:
    for k in keys:
        assert manager.put(k, VALUES, VALUES.shape, "float32")
    manager.flush()


def test_a_reader_rank_loads_what_the_writer_saves_after_it_started_and_never_writes_there(tmp_path: Path) -> None:
    spec = parse_kv_store_spec(f"disk:{tmp_path}:16MiB")
    writer = build_storage_manager(spec, RankStore(subfolder="tp2-shard0"))
    reader = build_storage_manager(spec, RankStore(subfolder="tp2-shard0", writes_shared=False))
    try:
        assert writer.writes_anything and not reader.writes_anything
        assert reader.get(key(0)) is None
        put(writer, key(0))
        hit = reader.get(key(0))  # written after the reader opened the folder
        assert hit is not None and bytes(hit.entry.payload) == VALUES.tobytes()
        assert reader.lookup_prefix([key(0), key(1)]) == 1
        assert reader.put(key(1), VALUES, VALUES.shape, "float32") == 0
        assert reader.remove(key(0)) == 0 and writer.contains(key(0))
        assert [p.parent.name for p in tmp_path.rglob("*.kv")] == ["tp2-shard0"]
    finally:
        writer.close()
        reader.close()


def test_a_reader_rank_still_fills_its_own_cpu_tier(tmp_path: Path) -> None:
    """No other process sees a rank's memory: a rank that does not save to disk keeps its own CPU copies."""
    reader = build_storage_manager(parse_kv_store_spec(f"cpu:1MiB,disk:{tmp_path}:16MiB"),
                                   RankStore(writes_shared=False))
    try:
        assert reader.writes_anything
        assert reader.put(key(0), VALUES, VALUES.shape, "float32") == 1  # the CPU tier only
        reader.flush()
        assert not list(tmp_path.rglob("*.kv"))
    finally:
        reader.close()


def test_rank_lookup_addresses_are_distinct() -> None:
    assert rank_lookup_address("ipc:///tmp/x/lookup", 0) == "ipc:///tmp/x/lookup"
    assert rank_lookup_address("ipc:///tmp/x/lookup", 2) == "ipc:///tmp/x/lookup.rank2"
    assert rank_lookup_address("tcp://127.0.0.1:5000", 1) == "tcp://127.0.0.1:5001"


def test_a_chunk_is_a_hit_only_when_every_rank_holds_its_own_key(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/lookup"
    managers = [build_storage_manager(parse_kv_store_spec("cpu:1MiB")) for _ in range(2)]
    put(managers[0], key(0, 0), key(1, 0), key(2, 0))
    put(managers[1], key(0, 1), key(1, 1))
    put(managers[1], key(0, 0), key(2, 0))  # rank 1's copies of shared (worker 0) keys: chunk 1 is missing
    servers = [LookupServer(manager, rank_lookup_address(address, rank)) for rank, manager in enumerate(managers)]
    for server in servers:
        server.start()
    split = TensorParallelLookup(address, [0, 1])
    shared = TensorParallelLookup(address, [0, 0])  # replicated heads: one key, every rank must find it
    try:
        assert split.lookup([key(c) for c in range(3)]) == 2
        assert shared.lookup([key(c) for c in range(3)]) == 1
    finally:
        split.close()
        shared.close()
        for server in servers:
            server.close()
        for manager in managers:
            manager.close()


class _OtherRankFailed:
    """Stands in for a 2-rank group in which the other rank failed to load the first item of the step."""

    world_size = 2

    def min_over_ranks(self, values: list[int], device: torch.device) -> list[int]:
        return [0] + values[1:]


def test_an_encoder_output_any_rank_failed_to_load_is_encoded_on_every_rank(tmp_path: Path) -> None:
    config = make_config(tmp_path, f"disk:{tmp_path / 'ec'}:16MiB", "ec_both", None)
    transfer = config.ec_transfer_config
    assert isinstance(transfer, ECTransferConfig)
    keys = encoder_output_keys(config)
    writer = build_storage_manager(transfer.ec_store)
    reader = build_storage_manager(transfer.ec_store, RankStore(writes_shared=False))
    output = torch.randn(4, 64)
    for name in ("a", "b"):
        writer.put(keys.key(name), output.numpy().view(np.uint8), tuple(output.shape), "float32")
    writer.flush()
    rank1 = ECConnectorWorker(transfer, keys, reader, _NoServer(), dtype=torch.float32, hidden_size=64,
                              device=torch.device("cpu"), tp=_OtherRankFailed())  # type: ignore[arg-type]
    try:
        cache: dict[str, torch.Tensor] = {}
        rank1.start_load_caches(ECConnectorMetadata(loads=[ECLoadSpec("a", 4), ECLoadSpec("b", 4)]), cache)
        assert list(cache) == ["b"]  # "a" loaded here too, but the other rank encodes it: so does this one
        assert rank1.finish_step().failed_loads == ["a"]
        rank1.save_caches({"c": output}, "c")  # only rank 0 writes the shared tiers
        rank1.flush()
        assert reader.get(keys.key("c")) is None
    finally:
        rank1.close()
        writer.close()


class _NoServer:
    def close(self) -> None:
        pass


def test_a_reader_rank_leaves_out_a_write_only_shared_tier(tmp_path: Path) -> None:
    reader = build_storage_manager(parse_kv_store_spec(f"cpu:1MiB,disk:{tmp_path}:16MiB+writeonly"),
                                   RankStore(writes_shared=False))
    try:
        assert [tier.name for tier in reader.tiers] == ["cpu"]
    finally:
        reader.close()
