"""Worker layer: `MultiprocExecutor` — one worker process per rank, fed through a shared-memory broadcast queue.

Start-up: every rank's process is spawned with a ready pipe and a death
pipe (the worker exits when the executor's end of it closes); each reports
the queue it answers on, then the broadcast queue waits for all of them.
A call is enqueued once for every rank; answers come back from each rank,
or, for `execute_model`, from rank 0 only (every rank ends a step with the
same sampled tokens). Results are typed per method (`_RESULT_TYPES`).

Failure is loud and quick: a monitor thread watches every worker process;
one that exits, or stays stopped (SIGSTOP) for `STOPPED_LIMIT_S`, marks the
executor failed, wakes any call waiting for an answer and stops the other
workers. A worker whose call raised answers with the error and exits. Every
call after that raises `ExecutorFailedError`, which ends the engine process
(`EngineCoreProc`), so the front end reports the engine dead instead of
hanging or answering for it.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import socket
import threading
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

import msgspec

from pagoda.config import PagodaConfig
from pagoda.core.kv_cache_interface import KVCacheConfig, KVCacheSpec
from pagoda.core.model_runner_output import ModelRunnerOutput
from pagoda.core.scheduler_output import SchedulerOutput
from pagoda.distributed.shm_broadcast import MessageQueue, MessageQueueClosed, MessageQueueReader, MessageQueueTimeout
from pagoda.worker.executor import Executor
from pagoda.worker.executor_errors import ExecutorFailedError
from pagoda.worker.rpc_messages import RpcCall, RpcResult, WireKVCacheConfig, WireSpec, WorkerReady
from pagoda.worker.worker_process import run_worker

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 300.0
# How long a worker may stay stopped (SIGSTOP) before the executor gives up on it.
STOPPED_LIMIT_S = 2.0
_MONITOR_INTERVAL_S = 0.25
_STOP_GRACE_S = 4.0

_Metrics = dict[str, dict[str, float]] | None
_RESULT_TYPES: dict[str, Any] = {
    "load_model": None, "get_kv_cache_spec": list[WireSpec], "determine_available_memory": int,
    "initialize_kv_cache": None, "execute_model": ModelRunnerOutput, "kv_store_metrics": _Metrics,
    "mm_metrics": _Metrics, "flush_kv_store": bool, "shutdown": None, "check_health": bool,
}


@dataclass
class _WorkerProcess:
    rank: int
    process: BaseProcess
    ready_pipe: multiprocessing.connection.Connection
    death_pipe: multiprocessing.connection.Connection
    responses: MessageQueueReader | None = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MultiprocExecutor(Executor):
    def __init__(self, config: PagodaConfig) -> None:
        super().__init__(config)
        self.world_size = config.parallel_config.world_size
        self.failure: str | None = None
        self._closing = False
        self._lock = threading.Lock()
        self._broadcast = MessageQueue(num_readers=self.world_size)
        self._workers: list[_WorkerProcess] = []
        context = multiprocessing.get_context("spawn")
        num_threads = config.parallel_config.threads_per_rank
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        config_bytes = msgspec.msgpack.encode(config)
        handle_bytes = msgspec.msgpack.encode(self._broadcast.handle)
        try:
            for rank in range(self.world_size):
                ready_reader, ready_writer = context.Pipe(duplex=False)
                death_reader, death_writer = context.Pipe(duplex=False)
                process = context.Process(
                    target=run_worker, name=f"pagoda-worker-{rank}", daemon=True,
                    args=(config_bytes, rank, init_method, handle_bytes, ready_writer, death_reader, num_threads))
                process.start()
                ready_writer.close()
                death_reader.close()
                self._workers.append(_WorkerProcess(rank, process, ready_reader, death_writer))
            for worker in self._workers:
                worker.responses = self._wait_ready(worker)
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

    def collective_rpc(self, method: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
                       reply_rank: int | None = None, timeout: float | None = None) -> list[Any]:
        if kwargs:
            raise ValueError(f"{method}: worker calls take no keyword arguments")
        if self.failure is not None:
            raise ExecutorFailedError(self.failure)
        call = RpcCall(method=method, reply_rank=reply_rank, **_argument(method, args))
        try:
            self._broadcast.enqueue(call, timeout=timeout)
        except (MessageQueueClosed, MessageQueueTimeout) as error:
            raise ExecutorFailedError(self._fail(f"sending {method} to the workers failed: {error}")) from error
        ranks = range(self.world_size) if reply_rank is None else (reply_rank,)
        return [self._answer(self._workers[rank], method, timeout) for rank in ranks]

    def _answer(self, worker: _WorkerProcess, method: str, timeout: float | None) -> Any:
        assert worker.responses is not None
        try:
            answer = worker.responses.dequeue(timeout=timeout)
        except (MessageQueueClosed, MessageQueueTimeout) as error:
            raise ExecutorFailedError(self.failure or self._fail(f"worker {worker.rank}: {error}")) from error
        if answer.error is not None:
            raise ExecutorFailedError(self._fail(f"worker {worker.rank} failed in {method}: {answer.error}"))
        result_type = _RESULT_TYPES[method]
        return None if result_type is None else msgspec.msgpack.decode(answer.result, type=result_type)

    def get_kv_cache_spec(self) -> list[KVCacheSpec]:
        return [spec.to_spec() for spec in self.collective_rpc("get_kv_cache_spec", reply_rank=0)[0]]

    def initialize_kv_cache(self, kv_cache_config: KVCacheConfig) -> None:
        self.collective_rpc("initialize_kv_cache", (kv_cache_config,))

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.collective_rpc("execute_model", (scheduler_output,), reply_rank=0)[0]

    def check_health(self) -> None:
        self.collective_rpc("check_health", timeout=10.0)

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
                if _is_stopped(worker.process.pid):
                    since = stopped_since.setdefault(worker.rank, now)
                    if now - since >= STOPPED_LIMIT_S:
                        self._fail(f"worker {worker.rank} (pid {worker.process.pid}) has been stopped for "
                                   f"{now - since:.1f} s")
                        return
                else:
                    stopped_since.pop(worker.rank, None)

    def _fail(self, reason: str) -> str:
        """Mark the executor failed (the first reason wins), wake every waiting call, stop the workers."""
        with self._lock:
            if self.failure is not None:
                return self.failure
            self.failure = reason
        logger.error("executor failed: %s", reason)
        self._broadcast.cancel()
        for worker in self._workers:
            if worker.responses is not None:
                worker.responses.cancel()
        self._stop_workers()
        return reason

    def shutdown(self) -> None:
        if self._closing:
            return
        if self.failure is None and all(w.responses is not None for w in self._workers) and self._workers:
            try:
                self.collective_rpc("shutdown", timeout=10.0)
            except ExecutorFailedError as error:
                logger.warning("workers did not shut down cleanly: %s", error)
        self._closing = True
        self._stop_workers(wait_s=_STOP_GRACE_S if self.failure is None else 0.0)
        for worker in self._workers:
            if worker.responses is not None:
                worker.responses.close()
        self._broadcast.close()

    def _stop_workers(self, wait_s: float = 0.0) -> None:
        """Stop every worker: after `wait_s` for them to end by themselves (a worker answering `shutdown`
        still closes its queue, which unlinks its shared memory), SIGTERM, then SIGKILL."""
        deadline = time.monotonic() + wait_s
        for worker in self._workers:
            worker.process.join(max(deadline - time.monotonic(), 0))
        for worker in self._workers:
            worker.death_pipe.close()
            if worker.process.is_alive():
                worker.process.terminate()
        deadline = time.monotonic() + _STOP_GRACE_S
        for worker in self._workers:
            worker.process.join(max(deadline - time.monotonic(), 0))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(5)


def _argument(method: str, args: tuple[Any, ...]) -> dict[str, Any]:
    if method == "execute_model":
        (scheduler_output,) = args
        return {"scheduler_output": scheduler_output}
    if method == "initialize_kv_cache":
        (kv_cache_config,) = args
        return {"kv_cache_config": WireKVCacheConfig.of(kv_cache_config)}
    if args:
        raise ValueError(f"{method}: takes no arguments, got {len(args)}")
    return {}


def _is_stopped(pid: int | None) -> bool:
    """Whether the process is stopped (state T in /proc); False where /proc cannot tell."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] == b"T"
    except (OSError, IndexError):
        return False
