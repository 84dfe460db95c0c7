"""Test helper: runs a model over a few sequences through the worker's real paged attention.

Each layer gets its own KV cache tensor; layers with the same sliding window
form one KV cache group, whose metadata `build_group_metadata` builds every
step from the sequences' block tables, exactly as the model runner does. The
image rows of a step (the embeddings of the soft tokens it computes) and its
soft-token runs are derived from the token ids, the way the worker's encoder
runner hands them over.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from tiny_gemma3 import IMAGE_TOKEN_ID, soft_token_runs

from pagoda.worker.attention.metadata import build_group_metadata
from pagoda.worker.attention.paged_attention import PagedAttention


@dataclass
class Sequence:
    token_ids: list[int]
    image_embeds: Tensor | None = None  # [number of soft tokens, hidden], in prompt order
    num_computed: int = 0
    block_ids: list[int] = field(default_factory=list)


class PagedHarness:
    def __init__(self, model: torch.nn.Module, block_size: int = 4, num_blocks: int = 512,
                 bidirectional: bool = True) -> None:
        self.model = model
        self.block_size = block_size
        self.bidirectional = bidirectional
        specs = model.attention_layer_specs()
        self.specs = specs
        self.windows = sorted({s.sliding_window for s in specs}, key=lambda w: (w is None, w or 0))
        self.layer_groups = [self.windows.index(s.sliding_window) for s in specs]
        dtype = next(model.parameters()).dtype
        self.kv_caches = [torch.zeros(2, num_blocks, block_size, s.num_kv_heads, s.head_dim, dtype=dtype)
                          for s in specs]
        # Block 0 is the null block; hand the rest out in a scrambled order.
        self.free_blocks = list(np.random.default_rng(0).permutation(np.arange(1, num_blocks)))

    def add(self, token_ids: list[int], image_embeds: Tensor | None = None) -> Sequence:
        num_blocks = -(-(len(token_ids) + 16) // self.block_size)  # room for some decode steps
        return Sequence(list(token_ids), image_embeds, 0, [int(self.free_blocks.pop()) for _ in range(num_blocks)])

    @torch.no_grad()
    def step(self, sequences: list[Sequence], num_tokens: list[int]) -> list[Tensor]:
        """Compute the next `num_tokens[i]` tokens of each sequence; their float32 logits, one tensor each."""
        scheduled = np.array(num_tokens, dtype=np.int64)
        computed = np.array([s.num_computed for s in sequences], dtype=np.int64)
        query_start = np.concatenate(([0], np.cumsum(scheduled)))
        row_of_token = np.repeat(np.arange(len(sequences)), scheduled)
        positions = computed[row_of_token] + np.arange(query_start[-1]) - query_start[row_of_token]
        ids = np.array([sequences[r].token_ids[p] for r, p in zip(row_of_token, positions)], dtype=np.int64)
        width = max(len(s.block_ids) for s in sequences)
        table = np.zeros((len(sequences), width), dtype=np.int64)
        for row, seq in enumerate(sequences):
            table[row, : len(seq.block_ids)] = seq.block_ids
        num_blocks = np.array([len(s.block_ids) for s in sequences])
        runs = [self._runs(seq, int(c), int(c + n)) for seq, c, n in zip(sequences, computed, scheduled)]
        groups = [
            build_group_metadata(table, num_blocks, computed, scheduled, positions, row_of_token, self.block_size,
                                 window, torch.device("cpu"), runs if self.bidirectional else None)
            for window in self.windows
        ]
        attention = PagedAttention(self.specs, self.kv_caches, self.layer_groups, groups)
        embeds, indices = self._image_rows(sequences, computed, scheduled, query_start)
        hidden = self.model(torch.from_numpy(ids), torch.from_numpy(positions), attention, embeds, indices)
        logits = self.model.compute_logits(hidden)
        for seq, n in zip(sequences, scheduled):
            seq.num_computed += int(n)
        return [logits[query_start[r] : query_start[r + 1]] for r in range(len(sequences))]

    @staticmethod
    def _runs(seq: Sequence, begin: int, end: int) -> list[tuple[int, int]]:
        return [(s, e) for s, e in soft_token_runs(seq.token_ids) if s < end and e > begin]

    @staticmethod
    def _image_rows(sequences: list[Sequence], computed: np.ndarray, scheduled: np.ndarray,
                    query_start: np.ndarray) -> tuple[Tensor | None, Tensor | None]:
        embeds, indices = [], []
        for row, seq in enumerate(sequences):
            image_positions = [p for p, t in enumerate(seq.token_ids) if t == IMAGE_TOKEN_ID]
            for rank, position in enumerate(image_positions):
                if computed[row] <= position < computed[row] + scheduled[row]:
                    embeds.append(seq.image_embeds[rank])
                    indices.append(int(query_start[row] + position - computed[row]))
        if not embeds:
            return None, None
        return torch.stack(embeds), torch.tensor(indices, dtype=torch.int64)

    def prefill(self, seq: Sequence, chunks: list[int] | None = None) -> Tensor:
        """All of a sequence's logits, its tokens computed in the given chunk sizes (default: one step)."""
        chunks = [len(seq.token_ids)] if chunks is None else chunks
        assert sum(chunks) == len(seq.token_ids)
        return torch.cat([self.step([seq], [n])[0] for n in chunks])

    def greedy(self, seq: Sequence, num_new_tokens: int) -> list[int]:
        """Compute the rest of the prompt in one step, then append each argmax token and decode it."""
        logits = self.step([seq], [len(seq.token_ids) - seq.num_computed])[0]
        new: list[int] = []
        for index in range(num_new_tokens):
            new.append(int(logits[-1].argmax()))
            seq.token_ids.append(new[-1])
            if index + 1 < num_new_tokens:
                logits = self.step([seq], [1])[0]
        return new
