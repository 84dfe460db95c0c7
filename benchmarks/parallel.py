"""Parallel-execution benchmark, part 1: the shared-memory broadcast queue against a ZMQ PUB/SUB socket.

One writer (this process) and one reader process. The writer sends
`--iterations` messages of each size, `--interval-ms` apart, as a worker's
step input arrives during decode (the reader has gone to sleep by then);
each message carries its send time (time.perf_counter is one clock for the
whole machine), and the reader records the latency once it has decoded the
message. CPU is `getrusage` of both processes (all their threads, ZMQ's I/O
threads included) over the messages, per message. Both sides encode the same
msgpack `[send_time, payload]`. The queue runs with its default spin budget
and, on the smallest message, with other budgets, vLLM's 1 s among them.

    python benchmarks/parallel.py [--iterations 300] [--interval-ms 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgspec
import zmq
from report import write_section

from pagoda.distributed.shm_broadcast import DEFAULT_SPIN_S, MessageQueue, MessageQueueHandle, MessageQueueReader

SIZES = [64, 4 << 10, 256 << 10, 4 << 20]
SPIN_BUDGETS_S = [0.0, DEFAULT_SPIN_S, 100e-6, 500e-6, 1.0]
CHUNK_BYTES = 1 << 20  # the queue's default: 4 MiB messages take the overflow socket
SPAWN = multiprocessing.get_context("spawn")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def mq_reader(handle: MessageQueueHandle, count: int, spin_s: float, results) -> None:
    with MessageQueueReader(handle, 0, spin_s=spin_s) as reader:
        reader.dequeue(timeout=60)  # warm-up message: start-up costs are not the queue's
        results.put(read_all(lambda: reader.dequeue(timeout=60), count))


def zmq_reader(address: str, count: int, results) -> None:
    context = zmq.Context()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.SUBSCRIBE, b"")
    socket.connect(address)
    decoder = msgspec.msgpack.Decoder()
    socket.recv()
    results.put(read_all(lambda: decoder.decode(socket.recv(copy=False).buffer), count))
    context.destroy(linger=0)


def read_all(receive, count: int) -> tuple[list[float], float, float]:
    """Latencies of `count` messages; CPU and wall seconds from the first to the last.

    The window opens at the first timed message, not before: a spinning reader spins while the writer warms up.
    """
    latencies: list[float] = []
    cpu = wall = 0.0
    for index in range(count):
        sent, _payload = receive()
        latencies.append(time.perf_counter() - sent)
        if index == 0:
            cpu, wall = cpu_seconds(), time.perf_counter()
    return latencies, cpu_seconds() - cpu, time.perf_counter() - wall


def send_all(send, payload: bytes, count: int, interval_s: float) -> tuple[float, float]:
    """Sends the warm-up message, then `count` timed ones; the writer's CPU and wall seconds over those."""
    send([time.perf_counter(), b""])
    time.sleep(0.2)
    cpu, wall = cpu_seconds(), time.perf_counter()
    for _ in range(count):
        send([time.perf_counter(), payload])
        time.sleep(interval_s)
    return cpu_seconds() - cpu, time.perf_counter() - wall


class Run(NamedTuple):
    latencies: list[float]
    cpu_per_message_s: float  # writer + reader
    core_share: float  # the writer's CPU over its wall time plus the reader's over its own


def measure(send, reader: multiprocessing.process.BaseProcess, results, size: int, count: int,
            interval_s: float, wait_for_reader=lambda: None) -> Run:
    reader.start()
    wait_for_reader()
    writer_cpu, writer_wall = send_all(send, bytes(size), count, interval_s)
    latencies, reader_cpu, reader_wall = results.get(timeout=120)
    reader.join(10)
    return Run(latencies, writer_cpu / count + reader_cpu / (count - 1),
               writer_cpu / writer_wall + reader_cpu / reader_wall)


def run_mq(size: int, count: int, interval_s: float, spin_s: float) -> Run:
    results = SPAWN.Queue()
    with MessageQueue(1, chunk_bytes=CHUNK_BYTES) as queue:
        reader = SPAWN.Process(target=mq_reader, args=(queue.handle, count, spin_s, results))
        return measure(lambda obj: queue.enqueue(obj, timeout=60), reader, results, size, count, interval_s)


def run_zmq(size: int, count: int, interval_s: float) -> Run:
    results = SPAWN.Queue()
    with tempfile.TemporaryDirectory(prefix="pagoda-bench-") as directory:
        context = zmq.Context()
        # XPUB only to see the subscription arrive (from then on nothing is dropped); it sends as a PUB does.
        socket = context.socket(zmq.XPUB)
        socket.bind(f"ipc://{directory}/pub")
        reader = SPAWN.Process(target=zmq_reader, args=(f"ipc://{directory}/pub", count, results))
        encoder = msgspec.msgpack.Encoder()
        run = measure(lambda obj: socket.send(encoder.encode(obj), copy=False), reader, results, size, count,
                      interval_s, wait_for_reader=socket.recv)
        context.destroy(linger=0)
    return run


def human(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB" if size >= 1 << 10 else f"{size} B"


def summary(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    return statistics.median(ordered) * 1e6, ordered[int(0.9 * (len(ordered) - 1))] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=300, help="timed messages per size and setting")
    parser.add_argument("--interval-ms", type=float, default=2.0, help="gap between messages")
    args = parser.parse_args()
    interval_s = args.interval_ms / 1000
    rows = ["| message | MQ p50 / p90 µs | ZMQ PUB p50 / p90 µs | latency MQ ÷ ZMQ | MQ CPU µs/msg | "
            "ZMQ CPU µs/msg | CPU MQ ÷ ZMQ |", "|---|---|---|---|---|---|---|"]
    for size in SIZES:
        mq = run_mq(size, args.iterations, interval_s, DEFAULT_SPIN_S)
        zmq_run = run_zmq(size, args.iterations, interval_s)
        (mq_p50, mq_p90), (zmq_p50, zmq_p90) = summary(mq.latencies), summary(zmq_run.latencies)
        mq_cpu_us, zmq_cpu_us = mq.cpu_per_message_s * 1e6, zmq_run.cpu_per_message_s * 1e6
        rows.append(f"| {human(size)} | {mq_p50:.0f} / {mq_p90:.0f} | {zmq_p50:.0f} / {zmq_p90:.0f} | "
                    f"{mq_p50 / zmq_p50:.2f} | {mq_cpu_us:.0f} | {zmq_cpu_us:.0f} | {mq_cpu_us / zmq_cpu_us:.2f} |")
    spins = ["| reader spin budget | MQ p50 / p90 µs | MQ CPU µs/msg (writer + reader) | share of one core |",
             "|---|---|---|---|"]
    for spin_s in SPIN_BUDGETS_S:
        run = run_mq(SIZES[0], args.iterations, interval_s, spin_s)
        p50, p90 = summary(run.latencies)
        budget = f"{spin_s:g} s" if spin_s >= 1 else f"{spin_s * 1e6:.0f} µs"
        spins.append(f"| {budget}{' (default)' if spin_s == DEFAULT_SPIN_S else ''} | "
                     f"{p50:.0f} / {p90:.0f} | {run.cpu_per_message_s * 1e6:.0f} | {run.core_share:.1%} |")
    body = (f"One writer, one reader process; {args.iterations} messages per row, {args.interval_ms:g} ms apart "
            f"(the reader is asleep when each arrives, as between decode steps). The queue's chunks are "
            f"{human(CHUNK_BYTES)}, so 4 MiB messages go through its overflow socket. Latency is send to decoded; "
            f"CPU is both processes' user + system time over the messages (the writer's includes its own sleeps' "
            f"wake-ups, the same on both sides).\n\n" + "\n".join(rows) +
            f"\n\nSpin budget, {human(SIZES[0])} messages (\"share of one core\": each process's CPU over its wall "
            f"time, summed, while messages come every {args.interval_ms:g} ms):\n\n" + "\n".join(spins))
    print(body)
    write_section("Parallel: broadcast message queue vs ZMQ PUB/SUB", body,
                  "python benchmarks/parallel.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
