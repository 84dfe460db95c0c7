"""Models layer: the Gemma 3 text decoder (interleaved sliding-window and global attention).

What sets it apart from Llama: the embedding is scaled by sqrt(hidden_size),
every norm is `GemmaRMSNorm` (x * (1 + w)), each layer has four norms (before
and after attention and MLP) plus QK-norm, the query scale comes from
`query_pre_attn_scalar`, and each layer is either "sliding_attention" (window
`sliding_window`, local rope base) or "full_attention" (global rope base).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from pagoda.distributed.parallel_state import SINGLE_RANK, TensorParallelGroup
from pagoda.models.blocks import Attention, GatedMLP
from pagoda.models.causal_lm import CausalLM
from pagoda.models.hf_config import check_tensor_parallel_size
from pagoda.models.interfaces import AttentionContext, AttentionLayerSpec
from pagoda.models.layers import GemmaRMSNorm, RotaryEmbedding
from pagoda.models.parallel_linear import vocab_embedding

SLIDING, FULL = "sliding_attention", "full_attention"


def gemma3_layer_types(config: dict) -> list[str]:
    """`layer_types` if given; older configs say every `sliding_window_pattern`-th layer is global."""
    if config.get("layer_types"):
        layer_types = list(config["layer_types"])
    else:
        pattern = config.get("sliding_window_pattern", 6)
        layer_types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(config["num_hidden_layers"])]
    if len(layer_types) != config["num_hidden_layers"] or set(layer_types) - {SLIDING, FULL}:
        raise ValueError(f"layer_types must list {config['num_hidden_layers']} of {SLIDING!r}/{FULL!r}")
    return layer_types


def gemma3_rope_parameters(config: dict) -> dict[str, dict]:
    """Rope settings per layer type, from `rope_parameters` (transformers 5) or the older flat keys."""
    nested = config.get("rope_parameters") or {}
    if FULL in nested and SLIDING in nested:
        return {FULL: nested[FULL], SLIDING: nested[SLIDING]}
    scaling = config.get("rope_scaling") or {}
    return {
        FULL: {"rope_type": "default", **scaling, "rope_theta": config.get("rope_theta", 1_000_000.0)},
        SLIDING: {"rope_type": "default", "rope_theta": config.get("rope_local_base_freq", 10_000.0)},
    }


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: dict, layer_index: int, spec: AttentionLayerSpec, tp: TensorParallelGroup) -> None:
        super().__init__()
        hidden_size, eps = config["hidden_size"], config.get("rms_norm_eps", 1e-6)
        self.input_layernorm = GemmaRMSNorm(hidden_size, eps)
        self.self_attn = Attention(layer_index, hidden_size, spec, qk_norm=partial(GemmaRMSNorm, eps=eps), tp=tp)
        self.post_attention_layernorm = GemmaRMSNorm(hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden_size, eps)
        activation = config.get("hidden_activation", "gelu_pytorch_tanh")
        self.mlp = GatedMLP(hidden_size, config["intermediate_size"], activation, tp)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden_size, eps)

    def forward(self, hidden: Tensor, cos: Tensor, sin: Tensor, attention: AttentionContext) -> Tensor:
        attn_out = self.self_attn(self.input_layernorm(hidden), cos, sin, attention)
        hidden = hidden + self.post_attention_layernorm(attn_out)
        mlp_out = self.mlp(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(mlp_out)


class Gemma3TextModel(nn.Module):
    def __init__(self, config: dict, specs: list[AttentionLayerSpec], layer_types: list[str],
                 tp: TensorParallelGroup = SINGLE_RANK) -> None:
        super().__init__()
        hidden_size = config["hidden_size"]
        self.embed_tokens = vocab_embedding(config["vocab_size"], hidden_size, tp)
        self.hidden_size = hidden_size
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i, spec, tp) for i, spec in enumerate(specs))
        self.norm = GemmaRMSNorm(hidden_size, config.get("rms_norm_eps", 1e-6))
        rope = gemma3_rope_parameters(config)
        max_position = config["max_position_embeddings"]
        self.rotary_emb = nn.ModuleDict(
            {kind: RotaryEmbedding(specs[0].head_dim, max_position, rope[kind]) for kind in sorted(set(layer_types))}
        )
        self.layer_types = layer_types
        self.init_buffers(None, torch.get_default_dtype())

    def init_buffers(self, device: torch.device | None, dtype: torch.dtype) -> None:
        # A 0-d tensor in the activation dtype: the reference rounds sqrt(hidden_size) to it before multiplying.
        scale = torch.tensor(self.hidden_size**0.5, dtype=dtype, device=device)
        self.register_buffer("embed_scale", scale, persistent=False)

    def embed(self, input_ids: Tensor) -> Tensor:
        """Token embeddings scaled by sqrt(hidden_size), [T, hidden_size]."""
        return self.embed_tokens(input_ids) * self.embed_scale

    def forward(self, input_ids: Tensor, positions: Tensor, attention: AttentionContext,
                inputs_embeds: Tensor | None = None) -> Tensor:
        """`inputs_embeds` [T, hidden_size], when given, replaces `embed(input_ids)` (image rows merged in)."""
        hidden = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        cos_sin = {kind: rope(positions) for kind, rope in self.rotary_emb.items()}
        for layer, kind in zip(self.layers, self.layer_types):
            hidden = layer(hidden, *cos_sin[kind], attention)
        return self.norm(hidden)


def gemma3_attention_specs(config: dict, layer_types: list[str]) -> list[AttentionLayerSpec]:
    num_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
    return [
        AttentionLayerSpec(
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            scale=config.get("query_pre_attn_scalar", head_dim) ** -0.5,
            sliding_window=config["sliding_window"] if kind == SLIDING else None,
            logit_softcap=config.get("attn_logit_softcapping"),
        )
        for kind in layer_types
    ]


class Gemma3ForCausalLM(CausalLM):
    """Gemma 3 text decoder; `forward` returns final hidden states, `compute_logits` the float32 logits.

    With `tp` of world size > 1, this rank's share of the model (see `pagoda.models.blocks`).
    """

    def __init__(self, config: dict, tp: TensorParallelGroup = SINGLE_RANK) -> None:
        if config.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention is not supported for Gemma3ForCausalLM")
        check_tensor_parallel_size(config, tp.world_size)
        layer_types = gemma3_layer_types(config)
        specs = gemma3_attention_specs(config, layer_types)
        super().__init__(config, Gemma3TextModel(config, specs, layer_types, tp), specs, tie_by_default=True,
                         final_logit_softcap=config.get("final_logit_softcapping"), tp=tp)
