"""KV store layer: the local disk tier, one file per entry, written on a prioritized thread pool.

Background work runs in priority order prefetch > delete > put: a read that a
request waits for must not queue behind bulk saves, and deletes free space
that puts need. A queued put is served from memory until its file lands, and
is never evicted meanwhile (a put finding the budget held by queued writes is
refused, not queued behind them). The byte budget is a hard limit: victims' files
are unlinked by the put's own task before the new file is written.

Files are self-describing (the header holds the key), so the index is
rebuilt from the directory on restart and KV survives the process. Storage
faults (disk full, permission denied, a missing directory) drop the put with
one logged warning. A file whose header is wrong is deleted and counted when
the index is rebuilt; full checks happen once per read, in the storage
manager, which removes an entry that fails them.

A reader (`reader=True`) follows a folder another process writes (the saving
rank of a tensor-parallel world whose ranks hold the same KV): it keeps no
index, since the writer adds files after it started, and looks each key's
file up on disk; it never writes, evicts or deletes anything there.

Every unlink of an entry's file happens under the lock and only while the
key is neither indexed nor queued, so a delete or eviction still queued when
the same key is put again can never remove the new file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from enum import IntEnum
from itertools import count
from pathlib import Path
from queue import PriorityQueue

from pagoda.kvstore.background import lower_current_thread_priority
from pagoda.kvstore.entry import CorruptEntryError, peek_entry_key
from pagoda.kvstore.keys import CacheEngineKey
from pagoda.kvstore.policies import make_policy
from pagoda.kvstore.tiers.base import StorageTier

logger = logging.getLogger(__name__)

_SUFFIX = ".kv"
# Enough for the fixed header and any realistic key; the rest of the file is not needed to index it.
_INDEX_READ_BYTES = 4096


class Priority(IntEnum):
    PREFETCH = 0
    DELETE = 1
    PUT = 2
    STOP = 3  # after everything queued before it


class DiskTier(StorageTier):
    name = "disk"
    is_local = True
    supports_async_put = True

    def __init__(
        self, directory: str | os.PathLike[str], capacity_bytes: int, policy: str = "lru", num_workers: int = 2,
        reader: bool = False,
    ) -> None:
        super().__init__()
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.directory = Path(directory)
        self.capacity_bytes = capacity_bytes
        self._policy = make_policy(policy)
        self._index: dict[CacheEngineKey, int] = {}  # entries on disk -> file size
        self._pending: dict[CacheEngineKey, bytes] = {}  # puts queued or being written
        self._used_bytes = 0  # indexed plus pending: what the budget bounds
        self._lock = threading.Lock()
        self._closed = False
        self._warned = False
        self._queue: PriorityQueue[tuple[int, int, Callable[[], None] | None]] = PriorityQueue()
        self._seq = count()  # FIFO among equal priorities
        self.reader = reader
        self._usable = self._prepare_directory()
        if self._usable and not reader:
            self._rebuild_index()
        self._workers = [
            threading.Thread(target=self._work, name=f"pagoda-kv-disk-{i}", daemon=True) for i in range(num_workers)
        ]
        for worker in self._workers:
            worker.start()

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    def __len__(self) -> int:
        return len(self._index) + len(self._pending)

    def contains(self, key: CacheEngineKey) -> bool:
        if self.reader:
            return self._path_for(key).exists()
        return key in self._index or key in self._pending

    def get(self, key: CacheEngineKey) -> bytes | None:
        if self.reader:
            try:
                return self._path_for(key).read_bytes()
            except OSError:  # not written yet, or evicted by the writer: a miss
                return None
        with self._lock:
            if key in self._pending:
                self._policy.on_access(key)
                return self._pending[key]
            if key not in self._index:
                return None
            self._policy.on_access(key)
        try:
            return self._path_for(key).read_bytes()
        except OSError:
            self._forget(key)  # deleted or unreadable behind our back: a miss
            return None

    def get_async(self, key: CacheEngineKey) -> Future[bytes | None]:
        """Read ahead of need, before every queued delete and put; the bytes are unchecked, like `get`'s."""
        future: Future[bytes | None] = Future()

        def prefetch() -> None:
            try:
                future.set_result(self.get(key))
            except Exception as exc:  # the waiter must learn of any failure, or it waits forever
                future.set_exception(exc)

        if self._closed:
            future.set_result(None)
        else:
            self._submit(Priority.PREFETCH, prefetch)
        return future

    def put(self, key: CacheEngineKey, entry: bytes) -> bool:
        if self.reader:
            raise RuntimeError(f"the disk tier on {self.directory} only reads a folder another process writes")
        with self._lock:
            if key in self._index or key in self._pending:
                self._policy.on_put(key)
                return True
            # After close() no worker would write it: refuse rather than lose it silently.
            victims = self._reserve(len(entry)) if self._usable and not self._closed else None
            if victims is None:
                self.metrics.failed_puts += 1
                return False
            self._pending[key] = entry
            self._used_bytes += len(entry)
            self._policy.on_put(key)
        self._submit(Priority.PUT, lambda: self._write(key, entry, victims))
        return True

    def remove(self, key: CacheEngineKey) -> bool:
        if self.reader:
            return False  # the writer owns the folder's files
        with self._lock:
            if key in self._pending:
                # The writer sees the key gone and deletes the file it just wrote.
                self._used_bytes -= len(self._pending.pop(key))
            elif key in self._index:
                self._used_bytes -= self._index.pop(key)
                self._submit(Priority.DELETE, lambda: self._unlink_unless_stored(key))
            else:
                return False
            self._policy.on_remove(key)
            return True

    def flush(self) -> None:
        """Wait until every queued task has run."""
        self._queue.join()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _ in self._workers:
            self._submit(Priority.STOP, None)
        for worker in self._workers:
            worker.join()

    def _path_for(self, key: CacheEngineKey) -> Path:
        # A digest of the key, not the key: model ids contain "/" and keys can be long.
        return self.directory / (hashlib.blake2b(key.to_bytes(), digest_size=16).hexdigest() + _SUFFIX)

    def _reserve(self, num_bytes: int) -> list[CacheEngineKey] | None:
        """Take victims out of the index so `num_bytes` fit; None (and no change) when impossible."""
        needed = self._used_bytes + num_bytes - self.capacity_bytes
        if needed <= 0:
            return []
        if num_bytes > self.capacity_bytes:
            return None
        victims = self._policy.choose_victims(needed, self._index.__getitem__, self._index.__contains__)
        if sum(self._index[key] for key in victims) < needed:
            return None
        for key in victims:
            self._used_bytes -= self._index.pop(key)
            self._policy.on_remove(key)
            self.metrics.evictions += 1
        return victims

    def _write(self, key: CacheEngineKey, entry: bytes, victims: list[CacheEngineKey]) -> None:
        path = self._path_for(key)
        tmp_path = path.with_suffix(".tmp")
        try:
            for victim in victims:
                self._unlink_unless_stored(victim)
            tmp_path.write_bytes(entry)
            os.replace(tmp_path, path)  # atomic: a crash leaves no half-written entry under a real name
        except OSError as exc:
            self._warn_once(f"KV disk tier: cannot write to {self.directory} ({exc}); entries are dropped")
            with contextlib.suppress(OSError):
                tmp_path.unlink(missing_ok=True)
            with self._lock:
                self.metrics.failed_puts += 1
                if self._pending.get(key) is entry:
                    del self._pending[key]
                    self._used_bytes -= len(entry)
                    self._policy.on_remove(key)
            self._unlink_unless_stored(key)  # a delete skipped while this put was queued left the older file
            return
        with self._lock:
            # Identity, not presence: the key may have been removed and put again while this write ran.
            if self._pending.get(key) is entry:
                del self._pending[key]
                self._index[key] = len(entry)
                return
        self._unlink_unless_stored(key)  # removed while being written

    def _unlink_unless_stored(self, key: CacheEngineKey) -> None:
        """Delete the key's file unless the key is indexed or queued again (then the file is, or will be, its own)."""
        with self._lock:
            if key in self._index or key in self._pending:
                return
            try:
                self._path_for(key).unlink(missing_ok=True)
            except OSError as exc:
                self._warn_once(f"KV disk tier: cannot delete files in {self.directory} ({exc})")

    def _forget(self, key: CacheEngineKey) -> None:
        with self._lock:
            if key in self._index:
                self._used_bytes -= self._index.pop(key)
                self._policy.on_remove(key)

    def _prepare_directory(self) -> bool:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._warn_once(f"KV disk tier: cannot use {self.directory} ({exc}); the tier stays empty")
            return False
        return True

    def _rebuild_index(self) -> None:
        """Index the files a previous process left, oldest first so the policy keeps their age order."""
        for tmp_path in self.directory.glob("*.tmp"):
            tmp_path.unlink(missing_ok=True)  # an interrupted write
        paths = sorted(self.directory.glob("*" + _SUFFIX), key=lambda path: path.stat().st_mtime)
        for path in paths:
            try:
                with path.open("rb") as file:
                    key, size = peek_entry_key(file.read(_INDEX_READ_BYTES))
                if size != path.stat().st_size or self._path_for(key) != path:
                    raise CorruptEntryError(f"{path.name} does not hold the entry its header describes")
            except OSError:
                continue  # unreadable or gone: neither indexed nor counted as corrupt
            except CorruptEntryError as exc:
                logger.warning("KV disk tier: dropping corrupt file %s: %s", path, exc)
                self.metrics.corrupt_dropped += 1
                path.unlink(missing_ok=True)
                continue
            victims = self._reserve(size)
            if victims is None:
                path.unlink(missing_ok=True)
                continue
            for victim in victims:
                self._path_for(victim).unlink(missing_ok=True)
            self._index[key] = size
            self._used_bytes += size
            self._policy.on_put(key)

    def _submit(self, priority: Priority, task: Callable[[], None] | None) -> None:
        self._queue.put((priority, next(self._seq), task))

    def _work(self) -> None:
        lower_current_thread_priority()  # writes and deletes must not slow the engine's compute
        while True:
            _, _, task = self._queue.get()
            try:
                if task is None:
                    return
                task()
            except Exception:  # a worker must survive any single task; the entry is then a miss
                logger.exception("KV disk tier: background task failed")
            finally:
                self._queue.task_done()

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(message)
