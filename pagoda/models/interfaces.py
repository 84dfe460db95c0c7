"""Models layer: the contract between a model and the attention implementation the worker gives it.

A model computes projections, QK-norm and rotary embeddings itself, then hands
each layer's query, key and value to an `AttentionContext`. The context owns
everything about sequences: where each one starts in the flat batch, where its
earlier keys and values live (a paged KV cache in the worker, plain tensors in
the tests), and which of them each query may see. The model never learns how
many sequences a batch holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass(frozen=True, slots=True)
class AttentionLayerSpec:
    """What one attention layer needs from its context.

    `scale` multiplies the query-key dot products; the model does not pre-scale
    the query. With `sliding_window` set, query token i sees key token j of its
    own sequence iff 0 <= i - j < sliding_window; with None, iff 0 <= i - j
    (or when i and j lie in one bidirectional run, see `AttentionContext`).
    With `logit_softcap` set, scores become softcap * tanh(scores / softcap)
    after scaling and before masking.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None = None
    logit_softcap: float | None = None

    def __post_init__(self) -> None:
        if self.num_heads <= 0 or self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a positive multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")


class AttentionContext(Protocol):
    """Causal attention over a flat (ragged) batch of T tokens from any number of sequences.

    `query` is [T, num_heads, head_dim]; `key` and `value` are
    [T, num_kv_heads, head_dim] for the same T tokens, already normalised and
    rotated. The context stores the new keys and values, attends each query to
    the visible keys of its own sequence (earlier steps included) following the
    layer's `AttentionLayerSpec`, and returns [T, num_heads, head_dim] in the
    query's dtype.

    A sequence may have bidirectional runs, absolute positions [s, e) such as
    one image crop's soft tokens: a query at s <= i < e also sees every key
    s <= j < e of its sequence, later ones included, whatever the layer's
    window: visible(i, j) = (causal and window) or (i and j in one run). A
    run is never split across steps such that its later keys come in a later
    step than its queries (it may start in an earlier one). The inputs may be non-contiguous views of the fused QKV
    projection; copy them if storage needs contiguity.
    """

    def forward(self, layer_index: int, query: Tensor, key: Tensor, value: Tensor) -> Tensor: ...
