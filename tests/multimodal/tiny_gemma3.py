"""Test helper: random-weight Gemma 3 vision folders written by transformers itself.

`tiny_config` has the structure of the real Gemma 3 4B config at toy sizes:
six decoder layers (five sliding : one global), a sliding window of 16 that
a test prompt outgrows but that is longer than a crop's 4 soft tokens,
linear rope scaling (factor 8) on the global layers and the local rope base
on the sliding ones, the full 262208-token vocabulary (so the soft token
262144 is a real row), a 2-layer SigLIP on 56-pixel crops of 14-pixel
patches pooled to 4 tokens. `vision_benchmark_config` has the real 4B
vision tower (SigLIP so400m at 896 px, 256 tokens per crop) on the same tiny
decoder, for timing the encoder; tests do not use it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from gemma3_tokenizer import write_gemma3_tokenizer

IMAGE_TOKEN_ID, BOI_TOKEN_ID, EOI_TOKEN_ID = 262144, 255999, 256000
# "\n\n" is one Gemma token: the processor's text around every crop's soft tokens.
DOUBLE_NEWLINE_ID = 108

TINY_TEXT = dict(
    vocab_size=262208, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=16, max_position_embeddings=512,
    rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
)
TINY_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                   patch_size=14, layer_norm_eps=1e-6, vision_use_head=False)
SO400M_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     image_size=896, patch_size=14, layer_norm_eps=1e-6, vision_use_head=False)


def _gemma3_config(vision: dict, mm_tokens_per_image: int, **text_overrides: object):
    from transformers import Gemma3Config

    return Gemma3Config(text_config={**TINY_TEXT, **text_overrides}, vision_config=dict(vision),
                        mm_tokens_per_image=mm_tokens_per_image, image_token_index=IMAGE_TOKEN_ID,
                        boi_token_index=BOI_TOKEN_ID, eoi_token_index=EOI_TOKEN_ID,
                        architectures=["Gemma3ForConditionalGeneration"])


def tiny_config():
    return _gemma3_config(TINY_VISION, mm_tokens_per_image=4)


def vision_benchmark_config():
    # The real 4B's window and length: 256 soft tokens per crop must fit one sliding window.
    return _gemma3_config(SO400M_VISION, mm_tokens_per_image=256, sliding_window=1024,
                          max_position_embeddings=4096)


def preprocessor_config(image_size: int, image_seq_length: int) -> dict:
    """The real checkpoints' preprocessor_config.json, at another crop size."""
    return {
        "do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True,
        "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Gemma3ImageProcessor",
        "image_seq_length": image_seq_length, "image_std": [0.5, 0.5, 0.5], "pan_and_scan_max_num_crops": None,
        "pan_and_scan_min_crop_size": None, "pan_and_scan_min_ratio_to_activate": None,
        "processor_class": "Gemma3Processor", "resample": 2, "rescale_factor": 1 / 255,
        "size": {"height": image_size, "width": image_size},
    }


def build_tiny_gemma3(folder: Path, config=None, tokenizer_source: Path | None = None, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> Path:
    """A seeded random `Gemma3ForConditionalGeneration` saved (safetensors in `dtype`) into `folder`.

    The weights are drawn in float32 whatever `dtype`, so a bfloat16 folder
    holds the float32 one's values rounded. With `tokenizer_source` (the
    converted Gemma 3 270M folder), the tokenizer goes in too.
    """
    from transformers import Gemma3ForConditionalGeneration

    config = tiny_config() if config is None else config
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            # Random norms: a wrong norm convention cannot hide behind zeros or ones.
            if "norm" in name:
                param.normal_(1.0 if "vision" in name else 0.0, 0.3)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
        # Image rows about as large as text rows (0.02 * sqrt(64)), so both move the logits.
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(folder)
    vision = config.vision_config
    (folder / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(vision.image_size, config.mm_tokens_per_image), indent=2))
    # As in the real checkpoints: transformers' Gemma3Processor (which vLLM uses) reads its soft-token count here.
    (folder / "processor_config.json").write_text(
        json.dumps({"image_seq_length": config.mm_tokens_per_image, "processor_class": "Gemma3Processor"}, indent=2))
    if tokenizer_source is not None:
        write_gemma3_tokenizer(tokenizer_source, folder)
    return folder


def image_prompt(parts: list[list[int] | int], tokens_per_crop: int) -> list[int]:
    """Token ids as the processor lays them out: text parts as they are, and each image part (a number of
    crops) as "\\n\\n" boi soft x tokens_per_crop eoi "\\n\\n" per crop."""
    ids: list[int] = []
    for part in parts:
        if isinstance(part, int):
            crop = [DOUBLE_NEWLINE_ID, BOI_TOKEN_ID, *[IMAGE_TOKEN_ID] * tokens_per_crop, EOI_TOKEN_ID,
                    DOUBLE_NEWLINE_ID]
            ids += crop * part
        else:
            ids += part
    return ids


def soft_token_runs(token_ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) of every maximal run of image soft tokens."""
    runs: list[tuple[int, int]] = []
    for index, token_id in enumerate(token_ids):
        if token_id != IMAGE_TOKEN_ID:
            continue
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs
