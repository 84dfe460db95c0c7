"""Models layer: facts the engine reads from a config.json without importing torch.

A multimodal config nests its decoder under `text_config` and its vision
tower under `vision_config`; Google's original Gemma 3 configs also leave out
every value that equals transformers' default, so those defaults (numbers
from `Gemma3TextConfig`, `SiglipVisionConfig` and `Gemma3Config`) are filled
in here, once, for the engine and the model code alike.
"""

from __future__ import annotations

from dataclasses import dataclass

GEMMA3_TEXT_DEFAULTS: dict = {
    "vocab_size": 262208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "eos_token_id": 1,
}
SIGLIP_VISION_DEFAULTS: dict = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh",
}
GEMMA3_MM_DEFAULTS: dict = {
    "mm_tokens_per_image": 256,
    "image_token_index": 262144,
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
}


def text_config(config: dict) -> dict:
    """The decoder's settings: `text_config` (with Gemma 3's defaults) when nested, else the config itself."""
    if "text_config" not in config:
        return config
    nested = dict(config["text_config"] or {})
    if config.get("model_type") == "gemma3":
        nested = {**GEMMA3_TEXT_DEFAULTS, **nested}
    for key in ("eos_token_id", "tie_word_embeddings"):
        # A top-level value is the model's own; the nested one may be a library default.
        if config.get(key) is not None:
            nested[key] = config[key]
    return nested


def vision_config(config: dict) -> dict:
    """The vision tower's settings with SigLIP's defaults filled in."""
    if "vision_config" not in config:
        raise ValueError("config.json has no vision_config")
    return {**SIGLIP_VISION_DEFAULTS, **(config["vision_config"] or {})}


@dataclass(frozen=True, slots=True)
class MultiModalInfo:
    """What the front end and the engine need to know about a model's image input."""

    image_token_id: int  # the soft token each image embedding replaces
    boi_token_id: int  # <start_of_image>
    eoi_token_id: int  # <end_of_image>
    mm_tokens_per_image: int  # soft tokens (= embeddings) per crop
    image_size: int  # pixels per side of a crop
    hidden_size: int  # width of one embedding: the decoder's hidden size

    @property
    def num_embeds_per_crop(self) -> int:
        return self.mm_tokens_per_image


def mm_info(config: dict) -> MultiModalInfo | None:
    """The image facts of a Gemma 3 vision config; None for a text-only model."""
    if config.get("model_type") != "gemma3" or "vision_config" not in config:
        return None
    merged = {**GEMMA3_MM_DEFAULTS, **config}
    vision = vision_config(config)
    tokens = int(merged["mm_tokens_per_image"])
    if vision["image_size"] % vision["patch_size"]:
        raise ValueError(f"vision_config: image_size ({vision['image_size']}) must be a multiple of patch_size "
                         f"({vision['patch_size']})")
    patches_per_side = vision["image_size"] // vision["patch_size"]
    tokens_per_side = round(tokens**0.5)
    if tokens_per_side**2 != tokens or patches_per_side % tokens_per_side:
        raise ValueError(
            f"mm_tokens_per_image ({tokens}) must be a square whose side divides the "
            f"{patches_per_side} patches per side of the image"
        )
    return MultiModalInfo(
        image_token_id=int(merged["image_token_index"]),
        boi_token_id=int(merged["boi_token_index"]),
        eoi_token_id=int(merged["eoi_token_index"]),
        mm_tokens_per_image=tokens,
        image_size=int(vision["image_size"]),
        hidden_size=int(text_config(config)["hidden_size"]),
    )


def tensor_parallel_sizes(config: dict) -> list[int]:
    """The tensor-parallel sizes a decoder config splits into: the query heads and the MLP evenly, and the
    KV heads evenly or, when there are fewer KV heads than ranks, each replicated on whole groups of ranks."""
    text = text_config(config)
    num_heads = int(text["num_attention_heads"])
    num_kv_heads = int(text.get("num_key_value_heads") or num_heads)
    intermediate_size = int(text["intermediate_size"])
    return [size for size in range(1, num_heads + 1)
            if num_heads % size == 0 and intermediate_size % size == 0
            and (num_kv_heads % size == 0 or size % num_kv_heads == 0)]


def check_tensor_parallel_size(config: dict, tensor_parallel_size: int) -> None:
    """A ValueError naming the sizes that work when `tensor_parallel_size` does not split this model."""
    sizes = tensor_parallel_sizes(config)
    if tensor_parallel_size in sizes:
        return
    text = text_config(config)
    num_heads = text["num_attention_heads"]
    raise ValueError(
        f"tensor_parallel_size {tensor_parallel_size} does not split this model: its {num_heads} attention "
        f"heads and MLP size {text['intermediate_size']} must split evenly across the ranks, and its "
        f"{text.get('num_key_value_heads') or num_heads} KV heads must split evenly or divide the number of "
        f"ranks (each KV head then replicated); sizes that work: {', '.join(map(str, sizes))}"
    )
