"""Worker layer: the CPU decode-attention kernel (cpu_decode_attention.cpp) behind one Python call.

Decode rows attend straight from the paged KV cache, so no layer copies its
blocks. The library is compiled on first use (about a second, once per
machine and source version, then loaded from the cache in milliseconds).
Without a compiler, or when the build or load fails, one warning is logged
and `load_cpu_decode_attention()` returns None: the portable PyTorch path
runs instead.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pagoda.kernels.native_build import NativeBuildError, build_shared_library
from pagoda.models.interfaces import AttentionLayerSpec

if TYPE_CHECKING:  # paged_attention imports this module
    from pagoda.worker.attention.paged_attention import DecodeMetadata

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_decode_attention.cpp")
_ENTRY_POINTS = {torch.float32: "pagoda_decode_attention_f32", torch.bfloat16: "pagoda_decode_attention_bf16"}
# The kernel's value pass works on 64 lanes of head_dim at a time (kLanes * kChunksPerPass).
_HEAD_DIM_MULTIPLE = 64


class _DecodeAttentionArgs(ctypes.Structure):
    """The C++ `DecodeAttentionArgs`, field for field."""

    _fields_ = [
        ("query", ctypes.c_void_p),
        ("key_cache", ctypes.c_void_p),
        ("value_cache", ctypes.c_void_p),
        ("output", ctypes.c_void_p),
        ("token_indices", ctypes.c_void_p),
        ("block_ids", ctypes.c_void_p),
        ("key_ranges", ctypes.c_void_p),
        ("num_rows", ctypes.c_int64),
        ("max_blocks", ctypes.c_int64),
        ("block_size", ctypes.c_int64),
        ("num_heads", ctypes.c_int64),
        ("num_kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("scale", ctypes.c_float),
        ("softcap", ctypes.c_float),
    ]


class CpuDecodeAttention:
    """Decode attention over contiguous CPU tensors in float32 or bfloat16, read from the paged cache."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._entry_points: dict[torch.dtype, ctypes._CFuncPtr] = {}
        for dtype, name in _ENTRY_POINTS.items():
            function = getattr(library, name)
            function.argtypes = [ctypes.POINTER(_DecodeAttentionArgs)]
            function.restype = None
            self._entry_points[dtype] = function

    def supports(self, query: torch.Tensor, key_cache: torch.Tensor) -> bool:
        return (query.device.type == "cpu" and query.dtype == key_cache.dtype and query.dtype in self._entry_points
                and key_cache.shape[-1] % _HEAD_DIM_MULTIPLE == 0)

    def __call__(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 output: torch.Tensor, decode: DecodeMetadata, spec: AttentionLayerSpec) -> None:
        """Write each decode row's attention into its token of `output` ([T, num_heads, head_dim])."""
        tensors = (query, key_cache, value_cache, output, decode.token_indices, decode.block_ids, decode.key_ranges)
        # The kernel indexes raw memory: a wrong layout would read garbage, not raise.
        assert all(t.is_contiguous() for t in tensors), "decode kernel needs contiguous tensors"
        assert decode.block_ids.dtype == decode.key_ranges.dtype == decode.token_indices.dtype == torch.int64
        _, block_size, num_kv_heads, head_dim = key_cache.shape
        args = _DecodeAttentionArgs(
            *(t.data_ptr() for t in tensors),
            num_rows=decode.block_ids.shape[0],
            max_blocks=decode.block_ids.shape[1],
            block_size=block_size,
            num_heads=query.shape[1],
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            scale=spec.scale,
            softcap=spec.logit_softcap or 0.0,
        )
        self._entry_points[query.dtype](ctypes.byref(args))


@functools.cache
def load_cpu_decode_attention() -> CpuDecodeAttention | None:
    """The kernel, built or loaded once per process; None (logged once) when it cannot be had."""
    try:
        return CpuDecodeAttention(ctypes.CDLL(str(build_shared_library(_SOURCE))))
    except (NativeBuildError, OSError, AttributeError) as err:
        logger.warning("CPU decode attention kernel unavailable, using the PyTorch path: %s", err)
        return None
