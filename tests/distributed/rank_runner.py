"""Tests for tensor parallelism: run a function on N gloo ranks, each its own spawned process on loopback.

`run_ranks(world_size, fn, *args)` starts one process per rank (one thread
each, as a TP worker runs), joins them into a process group on a free port
of 127.0.0.1, calls `fn(tp, *args)` with the rank's `TensorParallelGroup`,
and returns every rank's result in rank order (results must pickle by value:
numbers, lists, numpy arrays). A rank that raises fails the call with its
traceback; ranks that do not finish by the deadline are killed.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, timeout_s: float, results: mp.Queue,
               fn: Callable[..., Any], args: tuple) -> None:
    import torch

    from pagoda.distributed.parallel_state import destroy_tensor_parallel, init_tensor_parallel

    torch.set_num_threads(1)
    try:
        tp = init_tensor_parallel(rank, world_size, f"tcp://127.0.0.1:{port}", torch.device("cpu"), timeout_s)
        try:
            results.put((rank, True, fn(tp, *args)))
        finally:
            destroy_tensor_parallel(tp)
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_ranks(world_size: int, fn: Callable[..., Any], *args: Any, deadline_s: float = 300.0,
              pg_timeout_s: float = 60.0) -> list[Any]:
    """fn(tp, *args) on every rank of a fresh gloo group; the results in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    processes = [ctx.Process(target=_rank_main, args=(rank, world_size, port, pg_timeout_s, results, fn, args),
                             daemon=True) for rank in range(world_size)]
    for process in processes:
        process.start()
    answers: dict[int, tuple[bool, Any]] = {}
    end = time.monotonic() + deadline_s
    try:
        while len(answers) < world_size:
            try:
                rank, ok, value = results.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"ranks {sorted(set(range(world_size)) - set(answers))} did not finish "
                                     f"within {deadline_s} s") from None
            answers[rank] = (ok, value)
    finally:
        for process in processes:
            process.join(timeout=max(0.1, end - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
    failures = [f"rank {rank}:\n{value}" for rank, (ok, value) in sorted(answers.items()) if not ok]
    if failures:
        raise AssertionError("\n".join(failures))
    return [answers[rank][1] for rank in range(world_size)]
