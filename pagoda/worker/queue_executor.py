"""Worker layer: `QueueExecutor` — the call path shared by the executors whose ranks live in other processes.

A call is enqueued once on the broadcast queue (`MessageQueue`) that every
rank reads; answers come back on each rank's own response queue, or, for
`execute_model`, from one rank only: rank 0 (every rank ends a step with
the same sampled tokens), or under pipeline parallelism the last stage's
first rank, which samples. Steps can be sent ahead (`submit_step`); their
answers are read in the order sent, and before any other call's, since
they come back on the same queue. Results are typed per method
(`_RESULT_TYPES`).

How the ranks' processes are started, watched and stopped is the
subclass's: `MultiprocExecutor` spawns local processes, `RayExecutor` places
Ray actors. Either calls `_fail(reason)` when a rank dies, stops or raises:
that wakes every waiting call and stops the other ranks, and every call
after it raises `ExecutorFailedError`, which ends the engine process
(`EngineCoreProc`) so the front end reports the engine dead instead of
hanging or answering for it.
"""

from __future__ import annotations

import logging
import threading
from abc import abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Any

import msgspec

from pagoda.config import PagodaConfig
from pagoda.core.kv_cache_interface import KVCacheConfig, KVCacheSpec
from pagoda.core.model_runner_output import ModelRunnerOutput
from pagoda.core.scheduler_output import SchedulerOutput
from pagoda.distributed.shm_broadcast import AnyReader, MessageQueue, MessageQueueClosed, MessageQueueTimeout
from pagoda.worker.executor import Executor, PendingStep
from pagoda.worker.executor_errors import ExecutorFailedError
from pagoda.worker.rpc_messages import RpcCall, WireKVCacheConfig, WireSpec

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 300.0
# How long a rank may stay stopped (SIGSTOP) or silent before the executor gives up on it.
STOPPED_LIMIT_S = 2.0
# A rank answering `shutdown` still closes its queue (which unlinks its shared memory): give it this long.
STOP_GRACE_S = 4.0

_Metrics = dict[str, dict[str, float]] | None
_RESULT_TYPES: dict[str, Any] = {
    "load_model": None, "get_kv_cache_spec": list[WireSpec], "determine_available_memory": int,
    "initialize_kv_cache": None, "execute_model": ModelRunnerOutput, "kv_store_metrics": _Metrics,
    "mm_metrics": _Metrics, "flush_kv_store": bool, "shutdown": None, "check_health": bool,
}


@dataclass
class RankChannel:
    """Where one rank answers."""

    rank: int
    responses: AnyReader | None = None


class QueueExecutor(Executor):
    def __init__(self, config: PagodaConfig, broadcast: MessageQueue) -> None:
        super().__init__(config)
        self.world_size = config.parallel_config.world_size
        self.failure: str | None = None
        self._closing = False
        self._lock = threading.Lock()
        self._broadcast = broadcast
        self._channels: list[RankChannel] = []
        self._step_rank = config.parallel_config.last_stage_rank
        self._pending_steps: deque[PendingStep] = deque()

    @abstractmethod
    def _stop_workers(self, wait_s: float = 0.0) -> None:
        """Stop every rank's process, after `wait_s` for them to end by themselves."""

    def collective_rpc(self, method: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
                       reply_rank: int | None = None, timeout: float | None = None) -> list[Any]:
        if kwargs:
            raise ValueError(f"{method}: worker calls take no keyword arguments")
        if self.failure is not None:
            raise ExecutorFailedError(self.failure)
        self._read_pending_steps()
        call = RpcCall(method=method, reply_rank=reply_rank, **_argument(method, args))
        try:
            self._broadcast.enqueue(call, timeout=timeout)
        except (MessageQueueClosed, MessageQueueTimeout) as error:
            raise ExecutorFailedError(self._fail(f"sending {method} to the workers failed: {error}")) from error
        ranks = range(self.world_size) if reply_rank is None else (reply_rank,)
        return [self._answer(self._channels[rank], method, timeout) for rank in ranks]

    def _answer(self, channel: RankChannel, method: str, timeout: float | None) -> Any:
        assert channel.responses is not None
        try:
            answer = channel.responses.dequeue(timeout=timeout)
        except (MessageQueueClosed, MessageQueueTimeout) as error:
            raise ExecutorFailedError(self.failure or self._fail(f"worker {channel.rank}: {error}")) from error
        if answer.error is not None:
            raise ExecutorFailedError(self._fail(f"worker {channel.rank} failed in {method}: {answer.error}"))
        result_type = _RESULT_TYPES[method]
        return None if result_type is None else msgspec.msgpack.decode(answer.result, type=result_type)

    def get_kv_cache_spec(self) -> list[KVCacheSpec]:
        return [spec.to_spec() for spec in self.collective_rpc("get_kv_cache_spec", reply_rank=0)[0]]

    def initialize_kv_cache(self, kv_cache_config: KVCacheConfig) -> None:
        self.collective_rpc("initialize_kv_cache", (kv_cache_config,))

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.submit_step(scheduler_output).result()

    def submit_step(self, scheduler_output: SchedulerOutput) -> PendingStep:
        if self.failure is not None:
            raise ExecutorFailedError(self.failure)
        call = RpcCall(method="execute_model", reply_rank=self._step_rank, scheduler_output=scheduler_output)
        try:
            self._broadcast.enqueue(call)
        except (MessageQueueClosed, MessageQueueTimeout) as error:
            raise ExecutorFailedError(self._fail(f"sending execute_model to the workers failed: {error}")) from error
        step = PendingStep(reader=self._read_steps_through)
        self._pending_steps.append(step)
        return step

    def _read_steps_through(self, step: PendingStep) -> None:
        """Read step answers, oldest first, until `step`'s is in."""
        channel = self._channels[self._step_rank]
        while not step.done:
            self._pending_steps.popleft().set_output(self._answer(channel, "execute_model", None))

    def _read_pending_steps(self) -> None:
        if self._pending_steps:
            self._read_steps_through(self._pending_steps[-1])

    def check_health(self) -> None:
        self.collective_rpc("check_health", timeout=10.0)

    def _fail(self, reason: str) -> str:
        """Mark the executor failed (the first reason wins), wake every waiting call, stop the workers."""
        with self._lock:
            if self.failure is not None:
                return self.failure
            self.failure = reason
        logger.error("executor failed: %s", reason)
        self._broadcast.cancel()
        for channel in self._channels:
            if channel.responses is not None:
                channel.responses.cancel()
        self._stop_workers()
        return reason

    def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True  # before the call: the monitors must not take ranks ending on request for a failure
        if self.failure is None and self._channels and all(c.responses is not None for c in self._channels):
            try:
                self.collective_rpc("shutdown", timeout=10.0)
            except ExecutorFailedError as error:
                logger.warning("workers did not shut down cleanly: %s", error)
        self._stop_workers(wait_s=STOP_GRACE_S if self.failure is None else 0.0)
        for channel in self._channels:
            if channel.responses is not None:
                channel.responses.close()
        self._broadcast.close()


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
