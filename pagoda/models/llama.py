"""Models layer: the Llama family decoder (Llama 2/3, SmolLM2, ...) over a flat batch of tokens."""

from __future__ import annotations

from torch import Tensor, nn

from pagoda.distributed.parallel_state import SINGLE_RANK, TensorParallelGroup
from pagoda.models.blocks import Attention, GatedMLP
from pagoda.models.causal_lm import CausalLM
from pagoda.models.hf_config import check_tensor_parallel_size
from pagoda.models.interfaces import AttentionContext, AttentionLayerSpec
from pagoda.models.layers import RMSNorm, RotaryEmbedding
from pagoda.models.parallel_linear import vocab_embedding


def llama_rope_parameters(config: dict) -> dict:
    """The rope settings, from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (older)."""
    if config.get("rope_parameters"):
        return config["rope_parameters"]
    scaling = config.get("rope_scaling") or {}
    return {"rope_type": "default", **scaling, "rope_theta": config.get("rope_theta", 10000.0)}


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: dict, layer_index: int, spec: AttentionLayerSpec, tp: TensorParallelGroup) -> None:
        super().__init__()
        hidden_size, eps = config["hidden_size"], config["rms_norm_eps"]
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.self_attn = Attention(layer_index, hidden_size, spec, tp=tp)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)
        self.mlp = GatedMLP(hidden_size, config["intermediate_size"], config.get("hidden_act", "silu"), tp)

    def forward(self, hidden: Tensor, cos: Tensor, sin: Tensor, attention: AttentionContext) -> Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, attention)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    def __init__(self, config: dict, specs: list[AttentionLayerSpec], tp: TensorParallelGroup) -> None:
        super().__init__()
        self.embed_tokens = vocab_embedding(config["vocab_size"], config["hidden_size"], tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, spec, tp) for i, spec in enumerate(specs))
        self.norm = RMSNorm(config["hidden_size"], config["rms_norm_eps"])
        self.rotary_emb = RotaryEmbedding(
            specs[0].head_dim, config["max_position_embeddings"], llama_rope_parameters(config)
        )

    def forward(self, input_ids: Tensor, positions: Tensor, attention: AttentionContext,
                inputs_embeds: Tensor | None = None) -> Tensor:
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self.rotary_emb(positions)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, attention)
        return self.norm(hidden)


class LlamaForCausalLM(CausalLM):
    """Llama decoder; `forward` returns final hidden states, `compute_logits` the float32 logits.

    With `tp` of world size > 1, this rank's share of the model (see `pagoda.models.blocks`).
    """

    def __init__(self, config: dict, tp: TensorParallelGroup = SINGLE_RANK) -> None:
        check_tensor_parallel_size(config, tp.world_size)
        num_heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
        spec = AttentionLayerSpec(
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            scale=head_dim**-0.5,
        )
        specs = [spec] * config["num_hidden_layers"]
        super().__init__(config, LlamaModel(config, specs, tp), specs, tie_by_default=False, tp=tp)
