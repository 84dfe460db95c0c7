"""Worker layer: the main function of one worker process of the multiprocess executor.

The process joins the tensor-parallel group, builds its `Worker`, opens the
queue it answers on, reports ready through its pipe, then serves calls from
the executor's broadcast queue until told to shut down. A call that raises
is answered with the error and ends the process: a rank whose step failed
cannot be trusted to stay in step with the others. When the executor's
process goes away (the death pipe reads end-of-file), the worker exits too.

Thread count: each rank gets its share of the machine's cores, set in the
environment before torch is imported (setting it later from a spawned
process can deadlock OpenMP's start-up).
"""

from __future__ import annotations

import os
import threading
import traceback
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from pagoda.config import PagodaConfig
    from pagoda.worker.rpc_messages import RpcCall
    from pagoda.worker.worker import Worker

# Calls without an argument a worker serves; the ones with one are dispatched by name below.
_PLAIN_CALLS = frozenset({"load_model", "determine_available_memory", "kv_store_metrics", "mm_metrics",
                          "flush_kv_store", "shutdown"})


def run_worker(config_bytes: bytes, rank: int, init_method: str, broadcast_handle_bytes: bytes,
               ready_pipe: Connection, death_pipe: Connection, num_threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(num_threads)
    threading.Thread(target=_exit_when_parent_dies, args=(death_pipe,), daemon=True).start()
    from pagoda.config import PagodaConfig
    from pagoda.distributed.shm_broadcast import MessageQueue, MessageQueueHandle, MessageQueueReader
    from pagoda.worker.rpc_messages import RpcCall, RpcResult, WorkerReady

    try:
        config = msgspec.msgpack.decode(config_bytes, type=PagodaConfig)
        worker = _build_worker(config, rank, init_method, num_threads)
        responses = MessageQueue(num_readers=1)
        calls = MessageQueueReader(msgspec.msgpack.decode(broadcast_handle_bytes, type=MessageQueueHandle), rank,
                                   msg_type=RpcCall)
    except BaseException as error:  # the executor is waiting for this pipe: tell it why, then stop
        ready_pipe.send_bytes(msgspec.msgpack.encode(WorkerReady(error=f"{type(error).__name__}: {error}")))
        raise
    ready_pipe.send_bytes(msgspec.msgpack.encode(WorkerReady(responses=responses.handle)))
    responses.wait_for_readers()
    while True:
        call = calls.dequeue()
        answers = call.reply_rank is None or call.reply_rank == rank
        try:
            result = _dispatch(worker, call)
        except Exception as error:
            if answers:
                responses.enqueue(RpcResult(rank=rank, error=f"{type(error).__name__}: {error}\n"
                                                             f"{traceback.format_exc(limit=8)}"))
            raise
        if answers:
            responses.enqueue(RpcResult(rank=rank, result=msgspec.msgpack.encode(result)))
        if call.method == "shutdown":
            responses.close()
            return


def _build_worker(config: PagodaConfig, rank: int, init_method: str, num_threads: int) -> Worker:
    from pagoda.worker.worker import Worker, select_device

    return Worker(config, rank, num_threads=num_threads, init_method=init_method, device=select_device())


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
        death_pipe.recv()
    except EOFError:
        pass
    os._exit(1)  # the executor is gone: nobody will ever call this rank again
