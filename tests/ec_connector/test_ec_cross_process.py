"""EC connector across processes: the scheduler asks a store another process owns (even its in-memory CPU
tier) through the lookup pair; a second engine process loads through a real Redis what the first saved;
a corrupt Redis entry is dropped, counted and reported; a dead lookup answers False."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
import torch
from ec_helpers import (
    MODEL_ID,
    encoder_output,
    identifier,
    load_metadata,
    make_config,
    scheduler_side,
    worker_side,
)

from pagoda.ec_connector.keys import EncoderOutputKeys
from pagoda.kvstore.entry import FIXED_HEADER_SIZE
from pagoda.kvstore.tiers.redis import RedisTier

CHILD = Path(__file__).with_name("ec_child.py")
START_TIMEOUT_S = 60


@contextmanager
def producer_process(root: Path, ec_store: str, lookup_address: str, seeds: list[int],
                     dtype: str = "float32") -> Iterator[subprocess.Popen[str]]:
    """Another engine's worker side, in its own process: saves the seeds' outputs, then serves its store."""
    options = {"root": str(root), "ec_store": ec_store, "ec_role": "ec_producer", "lookup_address": lookup_address,
               "dtype": dtype}
    child = subprocess.Popen([sys.executable, str(CHILD), json.dumps(options), *map(str, seeds)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        yield child
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=START_TIMEOUT_S)


@pytest.mark.slow
def test_has_cache_item_asks_the_cpu_tier_of_the_worker_process(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/lookup"
    with producer_process(tmp_path, "cpu:64MiB", address, [0, 1]) as child:
        # The scheduler side of the same engine, in this process: the CPU tier lives only in the child.
        consumer = scheduler_side(make_config(tmp_path, "cpu:64MiB", "ec_consumer", address))
        assert consumer.has_cache_item(identifier("image-0")) and consumer.has_cache_item(identifier("image-1"))
        assert not consumer.has_cache_item(identifier("image-2"))
        producer = scheduler_side(make_config(tmp_path, "cpu:64MiB", "ec_producer", address))
        assert not producer.has_cache_item(identifier("image-0"))  # a producer never promises a load
        other_model = scheduler_side(make_config(tmp_path, "cpu:64MiB", "ec_consumer", address, identity="other"))
        assert not other_model.has_cache_item(identifier("image-0"))
        assert child.poll() is None
    # The worker is gone: the lookup times out and answers False, so the item is encoded.
    started = time.monotonic()
    assert not consumer.has_cache_item(identifier("image-0"))
    assert time.monotonic() - started < 5
    for connector in (consumer, producer, other_model):
        connector.close()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_second_process_loads_through_redis(tmp_path: Path, redis_server, dtype: str) -> None:
    spec = f"cpu:64MiB,{redis_server.url}"
    seeds = [3, 4]
    with producer_process(tmp_path, spec, f"ipc://{tmp_path}/producer", seeds, dtype):
        pass  # saved and flushed to Redis; its CPU tier dies with it
    config = make_config(tmp_path, spec, "ec_consumer", f"ipc://{tmp_path}/consumer", dtype=dtype)
    worker, scheduler = worker_side(config), scheduler_side(config)
    names = [identifier(f"image-{seed}") for seed in seeds]
    assert all(scheduler.has_cache_item(name) for name in names)
    worker.flush()  # a hit's lookup also promotes the entry from Redis to the CPU tier: let that finish
    encoder_cache: dict[str, torch.Tensor] = {}
    worker.start_load_caches(load_metadata(*names), encoder_cache)
    assert worker.finish_step().failed_loads == []
    for seed, name in zip(seeds, names):
        assert torch.equal(encoder_cache[name], encoder_output(seed, getattr(torch, dtype)))
    counters = worker.metrics_snapshot()
    assert counters["redis"]["loads"] == 2 and counters["cpu"]["loads"] == 2  # read from Redis once, promoted
    assert counters["connector"]["load_hits"] == 2
    worker.close()
    scheduler.close()


@pytest.mark.slow
def test_a_corrupt_redis_entry_is_dropped_counted_and_reported(tmp_path: Path, redis_server) -> None:
    with producer_process(tmp_path, redis_server.url, f"ipc://{tmp_path}/producer", [5, 6]):
        pass
    client = redis.Redis.from_url(redis_server.url)
    tier = RedisTier(redis_server.url)
    bad_key = tier.redis_key(EncoderOutputKeys(MODEL_ID, "float32").key(identifier("image-6")))
    tier.close()
    data = bytearray(client.get(bad_key))
    data[FIXED_HEADER_SIZE + 100] ^= 0x80
    client.set(bad_key, bytes(data))

    config = make_config(tmp_path, redis_server.url, "ec_consumer", f"ipc://{tmp_path}/consumer")
    worker = worker_side(config)
    good, bad = identifier("image-5"), identifier("image-6")
    encoder_cache: dict[str, torch.Tensor] = {}
    worker.start_load_caches(load_metadata(good, bad), encoder_cache)
    assert list(encoder_cache) == [good] and torch.equal(encoder_cache[good], encoder_output(5))
    assert worker.finish_step().failed_loads == [bad]
    counters = worker.metrics_snapshot()
    assert counters["redis"]["corrupt_dropped"] == 1 and counters["connector"]["failed_loads"] == 1
    assert client.exists(bad_key) == 0  # dropped, so the next producer's save replaces it
    client.close()
    worker.close()


@pytest.mark.slow
def test_a_redis_outage_is_a_counted_miss_never_an_error(tmp_path: Path, redis_server) -> None:
    config = make_config(tmp_path, redis_server.url, "ec_both", f"ipc://{tmp_path}/lookup")
    worker, scheduler = worker_side(config), scheduler_side(config)
    name = identifier("image")
    redis_server.stop()
    encoder_cache = {name: encoder_output(0)}
    worker.save_caches(encoder_cache, name)
    worker.flush()
    assert not scheduler.has_cache_item(name)
    loaded: dict[str, torch.Tensor] = {}
    worker.start_load_caches(load_metadata(name), loaded)
    assert loaded == {} and worker.finish_step().failed_loads == [name]
    counters = worker.metrics_snapshot()
    assert counters["connector"]["failed_saves"] == 1 and counters["redis"]["failed_puts"] == 1
    worker.close()
    scheduler.close()
