"""Distributed layer: a one-writer, N-reader broadcast queue in shared memory (`MessageQueue`).

The writer puts each message into the next chunk of a ring in one
`multiprocessing.shared_memory` segment; every reader reads every message,
in order. No lock is taken on the fast path: each chunk has a "written" byte
that only the writer sets and one "read" byte per reader that only that
reader sets. A chunk is free again once every reader has read it.

    segment:  [chunk 0 | chunk 1 | ... | chunk C-1]                 C x chunk_bytes
              [written, read_0 .. read_N-1] x C                      chunk flags
              [waiting_0 .. waiting_N-1] [closed] [pid_0 .. pid_N-1]  (int32 each)
    chunk:    [length: u32 little-endian][msgpack payload]  (length OVERFLOW: payload on the data socket)

A payload larger than a chunk still takes its place in the ring (so order is
kept) but travels over a ZMQ (X)PUB socket on a local ipc:// path; the
reader takes it from its SUB socket when it reaches that chunk.

Waiting: a reader first spins for `spin_s` (yielding the CPU on every turn),
then raises its "waiting" byte and blocks in poll() on its own named pipe
(FIFO), into which the writer puts one byte after a write, only for readers
that are waiting. A pipe rather than a ZMQ socket: one write() and one
wake-up, with no ZMQ I/O threads in between. Blocked readers wake at least every `_RECHECK_S`
to notice a closed queue or a dead writer. A writer whose next chunk is
still unread sleeps with backoff and names the late readers if it times out.

Readers on other machines (`num_remote_readers`, the Ray executor's
workers on other nodes) cannot map the segment: the writer also publishes
every message on a TCP (X)PUB socket, framed as kind + payload, and
`RemoteMessageQueueReader` takes them from a SUB socket in order. TCP gives
them no back-pressure from the ring (the writer may run ahead of them; the
executor's calls wait for answers, which bounds it) and no dead-writer
check by pid (the Ray executor's liveness covers both ends).

Messages are msgpack through msgspec, never pickle (bytes from another
process are decoded, not executed); readers decode into `msg_type`.

Memory ordering relied on. Writer: the payload (or overflow marker), then
the reader flags, then `_fence()`, then the written byte. Reader: the
flags, then `_fence()`, then the payload, then `_fence()`, then its read
byte. Each side's stores are plain memoryview writes, the flag byte written
after the payload. x86 keeps stores in order, loads in order, and a load
before a later store, so there the ring is correct without the fences;
they matter for the wake-up handshake (each side stores its own flag, then
loads the other's: the one reordering x86 allows), and a lock's atomic
instruction is a full barrier on x86. On weakly ordered CPUs the same
fences are the best plain Python offers; a wake-up lost to reordering
would cost at most `_RECHECK_S` of latency, never a message.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import struct
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import msgspec
import zmq

# A reader spins this long before it blocks: long enough to catch a message the writer is already putting in
# (an enqueue takes a few us), short enough to cost under 0.1% of a core at a 30 ms decode step. Measured on this
# 2-core machine (benchmarks/parallel.py): a blocked reader's wake-up adds some 30-50 us; a longer spin only
# catches messages that arrive within it, and during decode they arrive milliseconds apart, so it would burn
# the compute core for nothing (vLLM's 1 s window spins through all of decode).
DEFAULT_SPIN_S = 20e-6
DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_NUM_CHUNKS = 8
# A blocked side re-checks closed / dead-peer state this often, and a lost wake-up costs no more than this.
_RECHECK_S = 0.1
# The writer's sleep between looks at a chunk that is still being read: doubles up to the cap.
_BACKOFF_START_S = 20e-6
_BACKOFF_MAX_S = 1e-3
# Overflow payloads still queued for live readers when the writer closes get this long to leave.
_CLOSE_LINGER_MS = 1000
_HEADER = struct.Struct("<I")
_OVERFLOW = 0xFFFFFFFF
_PID = struct.Struct("<i")
_READY = b"ready"
# The first frame of each message on the remote socket: a payload, the ready signal, or the writer's close.
_REMOTE_MESSAGE, _REMOTE_READY, _REMOTE_CLOSED = b"m", b"r", b"c"
# Bytes drained from a wake-up FIFO at once; any number of wake-ups is one wake-up.
_WAKE_DRAIN_BYTES = 4096
_ENCODER = msgspec.msgpack.Encoder()

_fence_lock = threading.Lock()
_tracker_patch_lock = threading.Lock()


class MessageQueueTimeout(TimeoutError):
    """A side waited longer than its timeout (the message says for what and for whom)."""


class MessageQueueClosed(RuntimeError):
    """The queue can no longer deliver: closed, cancelled, or the other side died."""


class MessageQueueHandle(msgspec.Struct, frozen=True):
    """Everything another process needs to attach as a reader (msgspec-encodable and picklable)."""

    shm_name: str
    num_readers: int
    chunk_bytes: int
    num_chunks: int
    ipc_dir: str  # holds the overflow socket ("data") and one wake-up FIFO per reader ("wake-<rank>")
    writer_pid: int
    # tcp://host:port of the socket readers on other machines subscribe to (None: there are none).
    remote_address: str | None = None
    num_remote_readers: int = 0


def _fence() -> None:
    # A lock's acquire and release are atomic read-modify-writes: a full barrier on x86 (see the module docstring).
    _fence_lock.acquire()
    _fence_lock.release()


def _deadline(timeout: float | None) -> float:
    return float("inf") if timeout is None else time.monotonic() + timeout


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a dead child its parent has not reaped yet still answers kill(0)
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _attach_untracked(name: str) -> shared_memory.SharedMemory:
    """Opens an existing segment without registering it with this process's resource tracker.

    Before Python 3.13 attaching registers the segment too, and the tracker then unlinks it (or warns) when
    this reader exits; only the writer may own it.
    """
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name, track=False)
    with _tracker_patch_lock:
        register = resource_tracker.register
        resource_tracker.register = lambda *args, **kwargs: None
        try:
            return shared_memory.SharedMemory(name)
        finally:
            resource_tracker.register = register


class _Layout:
    """Byte offsets inside the segment."""

    def __init__(self, num_readers: int, chunk_bytes: int, num_chunks: int) -> None:
        if num_readers < 0:
            raise ValueError(f"num_readers must not be negative, got {num_readers}")
        if not _HEADER.size < chunk_bytes < _OVERFLOW:
            raise ValueError(f"chunk_bytes must be in ({_HEADER.size}, {_OVERFLOW}), got {chunk_bytes}")
        if num_chunks < 1:
            raise ValueError(f"num_chunks must be at least 1, got {num_chunks}")
        self.num_readers = num_readers
        self.chunk_bytes = chunk_bytes
        self.num_chunks = num_chunks
        self.max_inline = chunk_bytes - _HEADER.size
        self.flags = num_chunks * chunk_bytes
        self.flags_stride = 1 + num_readers
        self.waiting = self.flags + num_chunks * self.flags_stride
        self.closed = self.waiting + num_readers
        self.pids = self.closed + 1
        self.size = self.pids + num_readers * _PID.size

    def chunk_flags(self, index: int) -> int:
        return self.flags + index * self.flags_stride


class MessageQueue:
    """The writer: `enqueue(obj)` broadcasts to `num_readers` readers attached with `MessageQueueReader`
    and `num_remote_readers` attached with `RemoteMessageQueueReader` through `remote_host`.

    Every reader receives every message once, in enqueue order, whether it went through the ring or the
    overflow socket. The writer never gets more than `num_chunks` messages ahead of its slowest reader.
    Each side is used by one thread at a time; only `cancel()` may come from another.
    """

    def __init__(self, num_readers: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 num_chunks: int = DEFAULT_NUM_CHUNKS, spin_s: float = DEFAULT_SPIN_S,
                 num_remote_readers: int = 0, remote_host: str = "127.0.0.1") -> None:
        if num_remote_readers < 0 or num_readers + num_remote_readers < 1:
            raise ValueError(f"a queue needs at least one reader, got {num_readers} local and "
                             f"{num_remote_readers} remote")
        self._layout = layout = _Layout(num_readers, chunk_bytes, num_chunks)
        self._spin_s = spin_s
        self._shm = shared_memory.SharedMemory(create=True, size=layout.size)
        self._buf = self._shm.buf
        self._buf[layout.flags:layout.size] = bytes(layout.size - layout.flags)
        self._ipc_dir = tempfile.mkdtemp(prefix="pagoda-mq-")
        for rank in range(num_readers):
            os.mkfifo(_wake_path(self._ipc_dir, rank))
        self._wake_fds: list[int] = []  # opened once every reader has opened its end (wait_for_readers)
        self._context: zmq.Context = zmq.Context()
        # XPUB rather than PUB: the writer sees each reader's subscription, which is how it knows who attached.
        self._data = self._context.socket(zmq.XPUB)
        self._data.setsockopt(zmq.XPUB_VERBOSE, 1)
        self._data.setsockopt(zmq.SNDHWM, 0)  # never drop a payload; the ring bounds how many are queued
        self._data.bind(_data_address(self._ipc_dir))
        self._num_remote_readers = num_remote_readers
        self._remote: zmq.Socket | None = None
        remote_address = None
        if num_remote_readers:
            self._remote = self._context.socket(zmq.XPUB)
            self._remote.setsockopt(zmq.XPUB_VERBOSE, 1)
            self._remote.setsockopt(zmq.SNDHWM, 0)
            port = self._remote.bind_to_random_port(f"tcp://{remote_host}")
            remote_address = f"tcp://{remote_host}:{port}"
        # Also run if the writer is dropped unclosed: the readers learn it is gone either way.
        self._finalizer = weakref.finalize(self, _release_writer, self._shm, layout.closed, self._context,
                                           self._wake_fds, self._ipc_dir, self._remote)
        self.handle = MessageQueueHandle(
            shm_name=self._shm.name, num_readers=num_readers, chunk_bytes=chunk_bytes, num_chunks=num_chunks,
            ipc_dir=self._ipc_dir, writer_pid=os.getpid(), remote_address=remote_address,
            num_remote_readers=num_remote_readers)
        self._index = 0
        self._num_subscribed = 0
        self._num_remote_subscribed = 0
        self._ready = False
        self._cancelled = False
        self._zero_flags = bytes(num_readers)
        self._all_read = b"\x01" * num_readers

    def wait_for_readers(self, timeout: float | None = None) -> None:
        """Blocks until all readers have attached (the first `enqueue` calls it); idempotent."""
        deadline = _deadline(timeout)
        wanted = self._layout.num_readers
        poller = zmq.Poller()
        poller.register(self._data, zmq.POLLIN)
        if self._remote is not None:
            poller.register(self._remote, zmq.POLLIN)
        while not self._ready:
            if self._num_subscribed >= wanted and self._num_remote_subscribed >= self._num_remote_readers:
                # A reader opens its FIFO before it subscribes, so these opens find a reading end.
                for rank in range(len(self._wake_fds), wanted):
                    try:
                        self._wake_fds.append(os.open(_wake_path(self._ipc_dir, rank), os.O_WRONLY | os.O_NONBLOCK))
                    except OSError as exc:  # ENXIO: nobody holds the reading end
                        raise MessageQueueClosed(f"reader {rank} left before all readers attached") from exc
                # Sent only now, when every reader is subscribed, so no reader can miss it or what follows.
                self._data.send(_READY)
                if self._remote is not None:
                    self._remote.send(_REMOTE_READY)
                self._ready = True
                return
            self._check_usable()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                remote = (f" and {self._num_remote_subscribed} of {self._num_remote_readers} remote"
                          if self._num_remote_readers else "")
                raise MessageQueueTimeout(f"only {self._num_subscribed} of {wanted}{remote} readers attached "
                                          f"within {timeout} s")
            # XPUB_VERBOSE delivers every (un)subscription: b"\x01" + topic, or b"\x00" + topic.
            for socket, _ in poller.poll(min(remaining, _RECHECK_S) * 1000):
                if socket.recv()[:1] == b"\x01":
                    if socket is self._data:
                        self._num_subscribed += 1
                    else:
                        self._num_remote_subscribed += 1

    def enqueue(self, obj: Any, timeout: float | None = None) -> None:
        """Broadcasts `obj` (anything msgspec's msgpack encodes); raises on timeout, cancel or a dead reader."""
        deadline = _deadline(timeout)
        self._check_usable()
        if not self._ready:
            self.wait_for_readers(timeout)
        payload = _ENCODER.encode(obj)
        layout, buf = self._layout, self._buf
        flags = layout.chunk_flags(self._index)
        self._wait_for_free_chunk(flags, deadline, timeout)
        start = self._index * layout.chunk_bytes
        buf[flags] = 0
        overflow = len(payload) > layout.max_inline
        if overflow:
            _HEADER.pack_into(buf, start, _OVERFLOW)
        else:
            _HEADER.pack_into(buf, start, len(payload))
            buf[start + _HEADER.size:start + _HEADER.size + len(payload)] = payload
        buf[flags + 1:flags + layout.flags_stride] = self._zero_flags
        _fence()  # everything above is visible before the written byte
        buf[flags] = 1
        if overflow:
            # After the marker: a reader that sees the marker waits for this; the socket keeps the order.
            self._data.send(payload, copy=False)
        if self._remote is not None:
            self._remote.send_multipart((_REMOTE_MESSAGE, payload), copy=False)
        _fence()  # the written byte is visible before we look at who is waiting
        if buf[layout.waiting:layout.waiting + layout.num_readers] != self._zero_flags:
            for rank in range(layout.num_readers):
                if buf[layout.waiting + rank]:
                    _wake(self._wake_fds[rank])
        self._index = (self._index + 1) % layout.num_chunks

    def _wait_for_free_chunk(self, flags: int, deadline: float, timeout: float | None) -> None:
        buf, stride = self._buf, self._layout.flags_stride
        spin_end = time.monotonic() + self._spin_s
        sleep_s, next_check = _BACKOFF_START_S, time.monotonic() + _RECHECK_S
        while buf[flags] and buf[flags + 1:flags + stride] != self._all_read:
            now = time.monotonic()
            if now < spin_end:
                os.sched_yield()
                continue
            if now >= next_check or now >= deadline:
                late = [rank for rank in range(self._layout.num_readers) if not buf[flags + 1 + rank]]
                self._check_usable(late)
                if now >= deadline:
                    raise MessageQueueTimeout(f"no free chunk within {timeout} s: reader(s) {late} have not read "
                                              f"the message enqueued {self._layout.num_chunks} messages ago")
                next_check = now + _RECHECK_S
            time.sleep(sleep_s)
            sleep_s = min(2 * sleep_s, _BACKOFF_MAX_S)

    def _check_usable(self, late_readers: Sequence[int] = ()) -> None:
        if not self._finalizer.alive:
            raise MessageQueueClosed("the message queue is closed")
        if self._cancelled:
            raise MessageQueueClosed("the message queue was cancelled")
        for rank in late_readers:
            (pid,) = _PID.unpack_from(self._buf, self._layout.pids + rank * _PID.size)
            if pid and not _process_alive(pid):
                raise MessageQueueClosed(f"reader {rank} (pid {pid}) died")

    def cancel(self) -> None:
        """Makes a blocked or later `enqueue` raise `MessageQueueClosed`; safe from any thread."""
        self._cancelled = True

    def close(self) -> None:
        """Tells the readers (their `dequeue` raises once the ring is drained) and unlinks the segment."""
        self._buf = None
        self._finalizer()

    def __enter__(self) -> MessageQueue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _data_address(ipc_dir: str) -> str:
    return f"ipc://{ipc_dir}/data"


def _wake_path(ipc_dir: str, rank: int) -> str:
    return os.path.join(ipc_dir, f"wake-{rank}")


def _wake(fd: int) -> None:
    # A full pipe wakes its reader anyway; a broken one has no reader left: neither is an error.
    with contextlib.suppress(BlockingIOError, BrokenPipeError):
        os.write(fd, b"\x00")


def _release_writer(shm: shared_memory.SharedMemory, closed_offset: int, context: zmq.Context,
                    wake_fds: list[int], ipc_dir: str, remote: zmq.Socket | None) -> None:
    shm.buf[closed_offset] = 1
    _fence()
    for fd in wake_fds:
        _wake(fd)
        os.close(fd)
    if remote is not None:
        with contextlib.suppress(zmq.ZMQError):
            remote.send(_REMOTE_CLOSED)
    context.destroy(linger=_CLOSE_LINGER_MS)
    shm.close()
    shm.unlink()
    shutil.rmtree(ipc_dir, ignore_errors=True)


class MessageQueueReader:
    """Reader `reader_rank` of the queue described by `handle`; `dequeue()` returns messages in order.

    `msg_type` is what msgspec decodes each message into (a Struct, a tagged union of Structs, `bytes`, ...);
    with the default `Any`, Structs arrive as dicts and tuples as lists.
    """

    def __init__(self, handle: MessageQueueHandle, reader_rank: int, msg_type: Any = Any,
                 spin_s: float = DEFAULT_SPIN_S) -> None:
        if not 0 <= reader_rank < handle.num_readers:
            raise ValueError(f"reader_rank must be in [0, {handle.num_readers}), got {reader_rank}")
        self._layout = layout = _Layout(handle.num_readers, handle.chunk_bytes, handle.num_chunks)
        self._rank = reader_rank
        self._writer_pid = handle.writer_pid
        self._ipc_dir = handle.ipc_dir
        self._spin_s = spin_s
        self._decoder = msgspec.msgpack.Decoder(msg_type)
        self._shm = _attach_untracked(handle.shm_name)
        self._buf = self._shm.buf
        pid_offset = layout.pids + reader_rank * _PID.size
        (pid,) = _PID.unpack_from(self._buf, pid_offset)
        if pid and pid != os.getpid() and _process_alive(pid):
            self._buf = None
            self._shm.close()
            raise ValueError(f"reader_rank {reader_rank} is already attached by pid {pid}")
        _PID.pack_into(self._buf, pid_offset, os.getpid())
        wake_path = _wake_path(handle.ipc_dir, reader_rank)
        self._wake_rx = os.open(wake_path, os.O_RDONLY | os.O_NONBLOCK)
        # Our own writing end: cancel() wakes us through it, and with it open poll() never reports a hang-up.
        self._wake_tx = os.open(wake_path, os.O_WRONLY | os.O_NONBLOCK)
        self._wake_poll = select.poll()
        self._wake_poll.register(self._wake_rx, select.POLLIN)
        self._cancelled = False
        self._context: zmq.Context = zmq.Context()
        self._data = self._context.socket(zmq.SUB)
        self._data.setsockopt(zmq.RCVHWM, 0)
        self._data.setsockopt(zmq.SUBSCRIBE, b"")
        self._data.connect(_data_address(handle.ipc_dir))
        self._data_poller = zmq.Poller()
        self._data_poller.register(self._data, zmq.POLLIN)
        self._data_poller.register(self._wake_rx, zmq.POLLIN)
        self._finalizer = weakref.finalize(self, _release_reader, self._shm, self._context,
                                           (self._wake_rx, self._wake_tx))
        self._index = 0
        self._ready = False

    def dequeue(self, timeout: float | None = None) -> Any:
        """The next message; raises `MessageQueueTimeout` (nothing consumed) or `MessageQueueClosed`."""
        deadline = _deadline(timeout)
        if self._buf is None:
            raise MessageQueueClosed(f"reader {self._rank} is closed")
        self._check_usable(closed=False, writer=False)
        if not self._ready:
            self._recv_data(deadline, timeout, "ready signal from the writer", closed_is_final=True)
            self._ready = True
        layout, buf = self._layout, self._buf
        flags = layout.chunk_flags(self._index)
        if not self._readable(flags):
            self._wait_readable(flags, deadline, timeout)
        _fence()  # the payload is read only after the flags said it is there
        start = self._index * layout.chunk_bytes
        (length,) = _HEADER.unpack_from(buf, start)
        if length == _OVERFLOW:
            # A closed queue still delivers this: the writer sent it before closing, and it is on its way.
            frame = self._recv_data(deadline, timeout, "overflow payload", closed_is_final=False)
            try:
                return self._decoder.decode(frame.buffer)
            finally:
                self._consume(flags)
        try:
            with buf[start + _HEADER.size:start + _HEADER.size + length] as view:
                return self._decoder.decode(view)
        finally:
            self._consume(flags)

    def _readable(self, flags: int) -> bool:
        return self._buf[flags] == 1 and self._buf[flags + 1 + self._rank] == 0

    def _consume(self, flags: int) -> None:
        # Even a message that failed to decode is consumed: the next dequeue moves on instead of failing again.
        _fence()
        self._buf[flags + 1 + self._rank] = 1
        self._index = (self._index + 1) % self._layout.num_chunks

    def _wait_readable(self, flags: int, deadline: float, timeout: float | None) -> None:
        spin_end = time.monotonic() + self._spin_s
        while time.monotonic() < spin_end:
            if self._readable(flags):
                return
            os.sched_yield()
        waiting = self._layout.waiting + self._rank
        self._buf[waiting] = 1
        _fence()  # the writer sees us waiting before we look at the flags one last time
        try:
            woken = True
            while not self._readable(flags):
                # A dead writer is looked for only after a wait that nothing cut short: that look reads /proc.
                self._check_usable(closed=True, writer=not woken)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MessageQueueTimeout(f"reader {self._rank}: no message within {timeout} s")
                woken = bool(self._wake_poll.poll(min(remaining, _RECHECK_S) * 1000))
                if woken:
                    self._drain_wake_ups()
        finally:
            self._buf[waiting] = 0

    def _recv_data(self, deadline: float, timeout: float | None, what: str, closed_is_final: bool) -> zmq.Frame:
        while True:
            try:
                return self._data.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                pass
            self._check_usable(closed=closed_is_final, writer=True)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MessageQueueTimeout(f"reader {self._rank}: no {what} within {timeout} s")
            if self._wake_rx in dict(self._data_poller.poll(min(remaining, _RECHECK_S) * 1000)):
                self._drain_wake_ups()

    def _drain_wake_ups(self) -> None:
        try:
            while os.read(self._wake_rx, _WAKE_DRAIN_BYTES):
                pass
        except BlockingIOError:
            pass

    def _check_usable(self, closed: bool, writer: bool) -> None:
        if self._cancelled:
            raise MessageQueueClosed(f"reader {self._rank} was cancelled")
        if closed and self._buf[self._layout.closed]:
            raise MessageQueueClosed("the writer closed the message queue")
        if writer and not _process_alive(self._writer_pid):
            # A killed writer could not remove its socket and FIFOs; its shared memory is its resource tracker's.
            shutil.rmtree(self._ipc_dir, ignore_errors=True)
            raise MessageQueueClosed(f"the writer (pid {self._writer_pid}) died")

    def cancel(self) -> None:
        """Makes a blocked or later `dequeue` raise `MessageQueueClosed`; safe from any thread."""
        self._cancelled = True
        _wake(self._wake_tx)

    def close(self) -> None:
        """Detaches from the segment (never unlinks it: the writer owns it)."""
        if self._finalizer.alive:
            self._buf = None
            self._finalizer()

    def __enter__(self) -> MessageQueueReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _release_reader(shm: shared_memory.SharedMemory, context: zmq.Context, wake_fds: tuple[int, int]) -> None:
    for fd in wake_fds:
        os.close(fd)
    context.destroy(linger=0)
    shm.close()


class RemoteMessageQueueReader:
    """A reader on another machine: the same messages in the same order, from the writer's TCP socket.

    `remote_index` only names the reader in errors; the writer counts remote readers, it does not tell them
    apart. Used by one thread at a time; only `cancel()` may come from another.
    """

    def __init__(self, handle: MessageQueueHandle, remote_index: int = 0, msg_type: Any = Any) -> None:
        if handle.remote_address is None:
            raise ValueError("this queue has no remote readers (its writer opened no TCP socket)")
        if not 0 <= remote_index < handle.num_remote_readers:
            raise ValueError(f"remote_index must be in [0, {handle.num_remote_readers}), got {remote_index}")
        self._name = f"remote reader {remote_index}"
        self._decoder = msgspec.msgpack.Decoder(msg_type)
        self._context: zmq.Context = zmq.Context()
        self._data = self._context.socket(zmq.SUB)
        self._data.setsockopt(zmq.RCVHWM, 0)
        self._data.setsockopt(zmq.SUBSCRIBE, b"")
        self._data.connect(handle.remote_address)
        # cancel() writes to this pipe: a ZMQ socket may not be touched from a second thread.
        self._cancel_rx, self._cancel_tx = os.pipe()
        os.set_blocking(self._cancel_tx, False)
        self._poller = zmq.Poller()
        self._poller.register(self._data, zmq.POLLIN)
        self._poller.register(self._cancel_rx, zmq.POLLIN)
        self._cancelled = False
        self._closed = False
        self._finalizer = weakref.finalize(self, _release_remote_reader, self._context,
                                           (self._cancel_rx, self._cancel_tx))

    def dequeue(self, timeout: float | None = None) -> Any:
        """The next message; raises `MessageQueueTimeout` (nothing consumed) or `MessageQueueClosed`."""
        deadline = _deadline(timeout)
        while True:
            if self._cancelled:
                raise MessageQueueClosed(f"{self._name} was cancelled")
            if self._closed or not self._finalizer.alive:
                raise MessageQueueClosed("the writer closed the message queue")
            try:
                kind, *payload = self._data.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MessageQueueTimeout(f"{self._name}: no message within {timeout} s") from None
                self._poller.poll(min(remaining, _RECHECK_S) * 1000)
                continue
            if kind.bytes == _REMOTE_MESSAGE:
                return self._decoder.decode(payload[0].buffer)
            if kind.bytes == _REMOTE_CLOSED:
                self._closed = True

    def cancel(self) -> None:
        """Makes a blocked or later `dequeue` raise `MessageQueueClosed`; safe from any thread."""
        self._cancelled = True
        _wake(self._cancel_tx)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> RemoteMessageQueueReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _release_remote_reader(context: zmq.Context, fds: tuple[int, int]) -> None:
    for fd in fds:
        os.close(fd)
    context.destroy(linger=0)


AnyReader = MessageQueueReader | RemoteMessageQueueReader


def open_reader(handle: MessageQueueHandle, local_rank: int | None, msg_type: Any = Any,
                remote_index: int = 0) -> AnyReader:
    """Attach as local reader `local_rank` through shared memory, or (None) as a remote one through TCP."""
    if local_rank is None:
        return RemoteMessageQueueReader(handle, remote_index, msg_type=msg_type)
    return MessageQueueReader(handle, local_rank, msg_type=msg_type)
