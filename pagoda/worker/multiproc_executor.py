"""Worker layer: `MultiprocExecutor` — one local worker process per rank, fed through a shared-memory broadcast queue.

Start-up: every rank's process is spawned with a ready pipe and a death
pipe (the worker exits when the executor's end of it closes); each reports
the queue it answers on, then the broadcast queue waits for all of them.
The call path is `QueueExecutor`'s.

Failure is loud and quick: a monitor thread watches every worker process;
one that exits, or stays stopped (SIGSTOP) for `STOPPED_LIMIT_S`, fails the
executor (`QueueExecutor._fail`). A worker whose call raised answers with
the error and exits.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess

import msgspec

from pagoda.child_allocator import preloaded_allocator
from pagoda.config import PagodaConfig
from pagoda.distributed.shm_broadcast import MessageQueue, MessageQueueReader
from pagoda.worker.queue_executor import STARTUP_TIMEOUT_S, STOP_GRACE_S, STOPPED_LIMIT_S, QueueExecutor, RankChannel
from pagoda.worker.rpc_messages import RpcResult, WorkerReady
from pagoda.worker.worker_process import WorkerStart, run_worker

_MONITOR_INTERVAL_S = 0.25


@dataclass
class _WorkerProcess:
    rank: int
    process: BaseProcess
    ready_pipe: multiprocessing.connection.Connection
    death_pipe: multiprocessing.connection.Connection


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class MultiprocExecutor(QueueExecutor):
    def __init__(self, config: PagodaConfig) -> None:
        super().__init__(config, MessageQueue(num_readers=config.parallel_config.world_size))
        self._workers: list[_WorkerProcess] = []
        context = multiprocessing.get_context("spawn")
        start = WorkerStart(config=config, rank=0, init_method=f"tcp://127.0.0.1:{free_port()}",
                            broadcast=self._broadcast.handle, broadcast_slot=0,
                            num_threads=config.parallel_config.threads_per_rank)
        try:
            for rank in range(self.world_size):
                ready_reader, ready_writer = context.Pipe(duplex=False)
                death_reader, death_writer = context.Pipe(duplex=False)
                rank_start = msgspec.structs.replace(start, rank=rank, broadcast_slot=rank)
                process = context.Process(
                    target=run_worker, name=f"pagoda-worker-{rank}", daemon=True,
                    args=(msgspec.msgpack.encode(rank_start), ready_writer, death_reader))
                with preloaded_allocator():
                    process.start()
                ready_writer.close()
                death_reader.close()
                self._workers.append(_WorkerProcess(rank, process, ready_reader, death_writer))
                self._channels.append(RankChannel(rank))
            for worker, channel in zip(self._workers, self._channels):
                channel.responses = self._wait_ready(worker)
            self._broadcast.wait_for_readers(timeout=STARTUP_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise
        self._monitor = threading.Thread(target=self._watch_workers, name="pagoda-worker-monitor", daemon=True)
        self._monitor.start()

    def _wait_ready(self, worker: _WorkerProcess) -> MessageQueueReader:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        ready = multiprocessing.connection.wait([worker.ready_pipe, worker.process.sentinel],
                                                timeout=max(deadline - time.monotonic(), 0))
        if worker.ready_pipe not in ready:
            state = "did not start in time" if not ready else f"exited with code {worker.process.exitcode}"
            raise RuntimeError(f"worker {worker.rank} {state}")
        try:
            message = msgspec.msgpack.decode(worker.ready_pipe.recv_bytes(), type=WorkerReady)
        except EOFError:
            worker.process.join(5)
            raise RuntimeError(f"worker {worker.rank} exited with code {worker.process.exitcode} "
                               "before it was ready") from None
        if message.error is not None or message.responses is None:
            raise RuntimeError(f"worker {worker.rank} failed to start: {message.error}")
        return MessageQueueReader(message.responses, 0, msg_type=RpcResult)

    def _watch_workers(self) -> None:
        sentinels = {worker.process.sentinel: worker for worker in self._workers}
        stopped_since: dict[int, float] = {}
        while not self._closing and self.failure is None:
            exited = multiprocessing.connection.wait(list(sentinels), timeout=_MONITOR_INTERVAL_S)
            if self._closing:
                return
            for sentinel in exited:
                worker = sentinels[sentinel]
                self._fail(f"worker {worker.rank} (pid {worker.process.pid}) died with exit code "
                           f"{worker.process.exitcode}")
                return
            now = time.monotonic()
            for worker in self._workers:
                if is_stopped(worker.process.pid):
                    since = stopped_since.setdefault(worker.rank, now)
                    if now - since >= STOPPED_LIMIT_S:
                        self._fail(f"worker {worker.rank} (pid {worker.process.pid}) has been stopped for "
                                   f"{now - since:.1f} s")
                        return
                else:
                    stopped_since.pop(worker.rank, None)

    def _stop_workers(self, wait_s: float = 0.0) -> None:
        """Stop every worker: after `wait_s` for them to end by themselves, SIGTERM, then SIGKILL."""
        deadline = time.monotonic() + wait_s
        for worker in self._workers:
            worker.process.join(max(deadline - time.monotonic(), 0))
        for worker in self._workers:
            worker.death_pipe.close()
            if worker.process.is_alive():
                worker.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for worker in self._workers:
            worker.process.join(max(deadline - time.monotonic(), 0))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(5)


def is_stopped(pid: int | None) -> bool:
    """Whether the process is stopped (state T in /proc); False where /proc cannot tell."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] == b"T"
    except (OSError, IndexError):
        return False
