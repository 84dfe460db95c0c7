"""Test helpers for the engine on a tiny Gemma 3 vision model: images, prompts, and transformers' answer.

transformers is given the very token ids and pixels Pagoda built (the
front-end tests prove both equal its own processor's), with `token_type_ids`
marking the soft tokens, so its attention is bidirectional inside each crop.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pagoda.core.multimodal import MultiModalFeature
from pagoda.outputs import RequestOutput

IMAGE_TOKEN_ID = 262144


def noise_image(seed: int, width: int = 120, height: int = 80, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pixels_of(features: list[MultiModalFeature]) -> torch.Tensor:
    """Every crop of every item, in prompt order: what transformers' `pixel_values` takes."""
    crops = []
    for feature in features:
        data = feature.pixel_values
        assert data is not None
        crops.append(torch.frombuffer(bytearray(data.data), dtype=torch.float32).view(data.shape))
    return torch.cat(crops)


class Reference:
    """transformers' Gemma3ForConditionalGeneration on the same folder, float32."""

    def __init__(self, folder: Path) -> None:
        from transformers import Gemma3ForConditionalGeneration

        self.model = Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()

    @torch.no_grad()
    def prompt_logprobs(self, token_ids: list[int], pixels: torch.Tensor) -> torch.Tensor:
        """[len - 1] log-probability of each prompt token after the ones before it."""
        ids = torch.tensor([token_ids])
        logits = self.model(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == IMAGE_TOKEN_ID).long()).logits
        logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
        return logprobs.gather(1, ids[0, 1:, None])[:, 0]

    @torch.no_grad()
    def greedy(self, token_ids: list[int], pixels: torch.Tensor, max_new_tokens: int) -> list[int]:
        ids = torch.tensor([token_ids])
        out = self.model.generate(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == IMAGE_TOKEN_ID).long(),
                                  max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, len(token_ids):].tolist()


def pagoda_prompt_logprobs(output: RequestOutput) -> torch.Tensor:
    """[len - 1] Pagoda's log-probability of each prompt token (from `prompt_logprobs=0`)."""
    ids = output.prompt_token_ids
    assert output.prompt_logprobs is not None
    return torch.tensor([output.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
