"""Worker layer: the life of one rank outside the engine's process — start, then serve the broadcast queue.

A rank joins the tensor-parallel group, builds its `Worker`, opens the
queue it answers on (shared memory when the executor is on its machine,
TCP otherwise), and serves calls from the executor's broadcast queue until
told to shut down. A call that raises is answered with the error and ends
the rank: a rank whose step failed cannot be trusted to stay in step with
the others.

`run_worker` is the main function of a `MultiprocExecutor` process: it
reports ready through a pipe and exits when the executor's end of its death
pipe closes. The Ray executor's actors call `start_rank` and `serve_calls`
themselves (`pagoda.worker.ray_executor`).

Thread count: each rank gets its share of the machine's cores, set in the
environment before torch is imported (setting it later from a spawned
process can deadlock OpenMP's start-up).
"""

from __future__ import annotations

import os
import threading
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import msgspec

from pagoda.config import PagodaConfig
from pagoda.distributed.shm_broadcast import MessageQueueHandle

if TYPE_CHECKING:
    from pagoda.distributed.shm_broadcast import AnyReader, MessageQueue
    from pagoda.worker.rpc_messages import RpcCall
    from pagoda.worker.worker import Worker

# Calls without an argument a worker serves; the ones with one are dispatched by name below.
_PLAIN_CALLS = frozenset({"load_model", "determine_available_memory", "kv_store_metrics", "mm_metrics",
                          "flush_kv_store", "shutdown"})


class WorkerStart(msgspec.Struct, kw_only=True):
    """What one rank needs to start (msgpack on its way to the process, never pickle)."""

    config: PagodaConfig
    rank: int
    init_method: str  # the tensor-parallel group's rendezvous
    broadcast: MessageQueueHandle
    # This rank's shared-memory reader slot on the broadcast queue; None: it reads through TCP as `remote_index`.
    broadcast_slot: int | None
    remote_index: int = 0
    num_threads: int = 1
    # None: answer through shared memory; else the address of this rank's machine its TCP answers are sent from.
    response_host: str | None = None


@dataclass
class ServingRank:
    rank: int
    worker: Worker
    calls: AnyReader
    responses: MessageQueue


def start_rank(start: WorkerStart) -> ServingRank:
    """Build the rank's worker and its queues; the executor then waits for `responses.handle`'s reader."""
    from pagoda.distributed.shm_broadcast import MessageQueue, open_reader
    from pagoda.worker.rpc_messages import RpcCall
    from pagoda.worker.worker import Worker, select_device

    worker = Worker(start.config, start.rank, num_threads=start.num_threads, init_method=start.init_method,
                    device=select_device())
    if start.response_host is None:
        responses = MessageQueue(num_readers=1)
    else:
        responses = MessageQueue(num_readers=0, num_remote_readers=1, remote_host=start.response_host)
    calls = open_reader(start.broadcast, start.broadcast_slot, msg_type=RpcCall, remote_index=start.remote_index)
    return ServingRank(start.rank, worker, calls, responses)


def serve_calls(rank: ServingRank) -> None:
    """Answer the executor's calls until `shutdown`; a call that raises is answered with the error, then re-raised."""
    from pagoda.worker.rpc_messages import RpcResult

    rank.responses.wait_for_readers()
    while True:
        call = rank.calls.dequeue()
        answers = call.reply_rank is None or call.reply_rank == rank.rank
        try:
            result = _dispatch(rank.worker, call)
        except Exception as error:
            if answers:
                rank.responses.enqueue(RpcResult(rank=rank.rank, error=f"{type(error).__name__}: {error}\n"
                                                                       f"{traceback.format_exc(limit=8)}"))
            raise
        if answers:
            rank.responses.enqueue(RpcResult(rank=rank.rank, result=msgspec.msgpack.encode(result)))
        if call.method == "shutdown":
            rank.responses.close()
            rank.calls.close()
            return


def run_worker(start_bytes: bytes, ready_pipe: Connection, death_pipe: Connection) -> None:
    from pagoda.worker.rpc_messages import WorkerReady

    threading.Thread(target=_exit_when_parent_dies, args=(death_pipe,), daemon=True).start()
    try:
        start = msgspec.msgpack.decode(start_bytes, type=WorkerStart)
        os.environ["OMP_NUM_THREADS"] = str(start.num_threads)
        rank = start_rank(start)
    except BaseException as error:  # the executor is waiting for this pipe: tell it why, then stop
        ready_pipe.send_bytes(msgspec.msgpack.encode(WorkerReady(error=f"{type(error).__name__}: {error}")))
        raise
    ready_pipe.send_bytes(msgspec.msgpack.encode(WorkerReady(responses=rank.responses.handle)))
    serve_calls(rank)


def _dispatch(worker: Worker, call: RpcCall) -> object:
    from pagoda.worker.rpc_messages import WireSpec

    if call.method == "execute_model":
        return worker.execute_model(call.scheduler_output)
    if call.method == "initialize_kv_cache":
        return worker.initialize_kv_cache(call.kv_cache_config.to_config())
    if call.method == "get_kv_cache_spec":
        return [WireSpec.of(spec) for spec in worker.get_kv_cache_spec()]
    if call.method == "check_health":
        return True
    if call.method not in _PLAIN_CALLS:
        raise ValueError(f"unknown worker call {call.method!r}")
    return getattr(worker, call.method)()


def _exit_when_parent_dies(death_pipe: Connection) -> None:
    try:
        death_pipe.recv_bytes()  # never sent to: returns only when the parent closes its end
    except EOFError:
        pass
    os._exit(1)  # the executor is gone: nobody will ever call this rank again
