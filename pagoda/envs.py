"""Shared contract: every environment variable Pagoda reads, read in this one module."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where converted models live (`PAGODA_CACHE_DIR`, default ~/.cache/pagoda)."""
    return Path(os.environ.get("PAGODA_CACHE_DIR", Path.home() / ".cache" / "pagoda"))


def log_level() -> str:
    return os.environ.get("PAGODA_LOG_LEVEL", "INFO").upper()


def ray_tcp_only() -> bool:
    """`PAGODA_RAY_TCP_ONLY=1`: the Ray executor treats every rank as on another machine (TCP queues, no
    shared memory) — how the multi-node path is exercised on one machine."""
    return os.environ.get("PAGODA_RAY_TCP_ONLY", "") == "1"


def cuda_visible_devices() -> str | None:
    """`CUDA_VISIBLE_DEVICES` as set (None: unset; "" or "-1" hides every GPU)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def allocator() -> str:
    """`PAGODA_ALLOCATOR`: "jemalloc" (default; preloaded into the engine and worker processes when the library
    is installed) or "system" (glibc malloc, whose arenas fragment under a server's varying batch shapes)."""
    value = os.environ.get("PAGODA_ALLOCATOR", "jemalloc").lower()
    if value not in ("jemalloc", "system"):
        raise ValueError(f"PAGODA_ALLOCATOR must be 'jemalloc' or 'system', got {value!r}")
    return value
