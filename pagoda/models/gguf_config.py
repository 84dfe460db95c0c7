"""Models layer: turns GGUF metadata into a Hugging Face config.json for the converted folder.

The result loads with transformers' `AutoConfig` (5.x reads `rope_parameters`)
and keeps the older flat keys (`rope_theta`, `rope_local_base_freq`,
`sliding_window_pattern`) for readers built on transformers 4.x, such as vLLM.
Facts llama.cpp hard-codes instead of storing are hard-coded here too, with
the reason next to them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Part of the cache key of converted folders: bump it when the converter's output changes.
CONVERTER_VERSION = 1

SUPPORTED_GGUF_ARCHITECTURES = ("gemma3", "llama")
_REQUIRED = object()


class _Metadata:
    """Typed access to the `<architecture>.*` and `tokenizer.ggml.*` keys of one GGUF file."""

    def __init__(self, metadata: dict[str, Any], architecture: str) -> None:
        self.metadata = metadata
        self.architecture = architecture

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        full_key = f"{self.architecture}.{key}"
        if full_key in self.metadata:
            return self.metadata[full_key]
        if default is _REQUIRED:
            raise ValueError(f"GGUF metadata lacks {full_key!r}")
        return default

    def get_uniform(self, key: str, default: Any = _REQUIRED) -> Any:
        """A per-model value that some files store per layer; only uniform per-layer values are supported."""
        value = self.get(key, default)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise ValueError(f"GGUF {self.architecture}.{key} varies per layer ({value}); not supported")
            return value[0]
        return value

    def token_id(self, name: str) -> int | None:
        return self.metadata.get(f"tokenizer.ggml.{name}_token_id")


def _f32(value: float) -> float:
    # GGUF stores float32: 1e-6 arrives as 9.99999997e-07. Print the shortest
    # decimal that round-trips through float32, as the original config had it.
    return float(str(np.float32(value)))


def hf_config_from_gguf(metadata: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """config.json contents; `tensor_shapes` maps GGUF tensor names to (rows, columns) shapes."""
    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {architecture!r}; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    meta = _Metadata(metadata, architecture)
    common = _common_config(meta, tensor_shapes)
    if architecture == "llama":
        return _llama_config(meta, tensor_shapes, common)
    return _gemma3_config(meta, common)


def _common_config(meta: _Metadata, tensor_shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    hidden_size = meta.get("embedding_length")
    num_heads = meta.get_uniform("attention.head_count")
    if "token_embd.weight" not in tensor_shapes:
        raise ValueError("GGUF file has no token_embd.weight tensor")
    return {
        "vocab_size": tensor_shapes["token_embd.weight"][0],
        "hidden_size": hidden_size,
        "intermediate_size": meta.get_uniform("feed_forward_length"),
        "num_hidden_layers": meta.get("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": meta.get_uniform("attention.head_count_kv", num_heads),
        "head_dim": meta.get("attention.key_length", hidden_size // num_heads),
        "max_position_embeddings": meta.get("context_length"),
        "rms_norm_eps": _f32(meta.get("attention.layer_norm_rms_epsilon")),
        # llama.cpp omits the output matrix when it is the embedding.
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "bos_token_id": meta.token_id("bos"),
        "eos_token_id": meta.token_id("eos"),
        "pad_token_id": meta.token_id("padding"),
        "attention_bias": False,
        "dtype": "float32",
    }


def _rope_scaling(meta: _Metadata) -> dict[str, Any]:
    scaling_type = meta.get("rope.scaling.type", "none")
    if scaling_type == "none":
        return {}
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": _f32(meta.get("rope.scaling.factor"))}
    raise ValueError(f"unsupported GGUF rope scaling {scaling_type!r}; supported: none, linear")


def _llama_config(meta: _Metadata, tensor_shapes: dict[str, tuple[int, ...]], common: dict[str, Any]) -> dict[str, Any]:
    head_dim = common["head_dim"]
    if meta.get("rope.dimension_count", head_dim) != head_dim:
        raise ValueError("GGUF llama models with partial rotary dimensions are not supported")
    if "rope_freqs.weight" in tensor_shapes:
        raise ValueError("GGUF llama models with a rope_freqs tensor (Llama 3.1 rope scaling) are not supported")
    theta = _f32(meta.get("rope.freq_base", 10_000.0))
    scaling = _rope_scaling(meta)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **common,
        "hidden_act": "silu",
        "mlp_bias": False,
        "rope_parameters": {"rope_type": "default", **scaling, "rope_theta": theta},
        "rope_theta": theta,
        "rope_scaling": scaling or None,
    }


def _gemma3_config(meta: _Metadata, common: dict[str, Any]) -> dict[str, Any]:
    num_layers = common["num_hidden_layers"]
    # llama.cpp fixes Gemma 3's layout: every sixth layer is global, the local
    # rope base is 10000, and only the 62-layer (27B) model scales queries by
    # hidden_size / num_heads instead of head_dim.
    pattern, local_theta = 6, 10_000.0
    layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]
    head_dim = common["head_dim"]
    query_pre_attn_scalar = common["hidden_size"] // common["num_attention_heads"] if num_layers == 62 else head_dim
    global_theta = _f32(meta.get("rope.freq_base", 1_000_000.0))
    scaling = _rope_scaling(meta)
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        **common,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "sliding_window": meta.get("attention.sliding_window"),
        "layer_types": layer_types,
        "sliding_window_pattern": pattern,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", **scaling, "rope_theta": global_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
        },
        "rope_theta": global_theta,
        "rope_local_base_freq": local_theta,
        "rope_scaling": scaling or None,
        "final_logit_softcapping": meta.get("final_logit_softcapping", None),
        "attn_logit_softcapping": meta.get("attn_logit_softcapping", None),
    }
