"""Worker layer: builds each KV cache group's attention metadata for one step (numpy, then one copy).

Index arithmetic for a request whose tokens [c, c + n) are computed this step
(c = computed tokens, bs = block size, W = sliding window or none):

    positions      c ............ c+n-1
    blocks needed  first = max(0, c - W + 1) // bs   (0 for full attention)
                   last  = (c + n - 1) // bs
    key positions  first*bs ... (last+1)*bs - 1, masked to  k <= q  and  k > q - W

Blocks outside the window may be the null block (freed by the scheduler):
their keys are always masked out.

Bidirectional runs (an image crop's soft tokens, absolute positions
[s, e)): a query inside a run also sees every key of the run, later ones
included, in sliding and global layers alike:

    visible(q, k) = (k <= q and k > q - W)  or  (s <= q < e and s <= k < e)

A run may start before this step's tokens (a prefix-cache hit inside it) but
never ends after them: its later keys must be in the cache when its queries
are attended. In a sliding group it is no longer than the window, so its
keys lie in the blocks the window gathers anyway; only a query tile's key
range grows, to a run's end. A row without runs costs nothing extra.
"""

from __future__ import annotations

import numpy as np
import torch

from pagoda.worker.attention.paged_attention import (
    DecodeMetadata,
    GroupAttentionMetadata,
    PrefillMetadata,
    QueryTile,
)


def build_group_metadata(
    block_table: np.ndarray,  # [R, max_blocks] block ids of the batch rows
    num_blocks: np.ndarray,  # [R] how many entries of each row are valid
    num_computed: np.ndarray,  # [R]
    num_scheduled: np.ndarray,  # [R]
    positions: np.ndarray,  # [T] flat positions
    row_of_token: np.ndarray,  # [T]
    block_size: int,
    sliding_window: int | None,
    device: torch.device,
    bidirectional_runs: list[list[tuple[int, int]]] | None = None,  # [R] runs [start, end) of each row
) -> GroupAttentionMetadata:
    slots = block_table[row_of_token, positions // block_size] * block_size + positions % block_size
    query_start = np.concatenate(([0], np.cumsum(num_scheduled)))
    decode_rows = np.flatnonzero(num_scheduled == 1)
    decode = None
    if decode_rows.size:
        decode = _build_decode(block_table, num_blocks, num_computed, decode_rows, query_start,
                               block_size, sliding_window, device)
    if bidirectional_runs is not None:
        if len(bidirectional_runs) != len(num_scheduled):
            raise ValueError(f"bidirectional_runs has {len(bidirectional_runs)} rows, the batch "
                             f"{len(num_scheduled)}")
        # A one-token row's query is the last of any run it is in, so it sees the run causally: only check.
        for row in decode_rows:
            _runs_in_step(bidirectional_runs[row], int(num_computed[row]), 1, sliding_window)
    prefills = []
    for row in np.flatnonzero(num_scheduled > 1):
        computed, scheduled = int(num_computed[row]), int(num_scheduled[row])
        runs = [] if bidirectional_runs is None else _runs_in_step(bidirectional_runs[row], computed, scheduled,
                                                                  sliding_window)
        prefills.append(_build_prefill(block_table[row], computed, scheduled, int(query_start[row]), block_size,
                                       sliding_window, runs, device))
    return GroupAttentionMetadata(
        slot_mapping=torch.from_numpy(slots).to(device), decode=decode, prefills=prefills
    )


# Prefill queries are attended in tiles of this many, each against only the keys some query of it sees:
# causal halves the work, a sliding window bounds it, and a tile's float32 scores ([H, 256, keys]) stay
# small enough to land in reused memory rather than fresh pages. The same 8,000 prompt tokens as 4 prompts of
# 2,000: 12.2 -> 6.9 s (as 32 of 250, unchanged at 5.4 s).
PREFILL_QUERY_TILE = 256


def _key_mask(key_positions: np.ndarray, query_positions: np.ndarray, sliding_window: int | None) -> np.ndarray:
    mask = key_positions <= query_positions
    if sliding_window is not None:
        mask &= key_positions > query_positions - sliding_window
    return mask


def _build_decode(block_table: np.ndarray, num_blocks: np.ndarray, num_computed: np.ndarray, rows: np.ndarray,
                  query_start: np.ndarray, block_size: int, sliding_window: int | None,
                  device: torch.device) -> DecodeMetadata:
    query_pos = num_computed[rows]
    if sliding_window is None:
        first = np.zeros_like(query_pos)
    else:
        first = np.maximum(query_pos - sliding_window + 1, 0) // block_size
    # As many block columns as the longest row needs, not the whole window: a young sequence needs fewer.
    width = int((query_pos // block_size - first).max()) + 1
    cols = first[:, None] + np.arange(width)[None, :]
    in_table = cols < num_blocks[rows][:, None]
    ids = np.where(in_table, block_table[rows[:, None], np.minimum(cols, block_table.shape[1] - 1)], 0)
    key_pos = (cols[:, :, None] * block_size + np.arange(block_size)).reshape(len(rows), -1)
    mask = _key_mask(key_pos, query_pos[:, None], sliding_window)
    # The same visible keys as `mask`, as one range per row, counted from the row's first listed block.
    lowest = np.zeros_like(query_pos) if sliding_window is None else np.maximum(query_pos - sliding_window + 1, 0)
    key_ranges = np.stack((lowest, query_pos + 1), axis=1) - (first * block_size)[:, None]
    return DecodeMetadata(
        token_indices=torch.from_numpy(query_start[rows]).to(device),
        block_ids=torch.from_numpy(ids).to(device),
        mask=torch.from_numpy(mask[:, None, None, :]).to(device),
        key_ranges=torch.from_numpy(key_ranges).to(device),
    )


def _runs_in_step(runs: list[tuple[int, int]], computed: int, scheduled: int,
                  sliding_window: int | None) -> list[tuple[int, int]]:
    """The runs some query of this step lies in; each checked against what the step can attend."""
    step_end = computed + scheduled
    inside = []
    for start, end in runs:
        assert start < end, f"empty bidirectional run [{start}, {end})"
        if end <= computed:
            continue  # wholly before the step: its keys are seen causally
        assert end <= step_end, f"bidirectional run [{start}, {end}) extends past this step's tokens (< {step_end})"
        # Keys older than the window may sit in blocks the scheduler already freed.
        assert sliding_window is None or end - start <= sliding_window, (
            f"bidirectional run [{start}, {end}) is longer than the sliding window {sliding_window}")
        inside.append((start, end))
    return inside


def _build_prefill(row_blocks: np.ndarray, computed: int, scheduled: int, token_start: int, block_size: int,
                   sliding_window: int | None, runs: list[tuple[int, int]], device: torch.device) -> PrefillMetadata:
    first = 0 if sliding_window is None else max(computed - sliding_window + 1, 0) // block_size
    last = (computed + scheduled - 1) // block_size
    key_pos = np.arange(first * block_size, (last + 1) * block_size)
    query_pos = np.arange(computed, computed + scheduled)
    mask = _key_mask(key_pos[None, :], query_pos[:, None], sliding_window)
    key_start = first * block_size
    for start, end in runs:
        mask[max(start, computed) - computed : end - computed, start - key_start : end - key_start] = True
    tiles = []
    for begin in range(0, scheduled, PREFILL_QUERY_TILE):
        end = min(begin + PREFILL_QUERY_TILE, scheduled)
        # Causal: no query of the tile sees past its last; the window: none sees before its first one's window.
        keys_begin = 0 if sliding_window is None else max(computed + begin - sliding_window + 1 - key_start, 0)
        # A run is no longer than the window, so its first key is in every one of its queries' windows:
        # only its later keys reach past the causal end.
        keys_end = computed + end
        for run_start, run_end in runs:
            if run_start < computed + end and run_end > computed + begin:  # some query of the tile is in it
                keys_end = max(keys_end, run_end)
        tiles.append(QueryTile(begin, end, keys_begin, keys_end - key_start))
    return PrefillMetadata(
        token_start=token_start,
        token_end=token_start + scheduled,
        block_ids=torch.from_numpy(row_blocks[first : last + 1].copy()).to(device),
        mask=torch.from_numpy(mask).to(device),
        tiles=tiles,
    )
