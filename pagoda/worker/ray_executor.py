"""Worker layer: `RayExecutor` — the ranks as Ray actors, on this machine or others, fed by the same queues.

Ray places the ranks (one placement-group bundle of `threads_per_rank` CPUs
each, packed onto as few nodes as fit) and tells when one dies; the calls
still travel the broadcast `MessageQueue` and each rank's response queue,
exactly as with `MultiprocExecutor`: shared memory for a rank on the
engine's node, TCP for a rank on another (`RemoteMessageQueueReader`).
Every actor runs one long call, `serve`, which is the same call loop as a
worker process's (`worker_process.serve_calls`).

Liveness through Ray: the monitor waits on the `serve` calls (one that ends
or errors means its rank is gone: killed, crashed, or its node lost), and
pings every actor on a second actor thread; a rank that has not answered a
ping for `STOPPED_LIMIT_S` (stopped, or its machine unreachable) fails the
executor as a dead one does.

Which Ray: `RAY_ADDRESS` or a cluster `ray start` began on this machine if
there is one; otherwise a private single-node instance bound to loopback
(127.0.0.2: Ray rewrites 127.0.0.1 into the machine's outward address),
which the executor stops at shutdown. Usage statistics are always off.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

import msgspec

from pagoda import envs
from pagoda.config import PagodaConfig
from pagoda.distributed.shm_broadcast import MessageQueue, open_reader
from pagoda.worker.queue_executor import STARTUP_TIMEOUT_S, STOPPED_LIMIT_S, QueueExecutor, RankChannel
from pagoda.worker.rpc_messages import RpcResult, WorkerReady
from pagoda.worker.worker_process import WorkerStart

logger = logging.getLogger(__name__)

# The address a private Ray instance binds to (see the module docstring).
LOCAL_RAY_IP = "127.0.0.2"
_MONITOR_INTERVAL_S = 0.25
_PLACEMENT_TIMEOUT_S = 60.0


class RayRank:
    """One rank inside a Ray actor (wrapped with `ray.remote` by the executor; `serve` and `ping` run on
    separate actor threads)."""

    def __init__(self) -> None:
        self._rank: Any = None

    def where(self) -> tuple[str, str, int]:
        """(Ray node id, node IP, pid) of this actor."""
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), os.getpid()

    def free_port(self) -> int:
        """A free TCP port on this actor's node (rank 0 hosts the tensor-parallel rendezvous)."""
        import ray

        with socket.socket() as sock:
            sock.bind((ray.util.get_node_ip_address(), 0))
            return sock.getsockname()[1]

    def start(self, start_bytes: bytes) -> bytes:
        from pagoda.worker.worker_process import start_rank

        start = msgspec.msgpack.decode(start_bytes, type=WorkerStart)
        try:
            self._rank = start_rank(start)
        except Exception as error:
            return msgspec.msgpack.encode(WorkerReady(error=f"{type(error).__name__}: {error}"))
        return msgspec.msgpack.encode(WorkerReady(responses=self._rank.responses.handle))

    def serve(self) -> None:
        from pagoda.worker.worker_process import serve_calls

        serve_calls(self._rank)

    def ping(self) -> bool:
        return True


def connect_ray() -> bool:
    """Join the Ray cluster this process should use (see the module docstring); True if we started it."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    if ray.is_initialized():
        return False
    from ray._private.services import get_ray_address_from_environment

    address = get_ray_address_from_environment(None, None)
    if address is not None:
        ray.init(address=address, include_dashboard=False)
        return False
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address=LOCAL_RAY_IP)
    return True


def _death_reason(error: Exception) -> str:
    """Why an actor's serve loop ended: the exception it raised where Ray carries one, else Ray's own error."""
    cause = getattr(error, "cause", None)  # RayTaskError wraps what the actor raised
    if isinstance(cause, BaseException):
        return f"raised {type(cause).__name__}: {cause}"
    text = str(error)
    return f"died: {type(error).__name__}: {text.splitlines()[0] if text else ''}"


class RayExecutor(QueueExecutor):
    def __init__(self, config: PagodaConfig) -> None:
        try:
            import ray
        except ImportError as error:
            raise ImportError("distributed_executor_backend='ray' needs Ray: pip install 'ray==2.60.0'") from error
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray = ray
        self._remove_placement_group = remove_placement_group
        self._started_ray = connect_ray()
        world_size = config.parallel_config.world_size
        threads = config.parallel_config.threads_per_rank
        self._actors: list[Any] = []
        self._serving: list[Any] = []
        self._placement = placement_group([{"CPU": threads}] * world_size, strategy="PACK")
        try:
            ready, _ = ray.wait([self._placement.ready()], timeout=_PLACEMENT_TIMEOUT_S)
            if not ready:
                raise RuntimeError(
                    f"the Ray cluster cannot place {world_size} ranks of {threads} CPU(s) each within "
                    f"{_PLACEMENT_TIMEOUT_S:.0f} s: it has {ray.cluster_resources().get('CPU', 0):g} CPUs in all, "
                    f"{ray.available_resources().get('CPU', 0):g} free")
            actor_class = ray.remote(num_cpus=threads, max_concurrency=2)(RayRank)
            self._actors = [actor_class.options(
                name=None, scheduling_strategy=PlacementGroupSchedulingStrategy(self._placement, rank)).remote()
                for rank in range(world_size)]
            places = ray.get([actor.where.remote() for actor in self._actors], timeout=STARTUP_TIMEOUT_S)
        except BaseException:
            self._release_ray()
            raise
        driver_node = ray.get_runtime_context().get_node_id()
        local = [node == driver_node and not envs.ray_tcp_only() for node, _, _ in places]
        self._pids = [pid if is_local else None for (_, _, pid), is_local in zip(places, local)]
        num_local = sum(local)
        super().__init__(config, MessageQueue(num_readers=num_local, num_remote_readers=world_size - num_local,
                                              remote_host=ray.util.get_node_ip_address()))
        try:
            self._start_ranks(config, places, local)
        except BaseException:
            self.shutdown()
            raise
        self._monitor = threading.Thread(target=self._watch_ranks, name="pagoda-ray-monitor", daemon=True)
        self._monitor.start()

    def _start_ranks(self, config: PagodaConfig, places: list[tuple[str, str, int]], local: list[bool]) -> None:
        ray = self._ray
        port = ray.get(self._actors[0].free_port.remote(), timeout=STARTUP_TIMEOUT_S)
        slots, remote_indexes = {}, {}
        for rank, is_local in enumerate(local):
            (slots if is_local else remote_indexes)[rank] = len(slots if is_local else remote_indexes)
        starts = []
        for rank, actor in enumerate(self._actors):
            start = WorkerStart(
                config=config, rank=rank, init_method=f"tcp://{places[0][1]}:{port}", broadcast=self._broadcast.handle,
                broadcast_slot=slots.get(rank), remote_index=remote_indexes.get(rank, 0),
                num_threads=config.parallel_config.threads_per_rank,
                response_host=None if local[rank] else places[rank][1])
            starts.append(actor.start.remote(msgspec.msgpack.encode(start)))
            self._channels.append(RankChannel(rank))
        for rank, answer in enumerate(ray.get(starts, timeout=STARTUP_TIMEOUT_S)):
            message = msgspec.msgpack.decode(answer, type=WorkerReady)
            if message.error is not None or message.responses is None:
                raise RuntimeError(f"worker {rank} failed to start: {message.error}")
            self._channels[rank].responses = open_reader(message.responses, 0 if local[rank] else None,
                                                         msg_type=RpcResult)
        self._serving = [actor.serve.remote() for actor in self._actors]
        self._broadcast.wait_for_readers(timeout=STARTUP_TIMEOUT_S)

    @property
    def worker_pids(self) -> list[int | None]:
        """The pid of each rank's actor process where it is on this node (None on another)."""
        return list(self._pids)

    def _watch_ranks(self) -> None:
        ray = self._ray
        rank_of = {ref.hex(): rank for rank, ref in enumerate(self._serving)}
        pings: dict[int, tuple[Any, float]] = {}
        while not self._closing and self.failure is None:
            done, _ = ray.wait(self._serving, num_returns=1, timeout=_MONITOR_INTERVAL_S)
            if self._closing:
                return
            if done:
                rank = rank_of[done[0].hex()]
                try:
                    ray.get(done[0], timeout=1.0)
                    reason = "stopped serving"
                except Exception as error:  # Ray's actor errors: died, crashed, node lost
                    reason = _death_reason(error)
                self._fail(f"worker {rank} (Ray actor) {reason}")
                return
            now = time.monotonic()
            for rank, actor in enumerate(self._actors):
                if rank in pings:
                    ref, sent = pings[rank]
                    answered, _ = ray.wait([ref], timeout=0)
                    if answered:
                        del pings[rank]
                    elif now - sent >= STOPPED_LIMIT_S:
                        self._fail(f"worker {rank} (Ray actor) has not answered a liveness ping for "
                                   f"{now - sent:.1f} s (stopped, or its node is unreachable)")
                        return
                if rank not in pings:
                    pings[rank] = (actor.ping.remote(), now)

    def _stop_workers(self, wait_s: float = 0.0) -> None:
        ray = self._ray
        if self._serving and wait_s > 0:
            ray.wait(self._serving, num_returns=len(self._serving), timeout=wait_s)
        for actor in self._actors:
            try:
                ray.kill(actor)
            except Exception as error:  # already gone, or Ray itself is: nothing left to stop
                logger.debug("ray.kill: %s", error)
        self._actors = []

    def shutdown(self) -> None:
        try:
            super().shutdown()
        finally:
            self._release_ray()

    def _release_ray(self) -> None:
        self._stop_workers()
        if self._placement is not None:
            try:
                self._remove_placement_group(self._placement)
            except Exception as error:
                logger.debug("remove_placement_group: %s", error)
            self._placement = None
        if self._started_ray:
            self._ray.shutdown()
            self._started_ray = False
