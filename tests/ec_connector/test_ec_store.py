"""EC connector in one process: encoder outputs saved by one worker side and loaded by another, through the
CPU tier and a disk folder after a restart; roles; corrupt, mismatched and foreign entries never served."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from ec_helpers import (
    HIDDEN_SIZE,
    MODEL_ID,
    NUM_EMBEDS,
    encoder_output,
    identifier,
    load_metadata,
    make_config,
    make_request,
    save,
    scheduler_side,
    worker_side,
)

from pagoda.ec_connector.keys import ENTRY_KIND, EncoderOutputKeys
from pagoda.kv_store_spec import parse_kv_store_spec
from pagoda.kvstore.build import build_storage_manager
from pagoda.kvstore.entry import FIXED_HEADER_SIZE
from pagoda.kvstore.keys import CacheEngineKey

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def lookup_address(tmp_path: Path, name: str = "lookup") -> str:
    return f"ipc://{tmp_path}/{name}"


def disk_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.kv"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_tier_round_trip_is_bit_identical(tmp_path: Path, dtype: str) -> None:
    config = make_config(tmp_path, "cpu:64MiB", "ec_both", lookup_address(tmp_path), dtype=dtype)
    worker, scheduler = worker_side(config), scheduler_side(config)
    items = {identifier(f"image-{seed}"): encoder_output(seed, DTYPES[dtype]) for seed in range(3)}
    save(worker, items)
    names = list(items)
    assert all(scheduler.has_cache_item(name) for name in names)
    assert not scheduler.has_cache_item(identifier("never-saved"))
    for name in names:
        scheduler.update_state_after_alloc(make_request(), name, NUM_EMBEDS)
    scheduler.update_state_after_alloc(make_request("r1"), names[0], NUM_EMBEDS)  # shared: loaded once
    metadata = scheduler.build_connector_meta()
    assert [spec.identifier for spec in metadata.loads] == names
    assert scheduler.build_connector_meta().loads == []  # the plan starts empty for the next step

    encoder_cache: dict[str, torch.Tensor] = {}
    worker.start_load_caches(metadata, encoder_cache)
    assert worker.finish_step().failed_loads == []
    for name, tensor in items.items():
        loaded = encoder_cache[name]
        assert loaded.dtype == DTYPES[dtype] and loaded.shape == (NUM_EMBEDS, HIDDEN_SIZE)
        assert torch.equal(loaded.view(torch.uint8), tensor.view(torch.uint8))
    counters = worker.metrics_snapshot()
    tensor_bytes = NUM_EMBEDS * HIDDEN_SIZE * DTYPES[dtype].itemsize
    assert counters["connector"]["saves"] == 3 and counters["connector"]["save_bytes"] == 3 * tensor_bytes
    assert counters["connector"]["loads"] == 3 and counters["connector"]["load_hits"] == 3
    assert counters["connector"]["load_bytes"] == 3 * tensor_bytes and counters["connector"]["failed_loads"] == 0
    assert counters["cpu"]["loads"] == 3 and counters["cpu"]["saves"] == 3
    scheduler.close()
    worker.close()


def test_items_already_in_the_encoder_cache_are_not_loaded_again(tmp_path: Path) -> None:
    config = make_config(tmp_path, "cpu:64MiB", "ec_both", lookup_address(tmp_path))
    worker = worker_side(config)
    name = identifier("image")
    save(worker, {name: encoder_output(0)})
    present = encoder_output(0)
    encoder_cache = {name: present}
    worker.start_load_caches(load_metadata(name), encoder_cache)
    assert encoder_cache[name] is present
    assert worker.metrics_snapshot()["connector"]["loads"] == 0
    worker.close()


def test_disk_entries_load_after_a_restart(tmp_path: Path) -> None:
    spec = f"disk:{tmp_path / 'ec'}:64MiB"
    first = worker_side(make_config(tmp_path, spec, "ec_producer", lookup_address(tmp_path, "a"), dtype="bfloat16"))
    items = {identifier(f"image-{seed}"): encoder_output(seed, torch.bfloat16) for seed in range(2)}
    save(first, items)
    first.close()

    # Another process on the same folder, "after a restart": a StorageManager of its own, rebuilt from the files.
    config = make_config(tmp_path, spec, "ec_consumer", lookup_address(tmp_path, "b"), dtype="bfloat16")
    second, scheduler = worker_side(config), scheduler_side(config)
    assert all(scheduler.has_cache_item(name) for name in items)
    encoder_cache: dict[str, torch.Tensor] = {}
    second.start_load_caches(load_metadata(*items), encoder_cache)
    assert second.finish_step().failed_loads == []
    assert all(torch.equal(encoder_cache[name], tensor) for name, tensor in items.items())
    assert second.metrics_snapshot()["disk"]["loads"] == 2
    scheduler.close()
    second.close()


def test_roles(tmp_path: Path) -> None:
    spec = f"disk:{tmp_path / 'ec'}:64MiB"
    name = identifier("image")

    consumer_config = make_config(tmp_path, spec, "ec_consumer", lookup_address(tmp_path, "consumer"))
    consumer, consumer_scheduler = worker_side(consumer_config), scheduler_side(consumer_config)
    save(consumer, {name: encoder_output(0)})  # a consumer never saves
    assert disk_files(tmp_path / "ec") == []
    assert not consumer_scheduler.has_cache_item(name)
    consumer.close()
    consumer_scheduler.close()

    producer_config = make_config(tmp_path, spec, "ec_producer", lookup_address(tmp_path, "producer"))
    producer, producer_scheduler = worker_side(producer_config), scheduler_side(producer_config)
    save(producer, {name: encoder_output(0)})
    assert len(disk_files(tmp_path / "ec")) == 1
    assert not producer_scheduler.has_cache_item(name)  # stored, but a producer never says so
    encoder_cache: dict[str, torch.Tensor] = {}
    producer.start_load_caches(load_metadata(name), encoder_cache)  # nor loads
    assert encoder_cache == {} and producer.finish_step().failed_loads == []
    assert producer.metrics_snapshot()["connector"]["loads"] == 0
    producer.close()
    producer_scheduler.close()

    both_config = make_config(tmp_path, spec, "ec_both", lookup_address(tmp_path, "both"))
    both, both_scheduler = worker_side(both_config), scheduler_side(both_config)
    assert both_scheduler.has_cache_item(name)  # ec_both loads (vLLM once forgot this role on loads)
    both.start_load_caches(load_metadata(name), encoder_cache)
    assert torch.equal(encoder_cache[name], encoder_output(0))
    other = identifier("other image")
    save(both, {other: encoder_output(1)})  # and saves
    assert both_scheduler.has_cache_item(other)
    assert len(disk_files(tmp_path / "ec")) == 2
    both.close()
    both_scheduler.close()


def test_a_corrupt_disk_entry_is_dropped_counted_and_reported(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    spec = f"disk:{tmp_path / 'ec'}:64MiB"
    config = make_config(tmp_path, spec, "ec_both", lookup_address(tmp_path))
    worker, scheduler = worker_side(config), scheduler_side(config)
    good, bad = identifier("good"), identifier("bad")
    save(worker, {good: encoder_output(0)})
    [good_file] = disk_files(tmp_path / "ec")
    save(worker, {bad: encoder_output(1)})
    [bad_file] = [path for path in disk_files(tmp_path / "ec") if path != good_file]
    data = bytearray(bad_file.read_bytes())
    data[FIXED_HEADER_SIZE + 4000] ^= 0x01  # one bit of the payload
    bad_file.write_bytes(bytes(data))

    assert scheduler.has_cache_item(bad)  # the index only knows the file is there
    encoder_cache: dict[str, torch.Tensor] = {}
    with caplog.at_level(logging.WARNING):
        worker.start_load_caches(load_metadata(good, bad), encoder_cache)
    assert list(encoder_cache) == [good]
    assert worker.finish_step().failed_loads == [bad]
    assert worker.finish_step().failed_loads == []  # reported once
    counters = worker.metrics_snapshot()
    assert counters["disk"]["corrupt_dropped"] == 1
    assert counters["connector"]["failed_loads"] == 1 and counters["connector"]["load_hits"] == 1
    assert any("corrupt" in record.getMessage() for record in caplog.records)
    worker.flush()
    assert not bad_file.exists() and not scheduler.has_cache_item(bad)  # dropped from the store
    save(worker, {bad: encoder_output(1)})  # encoded again, saved again, served again
    worker.start_load_caches(load_metadata(bad), encoder_cache)
    assert torch.equal(encoder_cache[bad], encoder_output(1))
    worker.close()
    scheduler.close()


def test_an_entry_of_the_wrong_shape_or_dtype_is_rejected_and_dropped(tmp_path: Path) -> None:
    spec = f"disk:{tmp_path / 'ec'}:64MiB"
    config = make_config(tmp_path, spec, "ec_both", lookup_address(tmp_path))
    worker, scheduler = worker_side(config), scheduler_side(config)
    narrow, short, wrong_dtype = identifier("narrow"), identifier("short"), identifier("bf16")
    # Entries that pass every check of the entry format but are not this model's output for the item.
    manager = build_storage_manager(parse_kv_store_spec(f"disk:{tmp_path / 'ec'}:64MiB"))
    keys = EncoderOutputKeys(MODEL_ID, "float32")
    for name, tensor, dtype in ((narrow, encoder_output(0, hidden_size=32), "float32"),
                                (short, encoder_output(1, num_embeds=128), "float32"),
                                (wrong_dtype, encoder_output(2, torch.bfloat16), "bfloat16")):
        manager.put(keys.key(name), tensor.view(torch.uint8).numpy(), tuple(tensor.shape), dtype)
    manager.close()
    worker.close()
    worker = worker_side(make_config(tmp_path, spec, "ec_both", lookup_address(tmp_path, "again")))

    encoder_cache: dict[str, torch.Tensor] = {}
    worker.start_load_caches(load_metadata(narrow, short, wrong_dtype), encoder_cache)
    assert encoder_cache == {}
    assert worker.finish_step().failed_loads == [narrow, short, wrong_dtype]
    counters = worker.metrics_snapshot()["connector"]
    assert counters["mismatched_loads"] == 3 and counters["failed_loads"] == 3
    worker.flush()
    assert disk_files(tmp_path / "ec") == []
    # The worker never saves a tensor that is not an encoder output of this model.
    save(worker, {narrow: encoder_output(0, hidden_size=32), wrong_dtype: encoder_output(2, torch.bfloat16),
                  short: encoder_output(1, num_embeds=0)})
    assert worker.metrics_snapshot()["connector"]["failed_saves"] == 3
    assert disk_files(tmp_path / "ec") == []
    worker.close()
    scheduler.close()


def test_keys_isolate_models_dtypes_and_kv_chunks(tmp_path: Path) -> None:
    spec = f"disk:{tmp_path / 'ec'}:64MiB"
    name = identifier("image")
    config = make_config(tmp_path, spec, "ec_both", lookup_address(tmp_path))
    worker = worker_side(config)
    save(worker, {name: encoder_output(0)})
    worker.close()

    for other in (make_config(tmp_path, spec, "ec_both", lookup_address(tmp_path, "model"), identity="another"),
                  make_config(tmp_path, spec, "ec_both", lookup_address(tmp_path, "dtype"), dtype="float16")):
        other_worker, other_scheduler = worker_side(other), scheduler_side(other)
        assert not other_scheduler.has_cache_item(name)
        encoder_cache: dict[str, torch.Tensor] = {}
        other_worker.start_load_caches(load_metadata(name), encoder_cache)
        assert encoder_cache == {} and other_worker.finish_step().failed_loads == [name]
        other_worker.close()
        other_scheduler.close()
    assert len(disk_files(tmp_path / "ec")) == 1  # a miss drops nothing of another model's

    key = EncoderOutputKeys(MODEL_ID, "float32").key(name)
    assert key.layout == ENTRY_KIND and key.chunk_hash == name.encode()  # the full mm_hash
    # A KV chunk of the same model, dtype and hash bytes is another key: no KV layout equals the entry kind.
    kv_key = CacheEngineKey(MODEL_ID, "float32", "layer0:full:1x256:chunk256", 1, 0, name.encode())
    assert kv_key != key and not ENTRY_KIND.startswith("layer")


def test_a_full_tier_evicts_and_refuses_without_raising(tmp_path: Path) -> None:
    entry_bytes = NUM_EMBEDS * HIDDEN_SIZE * 4
    config = make_config(tmp_path, f"cpu:{entry_bytes * 5 // 2}", "ec_both", lookup_address(tmp_path))
    worker, scheduler = worker_side(config), scheduler_side(config)
    names = [identifier(f"image-{seed}") for seed in range(3)]
    save(worker, {name: encoder_output(seed) for seed, name in enumerate(names)})
    assert [scheduler.has_cache_item(name) for name in names] == [False, True, True]  # LRU evicted the first
    assert worker.metrics_snapshot()["cpu"]["evictions"] == 1
    save(worker, {identifier("huge"): encoder_output(9, num_embeds=NUM_EMBEDS * 3)})  # larger than the tier
    counters = worker.metrics_snapshot()
    assert counters["cpu"]["failed_puts"] == 1 and counters["connector"]["failed_saves"] == 1
    worker.close()
    scheduler.close()


def test_a_load_that_raises_is_a_failed_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = make_config(tmp_path, "cpu:64MiB", "ec_both", lookup_address(tmp_path))
    worker = worker_side(config)
    name = identifier("image")
    save(worker, {name: encoder_output(0)})

    def fail(*args: object) -> None:
        raise RuntimeError("out of device memory")

    monkeypatch.setattr(torch, "frombuffer", fail)
    encoder_cache: dict[str, torch.Tensor] = {}
    worker.start_load_caches(load_metadata(name), encoder_cache)
    assert encoder_cache == {} and worker.finish_step().failed_loads == [name]
    assert worker.metrics_snapshot()["connector"]["failed_loads"] == 1
    worker.close()


def test_saves_after_close_are_dropped_and_counted(tmp_path: Path) -> None:
    worker = worker_side(make_config(tmp_path, "cpu:64MiB", "ec_both", lookup_address(tmp_path)))
    worker.close()
    name = identifier("image")
    worker.save_caches({name: encoder_output(0)}, name)
    assert worker.metrics_snapshot()["connector"]["failed_saves"] == 1
