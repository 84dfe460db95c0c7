"""The CPU decode-attention kernel equals plain attention over each row's visible keys, and falls back cleanly."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from pagoda.kernels import native_build
from pagoda.models.interfaces import AttentionLayerSpec
from pagoda.worker.attention import cpu_decode_attention
from pagoda.worker.attention.cpu_decode_attention import load_cpu_decode_attention
from pagoda.worker.attention.metadata import build_group_metadata

BLOCK_SIZE, NUM_BLOCKS = 4, 96


@pytest.fixture(scope="module")
def kernel():
    loaded = load_cpu_decode_attention()
    if loaded is None:
        pytest.skip("the CPU decode kernel cannot be built here")
    return loaded


def make_decode_batch(context_lens: list[int], spec: AttentionLayerSpec, dtype: torch.dtype):
    """A paged cache holding each row's keys, blocks outside the window set to the (NaN-filled) null block."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    cache = torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, spec.num_kv_heads, spec.head_dim).to(dtype)
    cache[:, 0] = math.nan  # the null block: the kernel must never read it
    free = list(rng.permutation(np.arange(1, NUM_BLOCKS)))
    num_rows = len(context_lens)
    max_blocks = max(-(-n // BLOCK_SIZE) for n in context_lens) + 1
    table = np.zeros((num_rows, max_blocks), dtype=np.int64)
    num_blocks = np.array([-(-n // BLOCK_SIZE) for n in context_lens])
    for row, n in enumerate(context_lens):
        table[row, : num_blocks[row]] = [free.pop() for _ in range(num_blocks[row])]
        if spec.sliding_window is not None:
            first_needed = max(n - spec.sliding_window, 0) // BLOCK_SIZE
            table[row, :first_needed] = 0
    # Each row decodes its last position.
    computed = np.array(context_lens, dtype=np.int64) - 1
    metadata = build_group_metadata(table, num_blocks, computed, np.ones(num_rows, dtype=np.int64), computed,
                                    np.arange(num_rows), BLOCK_SIZE, spec.sliding_window, torch.device("cpu"))
    query = torch.randn(num_rows, spec.num_heads, spec.head_dim).to(dtype)
    return cache, table, query, metadata.decode


def reference(cache, table, query, context_lens, spec: AttentionLayerSpec) -> torch.Tensor:
    """float64 attention of each row's last position over its visible keys, read one by one from the table."""
    group = spec.num_heads // spec.num_kv_heads
    outputs = []
    for row, n in enumerate(context_lens):
        first = 0 if spec.sliding_window is None else max(n - spec.sliding_window, 0)
        slots = [(table[row, j // BLOCK_SIZE], j % BLOCK_SIZE) for j in range(first, n)]
        k = torch.stack([cache[0, b, o] for b, o in slots]).double().repeat_interleave(group, dim=1)
        v = torch.stack([cache[1, b, o] for b, o in slots]).double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,khd->hk", query[row].double(), k) * spec.scale
        if spec.logit_softcap is not None:
            scores = spec.logit_softcap * torch.tanh(scores / spec.logit_softcap)
        outputs.append(torch.einsum("hk,khd->hd", scores.softmax(-1), v))
    return torch.stack(outputs)


def run_kernel(kernel, cache, query, decode, spec: AttentionLayerSpec) -> torch.Tensor:
    assert kernel.supports(query, cache[0])
    output = torch.full_like(query, math.nan)
    kernel(query, cache[0], cache[1], output, decode, spec)
    return output


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 1), (8, 2), (9, 3), (10, 1)])
@pytest.mark.parametrize("window,softcap", [(None, None), (6, None), (13, 30.0), (None, 5.0)])
def test_float32_equals_reference(kernel, num_heads, num_kv_heads, window, softcap):
    """GQA groups of 4, 4, 3 and 10 (three passes), windows, softcap, ragged lengths; the null block is NaN."""
    spec = AttentionLayerSpec(num_heads, num_kv_heads, 64, scale=64**-0.5, sliding_window=window,
                              logit_softcap=softcap)
    context_lens = [1, 5, 17, 40, 3, 26]
    cache, table, query, decode = make_decode_batch(context_lens, spec, torch.float32)
    actual = run_kernel(kernel, cache, query, decode, spec)
    torch.testing.assert_close(actual.double(), reference(cache, table, query, context_lens, spec),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim", [128, 256])
def test_bfloat16_is_close_to_reference(kernel, head_dim):
    spec = AttentionLayerSpec(4, 1, head_dim, scale=head_dim**-0.5, sliding_window=9)
    context_lens = [2, 30, 11, 64]
    cache, table, query, decode = make_decode_batch(context_lens, spec, torch.bfloat16)
    actual = run_kernel(kernel, cache, query, decode, spec)
    assert actual.dtype == torch.bfloat16
    # float32 inside: only the final rounding to bfloat16 (8 bits of mantissa) separates the two.
    torch.testing.assert_close(actual.double(), reference(cache, table, query, context_lens, spec),
                               atol=1e-2, rtol=1e-2)


def test_supports_only_matching_cpu_dtypes_and_head_dims(kernel):
    cache = torch.zeros(4, BLOCK_SIZE, 1, 64)
    assert kernel.supports(torch.zeros(2, 4, 64), cache)
    assert not kernel.supports(torch.zeros(2, 4, 64, dtype=torch.bfloat16), cache)
    assert not kernel.supports(torch.zeros(2, 4, 64, dtype=torch.float16), cache.half())
    assert not kernel.supports(torch.zeros(2, 4, 32), torch.zeros(4, BLOCK_SIZE, 1, 32))


def test_build_failure_falls_back_with_one_warning(monkeypatch, caplog):
    def failing_build(source):
        raise native_build.NativeBuildError("no C++ compiler (c++, g++ or clang++) on PATH")

    monkeypatch.setattr(cpu_decode_attention, "build_shared_library", failing_build)
    load_cpu_decode_attention.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert load_cpu_decode_attention() is None
            assert load_cpu_decode_attention() is None
    finally:
        load_cpu_decode_attention.cache_clear()
    assert sum("PyTorch path" in record.message for record in caplog.records) == 1


def test_build_is_cached_per_source(monkeypatch, tmp_path):
    if native_build.find_compiler() is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path))
    source = tmp_path / "answer.cpp"
    source.write_text('extern "C" int answer() { return 42; }\n')
    first = native_build.build_shared_library(source)
    built_at = first.stat().st_mtime_ns
    assert native_build.build_shared_library(source) == first and first.stat().st_mtime_ns == built_at
    source.write_text('extern "C" int answer() { return 43; }\n')
    assert native_build.build_shared_library(source) != first


def test_no_compiler_raises(monkeypatch, tmp_path):
    monkeypatch.setattr(native_build, "find_compiler", lambda: None)
    with pytest.raises(native_build.NativeBuildError, match="no C\\+\\+ compiler"):
        native_build.build_shared_library(tmp_path / "missing.cpp")
