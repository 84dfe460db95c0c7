"""Process plumbing: the memory allocator the engine and worker processes start with.

glibc malloc keeps freed memory in per-thread arenas that fragment when every
step allocates tensors of a different size (a server's batches vary step by
step): measured over 1280 mixed requests (a 256 MiB KV cache), the engine's
RSS kept climbing for as long as it ran (+246 MiB over the last 640, and
still rising), where jemalloc levelled off (+26 MiB over the same 640) at
the same speed (346 vs 351 s for the run). The allocator must be chosen before a
process starts, so it is preloaded (`LD_PRELOAD`) into the processes Pagoda
spawns; the process that imported Pagoda keeps its own. vLLM's CPU images
preload tcmalloc for the same reason.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from pagoda import envs


def jemalloc_library() -> str | None:
    """The installed jemalloc's library name for the dynamic loader (None: not installed, or not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.util.find_library("jemalloc")


@contextmanager
def preloaded_allocator() -> Iterator[None]:
    """While inside, processes started from here preload jemalloc (unless `PAGODA_ALLOCATOR=system`, it is
    missing, or `LD_PRELOAD` already names a library: the user's choice wins)."""
    library = jemalloc_library() if envs.allocator() == "jemalloc" else None
    if library is None or os.environ.get("LD_PRELOAD"):
        yield
        return
    os.environ["LD_PRELOAD"] = library
    try:
        yield
    finally:
        del os.environ["LD_PRELOAD"]
