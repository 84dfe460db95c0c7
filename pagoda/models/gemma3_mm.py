"""Models layer: Gemma 3 with vision (`Gemma3ForConditionalGeneration`): SigLIP, the projector, the decoder.

An image crop becomes `mm_tokens_per_image` embeddings in the decoder's
width: the SigLIP tower's per-patch states are laid out on their patch grid,
average-pooled down to sqrt(mm_tokens_per_image) per side, normalised
(Gemma RMSNorm) and multiplied by `mm_input_projection_weight`
[vision_hidden, text_hidden]. The worker runs `embed_multimodal` once per
crop and hands the embeddings to `forward`, which puts them in the rows of
the image soft tokens; text rows keep their sqrt(hidden)-scaled token
embeddings, image rows are not scaled. The attention among one crop's soft
tokens is bidirectional; that is the worker's attention metadata's job
(`bidirectional_runs`), not the model's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pagoda.distributed.parallel_state import SINGLE_RANK, TensorParallelGroup
from pagoda.models.causal_lm import CausalLM
from pagoda.models.gemma3 import Gemma3TextModel, gemma3_attention_specs, gemma3_layer_types
from pagoda.models.hf_config import MultiModalInfo, check_tensor_parallel_size, mm_info, text_config, vision_config
from pagoda.models.interfaces import AttentionContext
from pagoda.models.layers import GemmaRMSNorm
from pagoda.models.siglip import SiglipVisionModel

# Checkpoint prefix -> this model's prefix, first match wins. Transformers >= 4.52 writes `model.*` and
# `lm_head`, Google's original checkpoints `language_model.*` and `vision_tower.vision_model.*`;
# transformers 5's save_pretrained writes the original names but `vision_tower.*` without `vision_model`.
_CHECKPOINT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("multi_modal_projector.", "multi_modal_projector."),
)
# SigLIP's pooling head, saved when `vision_use_head` is set; Gemma 3 never runs it.
_UNUSED_PREFIX = "vision_tower.head."


class Gemma3MultiModalProjector(nn.Module):
    """[N, patches, vision_hidden] -> [N, mm_tokens_per_image, text_hidden]."""

    def __init__(self, vision: dict, text_hidden_size: int, info: MultiModalInfo) -> None:
        super().__init__()
        vision_hidden = vision["hidden_size"]
        self.patches_per_side = vision["image_size"] // vision["patch_size"]
        self.pool_size = self.patches_per_side // round(info.mm_tokens_per_image**0.5)
        self.mm_soft_emb_norm = GemmaRMSNorm(vision_hidden, vision["layer_norm_eps"])
        # Stored as [vision_hidden, text_hidden] and used as it is: x @ W, no transpose.
        self.mm_input_projection_weight = nn.Parameter(torch.empty(vision_hidden, text_hidden_size))

    def forward(self, patches: Tensor) -> Tensor:
        num_crops, _, vision_hidden = patches.shape
        side = self.patches_per_side
        grid = patches.transpose(1, 2).reshape(num_crops, vision_hidden, side, side)
        pooled = F.avg_pool2d(grid, self.pool_size).flatten(2).transpose(1, 2)
        return torch.matmul(self.mm_soft_emb_norm(pooled), self.mm_input_projection_weight)


class Gemma3ForConditionalGeneration(CausalLM):
    """Gemma 3 with images; the text half (decoder, LM head, worker-facing methods) is `CausalLM`'s.

    Under tensor parallelism only the decoder is split: every rank runs the whole vision tower and projector.
    """

    def __init__(self, config: dict, tp: TensorParallelGroup = SINGLE_RANK) -> None:
        info = mm_info(config)
        if info is None:
            raise ValueError("Gemma3ForConditionalGeneration needs a config with model_type 'gemma3' and a "
                             "vision_config")
        check_tensor_parallel_size(config, tp.world_size)
        text, vision = text_config(config), vision_config(config)
        window = text.get("sliding_window")
        if window is not None and window < info.mm_tokens_per_image:
            # A crop's soft tokens attend to each other in every layer: they must fit one window.
            raise ValueError(f"sliding_window {window} is shorter than the {info.mm_tokens_per_image} soft tokens "
                             "of one image crop")
        layer_types = gemma3_layer_types(text)
        specs = gemma3_attention_specs(text, layer_types)
        super().__init__(text, Gemma3TextModel(text, specs, layer_types, tp), specs, tie_by_default=True,
                         final_logit_softcap=text.get("final_logit_softcapping"), tp=tp)
        self.vision_tower = SiglipVisionModel(vision)
        self.multi_modal_projector = Gemma3MultiModalProjector(vision, text["hidden_size"], info)

    @classmethod
    def mm_info(cls, config: dict) -> MultiModalInfo:
        info = mm_info(config)
        if info is None:
            raise ValueError("config has no Gemma 3 vision settings")
        return info

    @staticmethod
    def map_checkpoint_name(name: str) -> str | None:
        """This model's parameter name for a checkpoint tensor of any layout; None for the unused head."""
        for source, target in _CHECKPOINT_PREFIXES:
            if name.startswith(source):
                mapped = target + name[len(source):]
                return None if mapped.startswith(_UNUSED_PREFIX) else mapped
        return name

    def embed_multimodal(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [N_crops, 3, S, S] (any float dtype) -> [N_crops, mm_tokens_per_image, text_hidden]
        in the model dtype."""
        weight = self.multi_modal_projector.mm_input_projection_weight
        patches = self.vision_tower(pixel_values.to(device=weight.device, dtype=weight.dtype))
        return self.multi_modal_projector(patches)

    def forward(self, input_ids: Tensor, positions: Tensor, attention: AttentionContext,
                mm_embeds: Tensor | None = None, mm_token_indices: Tensor | None = None) -> Tensor:
        """input_ids and positions [T] -> hidden [T, hidden]; rows `mm_token_indices` (int64 into the flat
        batch) take `mm_embeds` [len(mm_token_indices), hidden] instead of their token embedding."""
        if mm_embeds is None:
            return self.model(input_ids, positions, attention)
        if mm_token_indices is None or mm_token_indices.shape[0] != mm_embeds.shape[0]:
            raise ValueError(f"mm_embeds has {mm_embeds.shape[0]} rows but mm_token_indices "
                             f"{None if mm_token_indices is None else mm_token_indices.shape[0]}")
        hidden = self.model.embed(input_ids)
        hidden.index_copy_(0, mm_token_indices, mm_embeds.to(hidden.dtype))
        return self.model(input_ids, positions, attention, inputs_embeds=hidden)
