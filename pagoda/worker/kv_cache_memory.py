"""Worker layer: allocates the paged KV cache's tensors without touching their memory.

The cache is neither zeroed nor filled at start-up. On the virtual machines
Pagoda runs on, the first write to each 4 KiB page of fresh memory is a
fault the host must serve: zeroing a 4 GiB cache cost ~9 s of start-up, for
blocks most runs never use. Left untouched, a page is faulted in when a
block first receives KV. Nothing ever reads a slot before it is written (or
counts what it reads there): attention takes only the keys its mask allows,
and the portable decode path zeroes the masked values it gathered, so stale
or garbage bytes, NaN included, never reach an output (tests/worker prove it
with a poisoned cache).

On Linux the host cache is advised to use transparent huge pages: 512 times
fewer faults when blocks are first used, and fewer TLB misses when attention
reads them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

import torch

logger = logging.getLogger(__name__)

_MADV_HUGEPAGE = 14
_HUGE_PAGE_BYTES = 2 << 20


def allocate_kv_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised KV tensor; host memory is advised to use huge pages."""
    tensor = torch.empty(shape, dtype=dtype, device=device)
    if tensor.device.type == "cpu":
        advise_huge_pages(tensor)
    return tensor


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """madvise(MADV_HUGEPAGE) on the 2 MiB-aligned interior of a CPU tensor; False where not possible."""
    if not sys.platform.startswith("linux"):
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    aligned_start = -(-start // _HUGE_PAGE_BYTES) * _HUGE_PAGE_BYTES
    aligned_end = end // _HUGE_PAGE_BYTES * _HUGE_PAGE_BYTES
    if aligned_end <= aligned_start:
        return False
    libc = _libc()
    if libc is None or libc.madvise(aligned_start, aligned_end - aligned_start, _MADV_HUGEPAGE) != 0:
        logger.debug("madvise(MADV_HUGEPAGE) refused for the KV cache (errno %d)", ctypes.get_errno())
        return False
    return True


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc
