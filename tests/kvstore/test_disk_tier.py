"""Disk tier: round trip, restart, hard capacity, corrupt files, storage faults and write priorities."""

from __future__ import annotations

import logging
import os
import pathlib
import threading
import time
from pathlib import Path

import pytest
from kvstore_helpers import make_entry, make_key

from pagoda.kvstore.keys import CacheEngineKey
from pagoda.kvstore.storage_manager import StorageManager
from pagoda.kvstore.tiers.disk import DiskTier

ENTRY_SIZE = len(make_entry(make_key(0)))


def kv_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.kv"))


def put_all(tier: DiskTier, names: range | list[str]) -> None:
    """Put and wait for each write: queued writes are not evictable, so a burst could be refused."""
    for name in names:
        assert tier.put(make_key(name), make_entry(make_key(name)))
        tier.flush()


def test_round_trip_and_served_while_queued(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 10 * ENTRY_SIZE)
    entry = make_entry(make_key(0))
    tier.put(make_key(0), entry)
    assert tier.contains(make_key(0))
    assert tier.get(make_key(0)) == entry  # from memory or disk, whichever it is now
    tier.flush()
    assert tier.get(make_key(0)) == entry
    assert tier.get_async(make_key(0)).result(timeout=5) == entry
    assert tier.get(make_key(1)) is None
    assert len(kv_files(tmp_path)) == 1
    tier.close()


def test_restart_rebuilds_the_index(tmp_path: Path) -> None:
    first = DiskTier(tmp_path, 10 * ENTRY_SIZE)
    put_all(first, range(3))
    first.close()
    (tmp_path / "interrupted.tmp").write_bytes(b"half")
    second = DiskTier(tmp_path, 10 * ENTRY_SIZE)
    assert all(second.contains(make_key(i)) for i in range(3))
    assert second.get(make_key(2)) == make_entry(make_key(2))
    assert second.used_bytes == 3 * ENTRY_SIZE
    assert not (tmp_path / "interrupted.tmp").exists()
    second.close()


def test_capacity_is_a_hard_limit(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, 3 * ENTRY_SIZE)
    put_all(tier, range(5))
    assert tier.used_bytes <= 3 * ENTRY_SIZE
    assert sum(path.stat().st_size for path in kv_files(tmp_path)) <= 3 * ENTRY_SIZE
    assert [tier.contains(make_key(i)) for i in range(5)] == [False, False, True, True, True]
    assert tier.metrics.evictions == 2
    assert not tier.put(make_key("huge"), make_entry(make_key("huge"), num_values=1024))
    tier.close()
    smaller = DiskTier(tmp_path, 2 * ENTRY_SIZE)  # a restart with a smaller budget keeps the newest entries
    assert smaller.used_bytes <= 2 * ENTRY_SIZE and len(smaller) == 2
    smaller.close()


def test_corrupt_file_is_dropped_and_counted(tmp_path: Path) -> None:
    first = DiskTier(tmp_path, 10 * ENTRY_SIZE)
    put_all(first, range(2))
    first.close()
    path = kv_files(tmp_path)[0]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    (tmp_path / ("0" * 32 + ".kv")).write_bytes(b"not an entry at all")
    tier = DiskTier(tmp_path, 10 * ENTRY_SIZE)
    assert tier.metrics.corrupt_dropped == 1  # the garbage file, at index time
    assert len(tier) == 2  # a flipped payload byte passes the header peek; reads are checked by the manager
    manager = StorageManager([tier])
    results = {i: manager.get(make_key(i)) for i in range(2)}
    assert sorted(result is None for result in results.values()) == [False, True]
    assert tier.metrics.corrupt_dropped == 2
    manager.flush()
    assert len(kv_files(tmp_path)) == 1 and len(tier) == 1
    manager.close()


def test_unusable_directory_degrades_gracefully(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="pagoda.kvstore.tiers.disk"):
        tier = DiskTier(blocker / "kv", 10 * ENTRY_SIZE)
        assert not tier.put(make_key(0), make_entry(make_key(0)))
        assert not tier.put(make_key(1), make_entry(make_key(1)))
    assert not tier.contains(make_key(0)) and tier.get(make_key(0)) is None
    assert tier.metrics.failed_puts == 2
    assert len(caplog.records) == 1
    tier.close()


def test_disk_full_drops_puts_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_space(self: Path, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", no_space)
    tier = DiskTier(tmp_path, 10 * ENTRY_SIZE)
    with caplog.at_level(logging.WARNING, logger="pagoda.kvstore.tiers.disk"):
        put_all(tier, range(3))
    assert not any(tier.contains(make_key(i)) for i in range(3))
    assert tier.used_bytes == 0 and tier.metrics.failed_puts == 3
    assert len(caplog.records) == 1 and "No space left" in caplog.records[0].getMessage()
    tier.close()


def test_background_work_runs_prefetch_then_delete_then_put(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = DiskTier(tmp_path, 10 * ENTRY_SIZE, num_workers=1)
    put_all(tier, ["to-delete"])
    deleted_path = tier._path_for(make_key("to-delete"))
    log: list[tuple[str, object]] = []
    started, release = threading.Event(), threading.Event()
    real_write, real_get, real_unlink = tier._write, tier.get, pathlib.Path.unlink

    def gated_write(key: CacheEngineKey, entry: bytes, victims: list[CacheEngineKey]) -> None:
        if key == make_key("blocker"):
            started.set()
            release.wait(timeout=5)
        log.append(("put", key))
        real_write(key, entry, victims)

    def logged_get(key: CacheEngineKey) -> bytes | None:
        log.append(("prefetch", key))
        return real_get(key)

    def logged_unlink(self: Path, missing_ok: bool = False) -> None:
        if self == deleted_path:
            log.append(("delete", self.name))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(tier, "_write", gated_write)
    monkeypatch.setattr(tier, "get", logged_get)
    monkeypatch.setattr(pathlib.Path, "unlink", logged_unlink)
    tier.put(make_key("blocker"), make_entry(make_key("blocker")))
    assert started.wait(timeout=5)
    tier.put(make_key("later"), make_entry(make_key("later")))
    tier.remove(make_key("to-delete"))
    future = tier.get_async(make_key("absent"))
    release.set()
    tier.flush()
    assert future.result(timeout=5) is None
    assert log == [
        ("put", make_key("blocker")),
        ("prefetch", make_key("absent")),
        ("delete", deleted_path.name),
        ("put", make_key("later")),
    ]
    tier.close()


def test_remove_while_queued_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = DiskTier(tmp_path, 10 * ENTRY_SIZE, num_workers=1)
    started, release = threading.Event(), threading.Event()
    real_write = tier._write

    def gated_write(key: CacheEngineKey, entry: bytes, victims: list[CacheEngineKey]) -> None:
        started.set()
        release.wait(timeout=5)
        real_write(key, entry, victims)

    monkeypatch.setattr(tier, "_write", gated_write)
    tier.put(make_key(0), make_entry(make_key(0)))
    assert started.wait(timeout=5)
    assert tier.remove(make_key(0))
    assert not tier.contains(make_key(0)) and tier.used_bytes == 0
    release.set()
    tier.flush()
    assert kv_files(tmp_path) == [] and len(tier) == 0
    tier.close()


def test_put_and_prefetch_after_close_are_refused_not_lost(tmp_path):
    tier = DiskTier(tmp_path, 10 * ENTRY_SIZE)
    tier.close()
    key = make_key(1)
    assert tier.put(key, make_entry(key)) is False
    assert tier.get_async(key).result(timeout=5) is None
    tier.flush()  # nothing queued: returns at once
    tier.close()  # idempotent


def test_a_queued_delete_never_removes_a_later_put_of_the_same_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = DiskTier(tmp_path, 10 * ENTRY_SIZE, num_workers=2)
    key, entry = make_key("k"), make_entry(make_key("k"))
    put_all(tier, ["k"])
    path = tier._path_for(key)
    blockers = [make_key(f"blocker-{i}") for i in range(2)]
    started = {blocker: threading.Event() for blocker in blockers}
    release = threading.Event()
    real_write, real_unlink = tier._write, pathlib.Path.unlink

    def gated_write(written: CacheEngineKey, data: bytes, victims: list[CacheEngineKey]) -> None:
        if written in started:
            started[written].set()
            release.wait(timeout=5)
        real_write(written, data, victims)

    def slow_unlink(self: Path, missing_ok: bool = False) -> None:
        # The worst timing for a delete of the old file: it lands after the new file is indexed.
        if self == path:
            deadline = time.monotonic() + 5
            while key not in tier._index and time.monotonic() < deadline:
                time.sleep(0.005)
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(tier, "_write", gated_write)
    monkeypatch.setattr(pathlib.Path, "unlink", slow_unlink)
    for blocker in blockers:  # both workers busy: the delete and the re-put then run side by side
        tier.put(blocker, make_entry(blocker))
    assert all(event.wait(timeout=5) for event in started.values())
    assert tier.remove(key)
    assert tier.put(key, entry)
    release.set()
    tier.flush()
    assert path.exists()
    assert tier.get(key) == entry
    tier.close()


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")
def test_writer_threads_run_only_when_a_core_would_idle(tmp_path: Path):
    # At the engine's priority, disk writes stalled the forward pass's OpenMP team (see pagoda.kvstore.background).
    tier = DiskTier(tmp_path, capacity_bytes=1 << 20)
    try:
        key = make_key(0)
        assert tier.put(key, make_entry(key))
        tier.flush()
        workers = [t for t in threading.enumerate() if t.name.startswith("pagoda-kv-disk-")]
        assert workers and all(os.sched_getscheduler(t.native_id) == os.SCHED_IDLE for t in workers)
        assert os.sched_getscheduler(threading.get_native_id()) != os.SCHED_IDLE  # the caller keeps its own
    finally:
        tier.close()
