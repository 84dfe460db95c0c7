"""The connector's worker side on a tiny paged KV cache: bit-exact round trips, windows, short loads."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from pagoda.config import KVTransferConfig
from pagoda.kv_store_spec import parse_kv_store_spec
from pagoda.core.connector.kv_metadata import KVConnectorMetadata, LoadSpec, SaveSpec
from pagoda.core.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec
from pagoda.kv_connector.factory import build_worker_side
from pagoda.kv_connector.layout import StoreLayout
from pagoda.kv_connector.worker_side import KVConnectorWorker

BLOCK, CHUNK, WINDOW, NUM_BLOCKS = 4, 8, 8, 32
HASHES = [b"h0", b"h1", b"h2"]
SAVED_BLOCKS = [1, 2, 3, 4, 5, 6]  # positions 0..23 of the saving request
LOADED_BLOCKS = [11, 12, 13, 14, 15, 16]  # where another request loads them


def kv_cache_config() -> KVCacheConfig:
    full = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=8, dtype_size=4)
    sliding = SlidingWindowSpec(block_size=BLOCK, num_kv_heads=2, head_size=8, dtype_size=4, sliding_window=WINDOW)
    return KVCacheConfig(num_blocks=NUM_BLOCKS, groups=(KVCacheGroupSpec((0,), full),
                                                        KVCacheGroupSpec((1,), sliding)))


@pytest.fixture(params=["layerwise", "bulk"])
def connector(request, tmp_path: Path):
    torch.manual_seed(0)
    caches = [torch.randn(2, NUM_BLOCKS, BLOCK, 2, 8) for _ in range(2)]
    for cache in caches:
        cache[:, 10:] = 0  # the loading request's blocks start empty
    config = KVTransferConfig(parse_kv_store_spec("cpu:64MiB"), chunk_size=CHUNK, load_mode=request.param,
                              lookup_address=f"ipc://{tmp_path}/lookup")
    layout = StoreLayout("tiny", "float32", kv_cache_config(), CHUNK)
    worker = build_worker_side(config, layout, caches)
    yield worker
    worker.close()


def run_step(worker: KVConnectorWorker, metadata: KVConnectorMetadata):
    """What the model runner does around a forward pass (the layers' KV is already written here)."""
    worker.start_load_kv(metadata)
    for layer in range(len(worker.kv_caches)):
        worker.wait_for_layer_load(layer)
        worker.save_kv_layer(layer)
    worker.wait_for_save()
    return worker.finish_step(idle=False)


def save_three_chunks(worker: KVConnectorWorker) -> None:
    save = SaveSpec(req_id="writer", first_chunk=0, chunk_hashes=HASHES, block_ids=(SAVED_BLOCKS, SAVED_BLOCKS))
    run_step(worker, KVConnectorMetadata(saves=[save]))
    worker.flush()


def load_spec(end: int = 24) -> LoadSpec:
    return LoadSpec(req_id="reader", start=0, end=end, first_chunk=0, chunk_hashes=HASHES[: end // CHUNK],
                    block_ids=(LOADED_BLOCKS, LOADED_BLOCKS), is_async=False)


def test_load_is_bit_identical_and_sliding_layers_load_only_their_window(connector):
    save_three_chunks(connector)
    output = run_step(connector, KVConnectorMetadata(loads=[load_spec()]))
    result = output.finished_loads["reader"]
    assert result.num_computed_tokens == 24 and result.tokens_by_tier == {"cpu": 24}
    full, sliding = connector.kv_caches
    assert torch.equal(full[:, LOADED_BLOCKS], full[:, SAVED_BLOCKS])
    # A token at position 24 sees positions 17..24: blocks from position 16 on; nothing earlier is read.
    assert torch.equal(sliding[:, LOADED_BLOCKS[4:]], sliding[:, SAVED_BLOCKS[4:]])
    assert not sliding[:, LOADED_BLOCKS[:4]].any()
    assert connector.manager.metrics()["cpu"].hit_tokens == 24


def test_missing_entry_shortens_the_load_to_what_every_layer_has(connector):
    save_three_chunks(connector)
    layout = connector.layout
    connector.manager.remove(layout.layers[0].key(HASHES[2]))  # full layer, last chunk
    result = run_step(connector, KVConnectorMetadata(loads=[load_spec()])).finished_loads["reader"]
    # 16 would need the sliding layer's chunk 1, which was outside the window of 24 and never loaded.
    assert result.num_computed_tokens == 0
    assert connector.num_failed_loads == 1

    connector.manager.remove(layout.layers[1].key(HASHES[0]))
    result = run_step(connector, KVConnectorMetadata(loads=[load_spec(end=16)])).finished_loads["reader"]
    assert result.num_computed_tokens == 16  # the window of 16 starts at 9: chunk 0 is not needed


def test_async_load_reports_when_done_and_never_blocks_the_step(connector):
    save_three_chunks(connector)
    spec = load_spec()
    spec.is_async = True
    output = run_step(connector, KVConnectorMetadata(loads=[spec]))
    finished = dict(output.finished_loads)
    while "reader" not in finished:
        finished.update(connector.finish_step(idle=True).finished_loads)
    assert finished["reader"].num_computed_tokens == 24
    assert torch.equal(connector.kv_caches[0][:, LOADED_BLOCKS], connector.kv_caches[0][:, SAVED_BLOCKS])


def test_chunks_with_a_null_block_are_not_saved(connector):
    save = SaveSpec(req_id="writer", first_chunk=0, chunk_hashes=HASHES[:2],
                    block_ids=(SAVED_BLOCKS, [0, 0] + SAVED_BLOCKS[2:]))
    run_step(connector, KVConnectorMetadata(saves=[save]))
    connector.flush()
    layers = connector.layout.layers
    assert connector.manager.contains(layers[0].key(HASHES[0]))
    assert not connector.manager.contains(layers[1].key(HASHES[0]))  # dropped from the window already
    assert connector.manager.contains(layers[1].key(HASHES[1]))


def test_a_short_load_never_counts_sliding_rows_that_were_not_loaded(connector):
    # A 24-token prompt: the load ends at 20, whose window starts at 13, so the sliding layer loads rows 12 on.
    save_three_chunks(connector)
    connector.manager.remove(connector.layout.layers[0].key(HASHES[2]))  # full layer, last chunk
    result = run_step(connector, KVConnectorMetadata(loads=[load_spec(end=20)])).finished_loads["reader"]
    # 16 would need sliding rows 9..15, and rows 8..11 never arrived: nothing of the load is usable.
    assert result.num_computed_tokens == 0


def test_saves_of_a_request_whose_in_step_load_fell_short_are_dropped(connector):
    save_three_chunks(connector)
    layers = connector.layout.layers
    connector.manager.remove(layers[0].key(HASHES[1]))
    save = SaveSpec(req_id="reader", first_chunk=2, chunk_hashes=[b"computed-on-missing-kv"],
                    block_ids=(LOADED_BLOCKS, LOADED_BLOCKS))
    output = run_step(connector, KVConnectorMetadata(loads=[load_spec(end=16)], saves=[save]))
    assert output.finished_loads["reader"].num_computed_tokens < 16
    connector.flush()
    assert not any(connector.manager.contains(layer.key(b"computed-on-missing-kv")) for layer in layers)



def native_thread_count() -> int:
    """OS threads of this process that Python did not start (OpenMP teams, ZMQ I/O threads)."""
    return len(os.listdir("/proc/self/task")) - threading.active_count()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or (os.cpu_count() or 1) < 2,
                    reason="needs Linux /proc and two cores")
@pytest.mark.parametrize("load_mode", ["layerwise", "async"])
def test_connector_threads_never_start_a_second_openmp_team(tmp_path: Path, load_mode: str):
    # A second team means more OpenMP threads than cores: libgomp then stops spinning at barriers and
    # every parallel region of later forward passes pays futex wake-ups (decode steps ran ~20% slower).
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        caches = [torch.randn(2, NUM_BLOCKS, 64, 16, 64) for _ in range(2)]
        layout_config = KVCacheConfig(num_blocks=NUM_BLOCKS, groups=(
            KVCacheGroupSpec((0, 1), FullAttentionSpec(block_size=64, num_kv_heads=16, head_size=64, dtype_size=4)),))
        config = KVTransferConfig(parse_kv_store_spec("cpu:64MiB"), chunk_size=128, load_mode="layerwise",
                                  lookup_address=f"ipc://{tmp_path}/lookup")
        worker = build_worker_side(config, StoreLayout("tiny", "float32", layout_config, 128), caches)
        try:
            assert caches[0][:, [1, 2]].numel() > 32768  # above torch's grain size: copies would fork a team
            before = native_thread_count()
            save = SaveSpec(req_id="writer", first_chunk=0, chunk_hashes=[b"c0"], block_ids=([1, 2],))
            run_step(worker, KVConnectorMetadata(saves=[save]))
            worker.flush()
            spec = LoadSpec(req_id="reader", start=0, end=128, first_chunk=0, chunk_hashes=[b"c0"],
                            block_ids=([11, 12],), is_async=load_mode == "async")
            finished = dict(run_step(worker, KVConnectorMetadata(loads=[spec])).finished_loads)
            while "reader" not in finished:
                finished.update(worker.finish_step(idle=True).finished_loads)
            assert finished["reader"].num_computed_tokens == 128
            assert torch.equal(caches[1][:, [11, 12]], caches[1][:, [1, 2]])
            assert native_thread_count() == before
            assert torch.get_num_threads() == 2  # the side threads' setting stays theirs
            putter = next(t for t in threading.enumerate() if t.name.startswith("pagoda-kv-put"))
            assert os.sched_getscheduler(putter.native_id) == os.SCHED_IDLE  # writes only fill idle cores
        finally:
            worker.close()
    finally:
        torch.set_num_threads(previous_threads)
