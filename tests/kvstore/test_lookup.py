"""Lookup client and server over ZMQ: prefix answers over ipc and tcp, timeouts, bad requests, prefetch."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest
import zmq
from kvstore_helpers import make_key

from pagoda.kvstore.lookup import LookupClient, LookupResponse, LookupServer
from pagoda.kvstore.storage_manager import StorageManager
from pagoda.kvstore.tiers.cpu import CPUTier
from pagoda.kvstore.tiers.disk import DiskTier

VALUES = np.arange(16, dtype=np.float32)


def free_tcp_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture(params=["ipc", "tcp"])
def address(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/lookup" if request.param == "ipc" else free_tcp_address()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[StorageManager]:
    store = StorageManager([CPUTier(1 << 20), DiskTier(tmp_path / "disk", 1 << 20)])
    yield store
    store.close()


def store(manager: StorageManager, *names: object, layout: str = "LBTHD") -> None:
    for name in names:
        manager.put(make_key(name, layout=layout), VALUES, VALUES.shape, "float32")
    manager.flush()


def test_lookup_counts_leading_present_chunks(manager: StorageManager, address: str) -> None:
    store(manager, 0, 1, 3)
    server = LookupServer(manager, address)
    server.start()
    client = LookupClient(address)
    assert client.lookup([make_key(i) for i in range(4)]) == 2
    assert client.lookup([make_key(0), make_key(1)]) == 2
    assert client.lookup([make_key(2), make_key(3)]) == 0
    assert client.lookup([make_key(0, layout="other")]) == 0  # the template's fields are part of the key
    assert client.lookup([]) == 0
    client.close()
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 1.0
    if address.startswith("ipc://"):
        assert not Path(address.removeprefix("ipc://")).exists()


def test_no_server_means_zero_with_one_warning_then_recovery(
    manager: StorageManager, address: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = LookupClient(address, timeout_ms=200)
    keys = [make_key(0)]
    store(manager, 0)
    with caplog.at_level(logging.INFO, logger="pagoda.kvstore.lookup"):
        started = time.monotonic()
        assert client.lookup(keys) == 0
        assert client.lookup(keys) == 0  # sent again on a fresh socket: it waits its full timeout too
        assert 0.35 < time.monotonic() - started < 2.0
        warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
        assert len(warnings) == 1 and "no answer within 200 ms" in warnings[0].getMessage()
        server = LookupServer(manager, address)
        server.start()
        assert client.lookup(keys) == 1
    assert [record.levelno for record in caplog.records] == [logging.WARNING, logging.INFO]
    client.close()
    server.close()


def test_a_bad_request_is_answered_zero_and_the_server_keeps_serving(manager: StorageManager, address: str) -> None:
    store(manager, 0)
    server = LookupServer(manager, address)
    server.start()
    context = zmq.Context()
    raw = context.socket(zmq.REQ)
    raw.linger = 0
    raw.connect(address)
    raw.send(b"not msgpack of a lookup request")
    assert raw.poll(2000)
    assert msgspec.msgpack.decode(raw.recv(), type=LookupResponse).num_present == 0
    raw.close()
    context.term()
    client = LookupClient(address)
    assert client.lookup([make_key(0)]) == 1
    client.close()
    server.close()


def test_prefetch_promotes_disk_hits_into_the_cpu_tier(manager: StorageManager, tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/lookup"
    store(manager, 0, 1)
    store(manager, 0, 1, layout="layer1")
    cpu = manager.tiers[0]
    for layout in ("LBTHD", "layer1"):
        for name in (0, 1):
            cpu.remove(make_key(name, layout=layout))  # now only on disk
    server = LookupServer(manager, address)
    server.start()
    client = LookupClient(address)
    keys = [make_key(0), make_key(1), make_key(2)]
    assert client.lookup(keys) == 2
    manager.flush()
    assert not cpu.contains(make_key(0))  # a plain lookup moves nothing
    assert client.lookup(keys, prefetch=True, prefetch_templates=[make_key("any", layout="layer1")]) == 2
    manager.flush()
    promoted = [make_key(name, layout=layout) for layout in ("LBTHD", "layer1") for name in (0, 1)]
    assert all(cpu.contains(key) for key in promoted)
    hit = manager.get(make_key(1, layout="layer1"))
    assert hit is not None and hit.tier == "cpu"
    client.close()
    server.close()


def test_bad_arguments_are_named(manager: StorageManager, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ipc://PATH or tcp://HOST:PORT, got 'localhost:5555'"):
        LookupServer(manager, "localhost:5555")
    with pytest.raises(ValueError, match="ipc://PATH or tcp://HOST:PORT"):
        LookupClient("udp://127.0.0.1:1")
    with pytest.raises(ValueError, match="timeout_ms must be positive"):
        LookupClient(f"ipc://{tmp_path}/x", timeout_ms=0)
    client = LookupClient(f"ipc://{tmp_path}/x")
    with pytest.raises(ValueError, match="only chunk hashes may differ"):
        client.lookup([make_key(0), make_key(1, layout="other")])
    client.close()
    server = LookupServer(manager, f"ipc://{tmp_path}/y")
    server.start()
    with pytest.raises(RuntimeError, match="already started"):
        server.start()
    server.close()
