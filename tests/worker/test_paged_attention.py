"""Paged attention equals dense causal attention, with and without a sliding window, on both decode paths.

Decodes run either on the portable PyTorch path or on the CPU kernel
(`cpu_decode_attention`, skipped where it cannot be built); prefill chunks
always take the portable path.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pagoda.models.interfaces import AttentionLayerSpec
from pagoda.worker.attention import metadata as metadata_module
from pagoda.worker.attention import paged_attention
from pagoda.worker.attention.cpu_decode_attention import load_cpu_decode_attention
from pagoda.worker.attention.metadata import build_group_metadata
from pagoda.worker.attention.paged_attention import PagedAttention

# head_dim 64: the smallest the CPU decode kernel takes.
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 4, 2, 64, 4, 64


@pytest.fixture(params=["portable", "cpu_kernel"])
def decode_path(request, monkeypatch) -> str:
    if request.param == "portable":
        monkeypatch.setattr(paged_attention, "load_cpu_decode_attention", lambda: None)
    elif load_cpu_decode_attention() is None:
        pytest.skip("the CPU decode kernel cannot be built here")
    return request.param


def dense_reference(q, k, v, spec: AttentionLayerSpec, runs: list[tuple[int, int]] = ()) -> torch.Tensor:
    """One sequence, all positions: q [n, H, D], k/v [n, KVH, D]; each run's positions all see each other."""
    n = q.shape[0]
    group = NUM_HEADS // NUM_KV_HEADS
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * spec.scale
    if spec.logit_softcap is not None:
        scores = spec.logit_softcap * torch.tanh(scores / spec.logit_softcap)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    allowed = j <= i
    if spec.sliding_window is not None:
        allowed &= i - j < spec.sliding_window
    for start, end in runs:
        allowed |= (start <= i) & (i < end) & (start <= j) & (j < end)
    scores = scores.masked_fill(~allowed, -math.inf)
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def run_steps(seq_lens: list[int], chunks: list[list[int]], spec: AttentionLayerSpec, null_outside: bool = False,
              runs: list[list[tuple[int, int]]] | None = None):
    """Feed each sequence through the paged path in the given chunk schedule; return per-sequence outputs.

    `runs[i]`: sequence i's bidirectional runs; each step passes those that intersect its tokens."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    qkv = [(torch.randn(n, NUM_HEADS, HEAD_DIM), torch.randn(n, NUM_KV_HEADS, HEAD_DIM),
            torch.randn(n, NUM_KV_HEADS, HEAD_DIM)) for n in seq_lens]
    kv_cache = torch.zeros(2, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    free = list(rng.permutation(np.arange(1, NUM_BLOCKS)))
    max_blocks = max(-(-n // BLOCK_SIZE) for n in seq_lens)
    table = np.zeros((len(seq_lens), max_blocks), dtype=np.int64)
    for row, n in enumerate(seq_lens):
        for b in range(-(-n // BLOCK_SIZE)):
            table[row, b] = free.pop()
    num_blocks = np.array([-(-n // BLOCK_SIZE) for n in seq_lens])
    outputs = [torch.zeros(n, NUM_HEADS, HEAD_DIM) for n in seq_lens]
    computed = np.zeros(len(seq_lens), dtype=np.int64)
    for step in chunks:
        scheduled = np.array(step, dtype=np.int64)
        rows = np.repeat(np.arange(len(seq_lens)), scheduled)
        starts = np.concatenate(([0], np.cumsum(scheduled)))
        positions = computed[rows] + np.arange(starts[-1]) - starts[rows]
        step_table = table.copy()
        if null_outside and spec.sliding_window is not None:
            # Blocks wholly outside every query's window may already be the null block.
            for row in range(len(seq_lens)):
                first_needed = max(int(computed[row]) - spec.sliding_window + 1, 0) // BLOCK_SIZE
                step_table[row, :first_needed] = 0
        step_runs = None if runs is None else [
            [(a, b) for a, b in runs[row] if a < computed[row] + scheduled[row] and b > computed[row]]
            for row in range(len(seq_lens))]
        metadata = build_group_metadata(step_table, num_blocks, computed, scheduled, positions, rows, BLOCK_SIZE,
                                        spec.sliding_window, torch.device("cpu"), step_runs)
        context = PagedAttention([spec], [kv_cache], [0], [metadata])
        q = torch.cat([qkv[r][0][int(p)][None] for r, p in zip(rows, positions)])
        k = torch.cat([qkv[r][1][int(p)][None] for r, p in zip(rows, positions)])
        v = torch.cat([qkv[r][2][int(p)][None] for r, p in zip(rows, positions)])
        out = context.forward(0, q, k, v)
        for t, (r, p) in enumerate(zip(rows, positions)):
            outputs[r][int(p)] = out[t]
        computed += scheduled
    return qkv, outputs


@pytest.mark.parametrize("window", [None, 5, 9])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_paged_equals_dense_with_chunked_prefill_and_decodes(window, softcap, decode_path):
    spec = AttentionLayerSpec(NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, scale=HEAD_DIM**-0.5,
                              sliding_window=window, logit_softcap=softcap)
    seq_lens = [13, 7, 21]
    # Mixed steps: chunked prefills beside single-token decodes.
    chunks = [[5, 6, 8], [4, 1, 8], [4, 0, 5]] + [[0, 0, 0]] * 0
    remaining = np.array(seq_lens) - np.sum(chunks, axis=0)
    while remaining.any():
        step = [1 if r > 0 else 0 for r in remaining]
        chunks.append(step)
        remaining -= np.array(step)
    qkv, outputs = run_steps(seq_lens, chunks, spec, null_outside=True)
    for (q, k, v), out in zip(qkv, outputs):
        torch.testing.assert_close(out, dense_reference(q, k, v, spec), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [((3, 4, 1, 8), (3, 2, 12, 8)), ((4, 40, 8), (2, 40, 8))])
def test_matmul_path_equals_sdpa_path(shape):
    q_shape, kv_shape = shape
    torch.manual_seed(1)
    q, k, v = torch.randn(q_shape), torch.randn(kv_shape), torch.randn(kv_shape)
    mask = torch.rand(*q_shape[:-3], 1, q_shape[-2], kv_shape[-2]) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    spec = AttentionLayerSpec(q_shape[-3], kv_shape[-3], q_shape[-1], scale=0.3)
    expected = paged_attention.sdpa_attend(q, k, v, mask if len(q_shape) == 4 else mask[0], spec)
    actual = paged_attention.matmul_attend(q, k, v, mask if len(q_shape) == 4 else mask[0], spec)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_long_prefill_is_split_into_query_chunks(monkeypatch):
    monkeypatch.setattr(paged_attention, "_MAX_SCORE_ELEMENTS", 4 * 21 * 5)
    spec = AttentionLayerSpec(NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, scale=HEAD_DIM**-0.5)
    qkv, outputs = run_steps([21], [[21]], spec)
    q, k, v = qkv[0]
    torch.testing.assert_close(outputs[0], dense_reference(q, k, v, spec), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 5, 9])
def test_prefill_tiles_see_exactly_their_keys(monkeypatch, window):
    # Tiles of 3 queries: several per chunk, later chunks start mid-sequence, windows cut keys on the left.
    monkeypatch.setattr(metadata_module, "PREFILL_QUERY_TILE", 3)
    spec = AttentionLayerSpec(NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, scale=HEAD_DIM**-0.5, sliding_window=window)
    seq_lens = [21, 16]
    qkv, outputs = run_steps(seq_lens, [[10, 7], [11, 9]], spec, null_outside=True)
    for (q, k, v), out in zip(qkv, outputs):
        torch.testing.assert_close(out, dense_reference(q, k, v, spec), atol=1e-5, rtol=1e-5)
    tiles = build_group_metadata(np.array([[1, 2, 3, 4, 5, 6]]), np.array([6]), np.array([10]), np.array([11]),
                                 np.arange(10, 21), np.zeros(11, dtype=np.int64), BLOCK_SIZE, window,
                                 torch.device("cpu")).prefills[0].tiles
    assert [(t.query_begin, t.query_end) for t in tiles] == [(0, 3), (3, 6), (6, 9), (9, 11)]
    key_start = 0 if window is None else max(10 - window + 1, 0) // BLOCK_SIZE * BLOCK_SIZE
    # The last tile's queries are positions 19..20: they see keys through position 20.
    assert tiles[-1].key_end == 21 - key_start
    if window is not None:
        assert tiles[-1].key_begin == 19 - window + 1 - key_start  # the window of position 19 starts there


# Bidirectional runs (an image crop's soft tokens): see metadata.py's docstring.


def _prefill_metadata(computed: int, scheduled: int, window: int | None, runs: list[tuple[int, int]] | None):
    table = np.arange(1, 9)[None, :]
    positions = np.arange(computed, computed + scheduled)
    return build_group_metadata(table, np.array([8]), np.array([computed]), np.array([scheduled]), positions,
                                np.zeros(scheduled, dtype=np.int64), BLOCK_SIZE, window, torch.device("cpu"),
                                None if runs is None else [runs]).prefills[0]


def _visible(query_positions, key_positions, window, runs) -> np.ndarray:
    q, k = np.asarray(query_positions)[:, None], np.asarray(key_positions)[None, :]
    visible = (k <= q) & (True if window is None else k > q - window)
    for start, end in runs:
        visible |= (start <= q) & (q < end) & (start <= k) & (k < end)
    return visible


@pytest.mark.parametrize("window", [None, 6])
def test_run_mask_is_causal_window_or_same_run(window):
    runs = [(3, 7), (9, 12)]
    prefill = _prefill_metadata(0, 16, window, runs)
    key_positions = np.arange(prefill.mask.shape[1])
    assert np.array_equal(prefill.mask.numpy(), _visible(np.arange(16), key_positions, window, runs))
    # Position 3 sees the later keys of its run, and, sliding or not, 11 sees 9 and 10 of its own.
    assert prefill.mask[3, 6] and not prefill.mask[3, 7] and prefill.mask[11, 9]


def test_rows_without_runs_get_the_same_metadata():
    plain, empty = _prefill_metadata(5, 11, 6, None), _prefill_metadata(5, 11, 6, [])
    assert torch.equal(plain.mask, empty.mask) and torch.equal(plain.block_ids, empty.block_ids)
    assert plain.tiles == empty.tiles


def test_tiles_reach_the_later_keys_of_their_runs(monkeypatch):
    monkeypatch.setattr(metadata_module, "PREFILL_QUERY_TILE", 3)
    # Run [4, 9) spans the tiles [3, 6) and [6, 9); tile [0, 3) has no run.
    prefill = _prefill_metadata(0, 12, None, [(4, 9)])
    assert [(t.query_begin, t.query_end, t.key_begin, t.key_end) for t in prefill.tiles] == [
        (0, 3, 0, 3), (3, 6, 0, 9), (6, 9, 0, 9), (9, 12, 0, 12)]


def test_a_run_started_before_the_chunk_reaches_back_into_the_cache(monkeypatch):
    # A prefix hit ends at 8, inside run [6, 11): queries 8..10 see the cached keys 6, 7 and the later 9, 10.
    monkeypatch.setattr(metadata_module, "PREFILL_QUERY_TILE", 2)
    window = 6
    prefill = _prefill_metadata(8, 6, window, [(6, 11)])
    key_start = (8 - window + 1) // BLOCK_SIZE * BLOCK_SIZE
    assert int(prefill.block_ids[0]) == 1 + key_start // BLOCK_SIZE
    key_positions = key_start + np.arange(prefill.mask.shape[1])
    assert np.array_equal(prefill.mask.numpy(), _visible(np.arange(8, 14), key_positions, window, [(6, 11)]))
    assert prefill.mask[0, 10 - key_start]  # query 8 sees key 10
    ranges = [(t.key_begin + key_start, t.key_end + key_start) for t in prefill.tiles]
    assert ranges == [(3, 11), (5, 12), (7, 14)]  # queries 8-9 reach the run's end, 11, past their causal 10


def test_a_run_past_the_chunk_end_is_refused():
    with pytest.raises(AssertionError, match=r"run \[4, 9\) extends past this step's tokens"):
        _prefill_metadata(0, 8, None, [(4, 9)])
    with pytest.raises(AssertionError, match="longer than the sliding window"):
        _prefill_metadata(0, 12, 4, [(2, 8)])


@pytest.mark.parametrize("window", [None, 7])
def test_paged_equals_dense_with_runs_across_chunks_and_decodes(window, monkeypatch, decode_path):
    monkeypatch.setattr(metadata_module, "PREFILL_QUERY_TILE", 3)
    spec = AttentionLayerSpec(NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, scale=HEAD_DIM**-0.5, sliding_window=window)
    seq_lens = [20, 14]
    # Chunks end at 9 and 6: never inside a run. Sequence 1 later has a decode step right after its run.
    runs = [[(2, 6), (7, 9), (12, 17)], [(1, 5), (8, 13)]]
    chunks = [[9, 6], [11, 7], [0, 1]]
    qkv, outputs = run_steps(seq_lens, chunks, spec, runs=runs)
    for (q, k, v), out, seq_runs in zip(qkv, outputs, runs):
        torch.testing.assert_close(out, dense_reference(q, k, v, spec, seq_runs), atol=1e-5, rtol=1e-5)
