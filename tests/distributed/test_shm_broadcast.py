"""The shared-memory broadcast queue: order and content under stress, time-outs, shutdown, no leaked segments."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec
import pytest

from pagoda.core.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput
from pagoda.distributed.shm_broadcast import (
    MessageQueue,
    MessageQueueClosed,
    MessageQueueHandle,
    MessageQueueReader,
    MessageQueueTimeout,
    RemoteMessageQueueReader,
    open_reader,
)
from pagoda.sampling_params import SamplingParams

SPAWN = multiprocessing.get_context("spawn")
CHUNK_BYTES = 16 << 10
# msgpack's bin header is 2 bytes under 256 B, 3 under 64 KiB, 5 above; the ring's header is 4 more.
LARGEST_INLINE_BYTES = CHUNK_BYTES - 4 - 3


def segment_exists(handle: MessageQueueHandle) -> bool:
    return Path("/dev/shm", handle.shm_name.lstrip("/")).exists()


def message_sizes(count: int, seed: int) -> list[int]:
    """Sizes across the chunk size: the edges exactly, mostly small, a few of several MiB."""
    rng = random.Random(seed)
    edges = [0, 1, LARGEST_INLINE_BYTES - 1, LARGEST_INLINE_BYTES, LARGEST_INLINE_BYTES + 1, 4 << 20]
    sizes = []
    for index in range(count):
        roll = rng.random()
        if index < len(edges):
            sizes.append(edges[index])
        elif roll < 0.6:
            sizes.append(rng.randrange(0, 512))
        elif roll < 0.985:
            sizes.append(rng.randrange(0, 3 * CHUNK_BYTES))
        else:
            sizes.append(rng.randrange(3 * CHUNK_BYTES, 5 << 20))
    return sizes


def stress_reader(handle: MessageQueueHandle, rank: int, count: int, seed: int, results,
                  remote: bool = False) -> None:
    """Reader `rank` (local, or the rank - num_readers'th remote one through TCP) digests every message."""
    rng = random.Random(seed + 1000 + rank)
    digests = []
    local_rank = None if remote else rank
    with open_reader(handle, local_rank, msg_type=bytes, remote_index=rank - handle.num_readers) as reader:
        for _ in range(count):
            digests.append(hashlib.blake2b(reader.dequeue(timeout=30)).digest())
            if rng.random() < 0.02:  # now and then a slow reader, so the ring fills up
                time.sleep(rng.random() * 0.003)
    results.put((rank, digests))


@pytest.mark.parametrize("num_readers", [1, 2, 3])
def test_every_reader_gets_every_message_in_order(num_readers: int) -> None:
    count, seed = 2000, 13 + num_readers
    sizes = message_sizes(count, seed)
    rng = random.Random(seed)
    results = SPAWN.Queue()
    with MessageQueue(num_readers, chunk_bytes=CHUNK_BYTES, num_chunks=4) as queue:
        readers = [SPAWN.Process(target=stress_reader, args=(queue.handle, rank, count, seed, results))
                   for rank in range(num_readers)]
        for process in readers:
            process.start()
        expected = []
        for size in sizes:
            payload = rng.randbytes(size)
            expected.append(hashlib.blake2b(payload).digest())
            queue.enqueue(payload, timeout=30)
            if rng.random() < 0.02:  # and a writer that pauses, so the ring drains
                time.sleep(rng.random() * 0.003)
        received = dict(results.get(timeout=60) for _ in readers)
        for process in readers:
            process.join(10)
            assert process.exitcode == 0
    assert sorted(received) == list(range(num_readers))
    for rank, digests in received.items():
        assert digests == expected, f"reader {rank} got a message wrong or out of order"
    assert not segment_exists(queue.handle)


@pytest.mark.parametrize(("num_local", "num_remote"), [(0, 1), (1, 2)])
def test_remote_readers_get_every_message_in_order_beside_local_ones(num_local: int, num_remote: int) -> None:
    count, seed = 1500, 41 + num_remote
    sizes = message_sizes(count, seed)
    rng = random.Random(seed)
    results = SPAWN.Queue()
    with MessageQueue(num_local, chunk_bytes=CHUNK_BYTES, num_chunks=4, num_remote_readers=num_remote) as queue:
        assert queue.handle.remote_address is not None
        assert queue.handle.remote_address.startswith("tcp://127.0.0.1:")
        readers = [SPAWN.Process(target=stress_reader,
                                 args=(queue.handle, rank, count, seed, results, rank >= num_local))
                   for rank in range(num_local + num_remote)]
        for process in readers:
            process.start()
        expected = []
        for size in sizes:
            payload = rng.randbytes(size)
            expected.append(hashlib.blake2b(payload).digest())
            queue.enqueue(payload, timeout=30)
        received = dict(results.get(timeout=60) for _ in readers)
        for process in readers:
            process.join(10)
            assert process.exitcode == 0
    assert sorted(received) == list(range(num_local + num_remote))
    for rank, digests in received.items():
        assert digests == expected, f"reader {rank} got a message wrong or out of order"
    assert not segment_exists(queue.handle)


def test_remote_reader_times_out_is_cancelled_and_learns_of_close() -> None:
    queue = MessageQueue(0, num_remote_readers=1)
    reader = RemoteMessageQueueReader(queue.handle, 0, msg_type=int)
    queue.wait_for_readers(timeout=10)
    started = time.monotonic()
    with pytest.raises(MessageQueueTimeout, match="remote reader 0: no message within 0.2 s"):
        reader.dequeue(timeout=0.2)
    assert time.monotonic() - started < 2
    queue.enqueue(7)
    queue.enqueue(8)
    assert reader.dequeue(timeout=5) == 7
    queue.close()  # a message sent before close is still delivered, then the close
    assert reader.dequeue(timeout=5) == 8
    with pytest.raises(MessageQueueClosed, match="closed"):
        reader.dequeue(timeout=5)
    reader.close()

    with MessageQueue(0, num_remote_readers=1) as queue, \
            RemoteMessageQueueReader(queue.handle, 0) as reader:
        threading.Timer(0.2, reader.cancel).start()
        started = time.monotonic()
        with pytest.raises(MessageQueueClosed, match="cancelled"):
            reader.dequeue(timeout=10)
        assert time.monotonic() - started < 2


def test_remote_readers_are_refused_where_the_queue_has_none() -> None:
    with MessageQueue(1) as queue:
        assert queue.handle.remote_address is None
        with pytest.raises(ValueError, match="no remote readers"):
            RemoteMessageQueueReader(queue.handle)
    with pytest.raises(ValueError, match="at least one reader"):
        MessageQueue(0)
    with MessageQueue(0, num_remote_readers=1) as queue:
        with pytest.raises(ValueError, match=r"remote_index must be in \[0, 1\)"):
            RemoteMessageQueueReader(queue.handle, 1)


class Step(msgspec.Struct, tag=True):
    req_ids: list[str]
    num_tokens: dict[str, int]


class Call(msgspec.Struct, tag=True):
    method: str
    args: tuple[int, ...]


def test_typed_messages_round_trip_through_ring_and_overflow() -> None:
    with MessageQueue(1, chunk_bytes=256, num_chunks=2) as queue, \
            MessageQueueReader(queue.handle, 0, msg_type=Step | Call) as reader:
        small = Step(req_ids=["a"], num_tokens={"a": 3})
        large = Step(req_ids=[str(i) for i in range(200)], num_tokens={str(i): i for i in range(200)})
        for message in (small, Call(method="load_model", args=(1, 2)), large, small):
            queue.enqueue(message, timeout=5)
            assert reader.dequeue(timeout=5) == message


def test_a_message_of_the_wrong_type_raises_and_is_skipped() -> None:
    with MessageQueue(1, chunk_bytes=256) as queue, MessageQueueReader(queue.handle, 0, msg_type=Call) as reader:
        queue.enqueue({"not": "a call"}, timeout=5)
        queue.enqueue(Call(method="ping", args=()), timeout=5)
        with pytest.raises(msgspec.ValidationError):
            reader.dequeue(timeout=5)
        assert reader.dequeue(timeout=5) == Call(method="ping", args=())


def test_scheduler_output_arrives_as_sent() -> None:
    new = NewRequestData(req_id="r1", prompt_token_ids=list(range(5000)), sampling_params=SamplingParams(
        temperature=0.0, max_tokens=8), block_ids=([1, 2, 3],), num_computed_tokens=0)
    output = SchedulerOutput(
        scheduled_new_reqs=[new],
        scheduled_cached_reqs=CachedRequestData(req_ids=["r0"], resumed_from_preemption=[False],
                                                new_block_ids=[None], num_computed_tokens=[17]),
        num_scheduled_tokens={"r1": 5000, "r0": 1}, total_num_scheduled_tokens=5001, finished_req_ids={"r9"})
    with MessageQueue(1, chunk_bytes=4096) as queue, \
            MessageQueueReader(queue.handle, 0, msg_type=SchedulerOutput) as reader:
        queue.enqueue(output, timeout=5)  # over a chunk: through the overflow socket
        queue.enqueue(SchedulerOutput(scheduled_new_reqs=[], scheduled_cached_reqs=CachedRequestData(),
                                      num_scheduled_tokens={}, total_num_scheduled_tokens=0), timeout=5)
        assert reader.dequeue(timeout=5) == output
        assert reader.dequeue(timeout=5).total_num_scheduled_tokens == 0


def test_handle_travels_as_msgpack_and_pickle() -> None:
    with MessageQueue(2) as queue:
        encoded = msgspec.msgpack.encode(queue.handle)
        assert msgspec.msgpack.decode(encoded, type=MessageQueueHandle) == queue.handle
        assert pickle.loads(pickle.dumps(queue.handle)) == queue.handle


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="needs at least one reader, got 0 local and 0 remote"):
        MessageQueue(0)
    with pytest.raises(ValueError, match="chunk_bytes"):
        MessageQueue(1, chunk_bytes=4)
    with pytest.raises(ValueError, match="num_chunks"):
        MessageQueue(1, num_chunks=0)
    with MessageQueue(2) as queue:
        with pytest.raises(ValueError, match="reader_rank"):
            MessageQueueReader(queue.handle, 2)


def test_reader_with_nothing_to_read_times_out() -> None:
    with MessageQueue(1) as queue, MessageQueueReader(queue.handle, 0) as reader:
        queue.enqueue("first", timeout=5)
        assert reader.dequeue(timeout=5) == "first"
        started = time.monotonic()
        with pytest.raises(MessageQueueTimeout, match="reader 0: no message within 0.2 s"):
            reader.dequeue(timeout=0.2)
        assert 0.2 <= time.monotonic() - started < 1.0
        queue.enqueue("second", timeout=5)  # a time-out consumed nothing
        assert reader.dequeue(timeout=5) == "second"


def test_writer_blocked_by_a_slow_reader_times_out_naming_it() -> None:
    with MessageQueue(2, num_chunks=2) as queue, \
            MessageQueueReader(queue.handle, 0) as fast, MessageQueueReader(queue.handle, 1) as slow:
        for index in range(2):
            queue.enqueue(index, timeout=5)
            assert fast.dequeue(timeout=5) == index
        with pytest.raises(MessageQueueTimeout, match=r"reader\(s\) \[1\] have not read"):
            queue.enqueue(2, timeout=0.3)
        assert slow.dequeue(timeout=5) == 0  # the reader catches up and the writer goes on
        queue.enqueue(2, timeout=5)
        assert [slow.dequeue(timeout=5), fast.dequeue(timeout=5), slow.dequeue(timeout=5)] == [1, 2, 2]


def test_writer_times_out_when_readers_never_attach() -> None:
    with MessageQueue(2) as queue, MessageQueueReader(queue.handle, 0):
        with pytest.raises(MessageQueueTimeout, match="only 1 of 2 readers attached"):
            queue.enqueue("hello", timeout=0.3)


def blocked_reader(handle: MessageQueueHandle, rank: int, results) -> None:
    with MessageQueueReader(handle, rank) as reader:
        results.put((rank, reader.dequeue(timeout=30)))
        try:
            reader.dequeue()
        except MessageQueueClosed as exc:
            results.put((rank, str(exc)))


def test_close_unblocks_waiting_readers_and_unlinks_the_segment() -> None:
    results = SPAWN.Queue()
    queue = MessageQueue(2)
    readers = [SPAWN.Process(target=blocked_reader, args=(queue.handle, rank, results)) for rank in range(2)]
    for process in readers:
        process.start()
    queue.enqueue("go", timeout=30)
    assert sorted(results.get(timeout=30) for _ in readers) == [(0, "go"), (1, "go")]
    time.sleep(0.2)  # both are now blocked in dequeue()
    started = time.monotonic()
    queue.close()
    messages = sorted(results.get(timeout=5) for _ in readers)
    for process in readers:
        process.join(5)
        assert process.exitcode == 0
    assert time.monotonic() - started < 2
    assert messages == [(0, "the writer closed the message queue"), (1, "the writer closed the message queue")]
    assert not segment_exists(queue.handle)
    assert not Path(queue.handle.ipc_dir).exists()


def test_messages_sent_before_close_are_still_delivered() -> None:
    queue = MessageQueue(1, chunk_bytes=64)
    with MessageQueueReader(queue.handle, 0) as reader:
        queue.enqueue("in the ring", timeout=5)
        queue.enqueue("x" * 1000, timeout=5)  # through the overflow socket
        queue.close()
        assert reader.dequeue(timeout=5) == "in the ring"
        assert reader.dequeue(timeout=5) == "x" * 1000
        with pytest.raises(MessageQueueClosed):
            reader.dequeue(timeout=5)


def test_cancel_wakes_a_blocked_reader_from_another_thread() -> None:
    with MessageQueue(1) as queue, MessageQueueReader(queue.handle, 0) as reader:
        queue.enqueue("ready", timeout=5)
        reader.dequeue(timeout=5)
        threading.Timer(0.2, reader.cancel).start()
        started = time.monotonic()
        with pytest.raises(MessageQueueClosed, match="cancelled"):
            reader.dequeue(timeout=10)
        assert time.monotonic() - started < 1


def reads_then_hangs(handle: MessageQueueHandle, results) -> None:
    reader = MessageQueueReader(handle, 0)
    results.put(reader.dequeue(timeout=30))
    time.sleep(60)


def test_sigkilled_reader_fails_the_writer_fast_and_leaks_nothing() -> None:
    results = SPAWN.Queue()
    queue = MessageQueue(1, num_chunks=2)
    process = SPAWN.Process(target=reads_then_hangs, args=(queue.handle, results))
    process.start()
    queue.enqueue(0, timeout=30)
    assert results.get(timeout=30) == 0
    os.kill(process.pid, signal.SIGKILL)
    process.join(5)
    queue.enqueue(1, timeout=5)
    queue.enqueue(2, timeout=5)  # the ring is full now: chunk 1 waits for the dead reader
    started = time.monotonic()
    with pytest.raises(MessageQueueClosed, match=rf"reader 0 \(pid {process.pid}\) died"):
        queue.enqueue(3, timeout=30)
    assert time.monotonic() - started < 1
    queue.close()
    assert not segment_exists(queue.handle)


WRITER_SCRIPT = """
import sys, time, msgspec
from pagoda.distributed.shm_broadcast import MessageQueue
queue = MessageQueue(1)
sys.stdout.buffer.write(msgspec.json.encode(queue.handle) + b"\\n"); sys.stdout.flush()
queue.enqueue("hello", timeout=30)
time.sleep(60)
"""


def test_sigkilled_writer_wakes_the_reader_and_its_segment_is_reclaimed() -> None:
    writer = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        handle = msgspec.json.decode(writer.stdout.readline(), type=MessageQueueHandle)
        with MessageQueueReader(handle, 0) as reader:
            assert reader.dequeue(timeout=30) == "hello"
            threading.Timer(0.2, os.kill, (writer.pid, signal.SIGKILL)).start()
            started = time.monotonic()
            with pytest.raises(MessageQueueClosed, match=rf"the writer \(pid {writer.pid}\) died"):
                reader.dequeue(timeout=10)
            assert time.monotonic() - started < 1
        assert not Path(handle.ipc_dir).exists()
    finally:
        writer.kill()
        writer.wait()
    # The writer's resource tracker outlives it and unlinks what it created.
    deadline = time.monotonic() + 10
    while segment_exists(handle) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not segment_exists(handle)


def idle_reader_cpu(handle: MessageQueueHandle, results) -> None:
    with MessageQueueReader(handle, 0) as reader:
        reader.dequeue(timeout=30)
        wall, cpu = time.monotonic(), time.process_time()
        with pytest.raises(MessageQueueTimeout):
            reader.dequeue(timeout=1.0)
        results.put((time.process_time() - cpu, time.monotonic() - wall))


def test_a_waiting_reader_does_not_burn_a_core() -> None:
    results = SPAWN.Queue()
    with MessageQueue(1) as queue:
        process = SPAWN.Process(target=idle_reader_cpu, args=(queue.handle, results))
        process.start()
        queue.enqueue("start", timeout=30)
        cpu_s, wall_s = results.get(timeout=30)
        process.join(5)
    assert wall_s >= 1.0
    assert cpu_s < 0.1 * wall_s, f"a reader waiting {wall_s:.2f} s used {cpu_s:.3f} s of CPU"


def test_a_writer_dropped_unclosed_still_tells_its_readers_and_unlinks() -> None:
    queue = MessageQueue(1)
    handle = queue.handle
    with MessageQueueReader(handle, 0) as reader:
        queue.enqueue("last words", timeout=5)
        del queue
        assert not segment_exists(handle)
        assert reader.dequeue(timeout=5) == "last words"
        with pytest.raises(MessageQueueClosed, match="closed"):
            reader.dequeue(timeout=5)


def test_cancel_stops_a_blocked_writer_and_a_closed_writer_refuses_to_send() -> None:
    with MessageQueue(1, num_chunks=1) as queue, MessageQueueReader(queue.handle, 0):
        queue.enqueue("fills the ring", timeout=5)
        threading.Timer(0.2, queue.cancel).start()
        started = time.monotonic()
        with pytest.raises(MessageQueueClosed, match="cancelled"):
            queue.enqueue("blocked", timeout=10)
        assert time.monotonic() - started < 1
    with pytest.raises(MessageQueueClosed, match="closed"):
        queue.enqueue("after close", timeout=5)
