"""Models layer: a decoder layer's attention and gated-MLP blocks, whole or split across tensor-parallel ranks.

At world size 1 each block holds plain `MergedLinear`/`Linear` projections.
With more ranks (`pagoda.models.parallel_linear`), each rank holds its query
heads, its KV heads (or the one it replicates) and its slice of the MLP's
intermediate rows; o_proj and down_proj sum the ranks' partial outputs, so
every block still returns the full hidden state on every rank.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from pagoda.distributed.parallel_state import SINGLE_RANK, TensorParallelGroup
from pagoda.models.interfaces import AttentionContext, AttentionLayerSpec
from pagoda.models.layers import apply_rotary, get_activation
from pagoda.models.parallel_linear import gate_up_projection, local_attention_spec, qkv_projection, row_projection


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up in one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str,
                 tp: TensorParallelGroup = SINGLE_RANK) -> None:
        super().__init__()
        self.gate_up_proj = gate_up_projection(hidden_size, intermediate_size, tp)
        self.down_proj = row_projection(intermediate_size, hidden_size, tp)
        self.act_fn = get_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class Attention(nn.Module):
    """Fused QKV projection, optional per-head QK-norm, rotary, then the worker's attention context.

    `spec` describes the whole layer; `self.spec` holds this rank's heads.
    """

    def __init__(
        self,
        layer_index: int,
        hidden_size: int,
        spec: AttentionLayerSpec,
        qk_norm: Callable[[int], nn.Module] | None = None,
        tp: TensorParallelGroup = SINGLE_RANK,
    ) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.spec = local_attention_spec(spec, tp)
        self.qkv_proj = qkv_projection(hidden_size, spec, tp)
        self.o_proj = row_projection(spec.num_heads * spec.head_dim, hidden_size, tp)
        self.q_norm = qk_norm(spec.head_dim) if qk_norm else None
        self.k_norm = qk_norm(spec.head_dim) if qk_norm else None

    def forward(self, hidden: Tensor, cos: Tensor, sin: Tensor, attention: AttentionContext) -> Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split(self.qkv_proj.output_sizes, dim=-1)
        q = q.view(num_tokens, self.spec.num_heads, self.spec.head_dim)
        k = k.view(num_tokens, self.spec.num_kv_heads, self.spec.head_dim)
        v = v.view(num_tokens, self.spec.num_kv_heads, self.spec.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attention.forward(self.layer_index, q, k, v)
        return self.o_proj(out.reshape(num_tokens, -1))
