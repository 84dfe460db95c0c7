"""Tests for the models layer: a dense reference `AttentionContext` that keeps every sequence's keys and values.

Written for clarity, not speed: each step's flat batch is split per
sequence, new keys/values are appended to that sequence's per-layer lists,
and each query attends over an explicit mask (token i sees j iff
0 <= i - j, and i - j < window for sliding layers; or i and j in one of the
sequence's bidirectional runs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pagoda.models.interfaces import AttentionLayerSpec


class DenseAttention:
    """`AttentionContext` over whole sequences held in memory; call `begin_step` before each forward."""

    def __init__(self, specs: list[AttentionLayerSpec]) -> None:
        self.specs = specs
        self.keys: dict[int, list[Tensor | None]] = {}
        self.values: dict[int, list[Tensor | None]] = {}
        self.step: list[tuple[int, int]] = []
        self.runs: dict[int, list[tuple[int, int]]] = {}

    def begin_step(self, seq_ids: list[int], num_tokens: list[int],
                   bidirectional_runs: list[list[tuple[int, int]]] | None = None) -> None:
        """The flat batch of the next forward: `num_tokens[i]` new tokens of sequence `seq_ids[i]`, in order.

        `bidirectional_runs[i]`: absolute position ranges [start, end) of sequence i whose tokens all see
        each other (see `AttentionContext`).
        """
        self.step = list(zip(seq_ids, num_tokens))
        for index, seq_id in enumerate(seq_ids):
            self.runs[seq_id] = list(bidirectional_runs[index]) if bidirectional_runs is not None else []
        for seq_id in seq_ids:
            self.keys.setdefault(seq_id, [None] * len(self.specs))
            self.values.setdefault(seq_id, [None] * len(self.specs))

    def forward(self, layer_index: int, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        out, start = [], 0
        for seq_id, count in self.step:
            end = start + count
            out.append(self._attend(seq_id, layer_index, query[start:end], key[start:end], value[start:end]))
            start = end
        assert start == query.shape[0], "begin_step token counts do not match the batch"
        return torch.cat(out)

    def _attend(self, seq_id: int, layer: int, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        spec = self.specs[layer]
        old_k, old_v = self.keys[seq_id][layer], self.values[seq_id][layer]
        keys = key if old_k is None else torch.cat([old_k, key])
        values = value if old_v is None else torch.cat([old_v, value])
        self.keys[seq_id][layer], self.values[seq_id][layer] = keys, values

        groups = spec.num_heads // spec.num_kv_heads
        k = keys.repeat_interleave(groups, dim=1).transpose(0, 1)  # [heads, S, D]
        v = values.repeat_interleave(groups, dim=1).transpose(0, 1)
        q = query.transpose(0, 1)  # [heads, T, D]
        scores = (q @ k.transpose(1, 2)) * spec.scale
        if spec.logit_softcap is not None:
            scores = torch.tanh(scores / spec.logit_softcap) * spec.logit_softcap
        q_pos = torch.arange(keys.shape[0] - query.shape[0], keys.shape[0], device=query.device)
        distance = q_pos[:, None] - torch.arange(keys.shape[0], device=query.device)[None, :]
        visible = distance >= 0
        if spec.sliding_window is not None:
            visible &= distance < spec.sliding_window
        k_pos = torch.arange(keys.shape[0], device=query.device)
        for start, end in self.runs[seq_id]:
            assert end <= keys.shape[0], f"run [{start}, {end}) extends past the keys computed so far"
            visible |= ((q_pos >= start) & (q_pos < end))[:, None] & ((k_pos >= start) & (k_pos < end))[None, :]
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        return (probs @ v).transpose(0, 1)


@torch.no_grad()
def prefill_logits(model: torch.nn.Module, token_ids: list[int]) -> Tensor:
    """float32 logits [len(token_ids), vocab] of one sequence run in a single forward."""
    attention = DenseAttention(model.attention_layer_specs())
    attention.begin_step([0], [len(token_ids)])
    hidden = model(torch.tensor(token_ids), torch.arange(len(token_ids)), attention)
    return model.compute_logits(hidden)


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, token_ids: list[int], num_new_tokens: int) -> list[int]:
    """Prefill once, then decode one token per forward against the stored keys and values."""
    attention = DenseAttention(model.attention_layer_specs())
    new_ids = list(token_ids)
    step_ids, position = list(token_ids), 0
    for _ in range(num_new_tokens):
        attention.begin_step([0], [len(step_ids)])
        positions = torch.arange(position, position + len(step_ids))
        hidden = model(torch.tensor(step_ids), positions, attention)
        next_id = int(model.compute_logits(hidden[-1:]).argmax(dim=-1))
        new_ids.append(next_id)
        position += len(step_ids)
        step_ids = [next_id]
    return new_ids[len(token_ids):]
