"""Models layer: tensor-parallel projections and embedding — each rank holds and computes its slice.

- Column-parallel (`MergedColumnParallelLinear`, for qkv_proj and
  gate_up_proj): each rank holds some output rows of each fused shard, so
  its local [q | k | v] or [gate | up] still splits like the full one; no
  communication. KV heads fewer than the ranks are replicated: ranks
  r * kv_heads // world_size share KV head r's rows.
- Row-parallel (`RowParallelLinear`, o_proj and down_proj): each rank holds
  some input columns, multiplies its slice of the (column-split) input, and
  an all-reduce sums the partial products; the bias is added once, after.
- Vocab-parallel (`VocabParallelEmbedding`, `ParallelLMHead`): each rank holds
  ceil(vocab / world_size) rows (the last rank's tail zero-padded); ids
  outside a rank's rows embed as zeros and the all-reduce adds the one rank
  that has them; the LM head's per-rank logits are gathered by the caller.

With `quantization="int8"`, a row-parallel shard's per-row scales cover
only its columns, so int8 under TP is not TP=1's int8 (column-parallel rows
and the LM head keep the same scales).

Every class has `checkpoint_slice(param_name, shard, tensor)`: given the
full checkpoint tensor (a view of the memory-mapped file), the rows or
columns this rank keeps, a view wherever no padding is needed. The builders
(`qkv_projection`, ...) return today's unsplit layers at world size 1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pagoda.distributed.parallel_state import TensorParallelGroup
from pagoda.models.interfaces import AttentionLayerSpec
from pagoda.models.layers import CheckpointEmbedding, CheckpointLinear, Linear, MergedLinear, project


@dataclass(frozen=True)
class ShardPiece:
    """Piece `index` of `count` equal pieces of a tensor dimension."""

    index: int
    count: int

    def take(self, tensor: Tensor, dim: int, local_size: int) -> Tensor:
        """This piece of `tensor` along `dim`, `local_size` long (a view)."""
        if tensor.shape[dim] != local_size * self.count:
            raise ValueError(f"dimension {dim} has size {tensor.shape[dim]}, expected {local_size * self.count} "
                             f"to split into {self.count} pieces of {local_size}")
        return tensor.narrow(dim, self.index * local_size, local_size)


def kv_head_piece(num_kv_heads: int, tp: TensorParallelGroup) -> ShardPiece:
    """Which KV heads this rank holds: an even share, or one head shared by world_size // num_kv_heads ranks."""
    count = min(num_kv_heads, tp.world_size)
    return ShardPiece(tp.rank * count // tp.world_size, count)


def local_attention_spec(spec: AttentionLayerSpec, tp: TensorParallelGroup) -> AttentionLayerSpec:
    """The heads one rank computes (its query heads, its KV heads or the one it replicates)."""
    return dataclasses.replace(spec, num_heads=spec.num_heads // tp.world_size,
                               num_kv_heads=spec.num_kv_heads // kv_head_piece(spec.num_kv_heads, tp).count)


class MergedColumnParallelLinear(MergedLinear):
    """A `MergedLinear` holding piece `pieces[i]` of every fused shard i's output rows."""

    def __init__(self, input_size: int, output_sizes: tuple[int, ...], pieces: tuple[ShardPiece, ...]) -> None:
        for size, piece in zip(output_sizes, pieces, strict=True):
            if size % piece.count:
                raise ValueError(f"output size {size} does not split into {piece.count} pieces")
        super().__init__(input_size, tuple(size // piece.count for size, piece in zip(output_sizes, pieces)))
        self.pieces = pieces

    def checkpoint_slice(self, param_name: str, shard: int | None, tensor: Tensor) -> Tensor:
        assert shard is not None, "every tensor of a fused projection belongs to a shard"
        return self.pieces[shard].take(tensor, 0, self.output_sizes[shard])


class RowParallelLinear(Linear):
    """A `Linear` holding this rank's input columns; the outputs of all ranks are summed (all-reduce)."""

    def __init__(self, input_size: int, output_size: int, tp: TensorParallelGroup, bias: bool = False) -> None:
        if input_size % tp.world_size:
            raise ValueError(f"input size {input_size} does not split across {tp.world_size} ranks")
        super().__init__(input_size // tp.world_size, output_size, bias)
        self.tp = tp
        self.piece = ShardPiece(tp.rank, tp.world_size)

    def checkpoint_slice(self, param_name: str, shard: int | None, tensor: Tensor) -> Tensor:
        return self.piece.take(tensor, 1, self.in_features) if param_name == "weight" else tensor

    def forward(self, x: Tensor) -> Tensor:
        out = self.tp.all_reduce(project(x, self.weight, self.int8, self.packed))
        return out if self.bias is None else out + self.bias


@dataclass(frozen=True)
class VocabSlice:
    """Rows [start, end) of a `vocab_size`-row table, held as `rows` rows (zero rows after end)."""

    vocab_size: int
    start: int
    end: int
    rows: int

    @classmethod
    def of(cls, vocab_size: int, tp: TensorParallelGroup) -> VocabSlice:
        rows = -(-vocab_size // tp.world_size)
        start = min(tp.rank * rows, vocab_size)
        return cls(vocab_size, start, min(start + rows, vocab_size), rows)

    def take(self, tensor: Tensor) -> Tensor:
        if tensor.shape[0] != self.vocab_size:
            raise ValueError(f"has {tensor.shape[0]} vocabulary rows, expected {self.vocab_size}")
        held = tensor[self.start : self.end]
        if held.shape[0] == self.rows:
            return held
        return torch.cat([held, held.new_zeros(self.rows - held.shape[0], *held.shape[1:])])


class VocabParallelEmbedding(CheckpointEmbedding):
    """This rank's rows of the embedding table; the full embedding is the all-reduce over the ranks."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallelGroup) -> None:
        vocab = VocabSlice.of(vocab_size, tp)
        super().__init__(vocab.rows, hidden_size)
        self.vocab = vocab
        self.tp = tp

    def checkpoint_slice(self, param_name: str, shard: int | None, tensor: Tensor) -> Tensor:
        return self.vocab.take(tensor)

    def forward(self, input_ids: Tensor) -> Tensor:
        outside = (input_ids < self.vocab.start) | (input_ids >= self.vocab.end)
        local_ids = (input_ids - self.vocab.start).masked_fill_(outside, 0)
        rows = F.embedding(local_ids, self.weight).masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(rows)


class ParallelLMHead(CheckpointLinear):
    """An untied LM head's rows for this rank's vocabulary slice (as `VocabParallelEmbedding`'s)."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TensorParallelGroup) -> None:
        vocab = VocabSlice.of(vocab_size, tp)
        super().__init__(hidden_size, vocab.rows, bias=False)
        self.vocab = vocab

    def checkpoint_slice(self, param_name: str, shard: int | None, tensor: Tensor) -> Tensor:
        return self.vocab.take(tensor)


def qkv_projection(hidden_size: int, spec: AttentionLayerSpec, tp: TensorParallelGroup) -> MergedLinear:
    """The fused q/k/v projection for the full-model `spec`: this rank's query heads and KV heads."""
    q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    if tp.world_size == 1:
        return MergedLinear(hidden_size, (q_size, kv_size, kv_size))
    kv_piece = kv_head_piece(spec.num_kv_heads, tp)
    pieces = (ShardPiece(tp.rank, tp.world_size), kv_piece, kv_piece)
    return MergedColumnParallelLinear(hidden_size, (q_size, kv_size, kv_size), pieces)


def gate_up_projection(hidden_size: int, intermediate_size: int, tp: TensorParallelGroup) -> MergedLinear:
    """The fused gate/up projection; each rank holds the same rows of gate and of up."""
    if tp.world_size == 1:
        return MergedLinear(hidden_size, (intermediate_size, intermediate_size))
    piece = ShardPiece(tp.rank, tp.world_size)
    return MergedColumnParallelLinear(hidden_size, (intermediate_size, intermediate_size), (piece, piece))


def row_projection(input_size: int, output_size: int, tp: TensorParallelGroup) -> Linear:
    """A projection whose input arrives split across the ranks (o_proj, down_proj)."""
    return Linear(input_size, output_size) if tp.world_size == 1 else RowParallelLinear(input_size, output_size, tp)


def vocab_embedding(vocab_size: int, hidden_size: int, tp: TensorParallelGroup) -> CheckpointEmbedding:
    if tp.world_size == 1:
        return CheckpointEmbedding(vocab_size, hidden_size)
    return VocabParallelEmbedding(vocab_size, hidden_size, tp)


def lm_head(hidden_size: int, vocab_size: int, tp: TensorParallelGroup) -> CheckpointLinear:
    if tp.world_size == 1:
        return CheckpointLinear(hidden_size, vocab_size, bias=False)
    return ParallelLMHead(hidden_size, vocab_size, tp)
