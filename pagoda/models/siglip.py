"""Models layer: the SigLIP vision tower as Gemma 3 uses it (crops -> one hidden state per patch).

A crop of S x S pixels is cut into (S / patch)^2 patches in row-major order;
each is projected (the checkpoint's Conv2d with kernel = stride = patch, run
as one matmul over the unfolded patches) and gets its learned position
embedding. Pre-LN encoder layers follow (full, non-causal attention among
one crop's patches; biased projections; a gelu(tanh) MLP), then a final
LayerNorm. No pooling head: Gemma 3 reads the per-patch states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pagoda.models.layers import CheckpointEmbedding, Linear, MergedLinear, get_activation, pack_for_cpu, project


class VisionLinear(Linear):
    """A biased `Linear` of the tower: packed for the CPU like the decoder's, never given an int8 copy.

    The tower always multiplies hundreds of rows, where int8 is the slower form (`pagoda.models.quantization`).
    """

    def __init__(self, input_size: int, output_size: int) -> None:
        super().__init__(input_size, output_size, bias=True)

    def quantize_int8(self) -> None:
        """No int8 copy: it would cost memory and never be used."""


class VisionMergedLinear(MergedLinear):
    """q, k and v of a tower layer in one biased matmul; like `VisionLinear`, never int8."""

    def __init__(self, input_size: int, output_sizes: tuple[int, ...]) -> None:
        super().__init__(input_size, output_sizes, bias=True)

    def quantize_int8(self) -> None:
        """No int8 copy (see `VisionLinear`)."""


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias, filled from the checkpoint (no random init on the meta device)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.bias = nn.Parameter(torch.empty(hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)


class PatchEmbedding(nn.Module):
    """The checkpoint's Conv2d (kernel = stride = patch, no padding) as unfold + one matmul.

    `weight` keeps the Conv2d shape [hidden, channels, patch, patch] so checkpoints load as they are;
    `pack_weight` packs its [hidden, channels * patch^2] view like any `Linear`.
    """

    def __init__(self, num_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.weight = nn.Parameter(torch.empty(hidden_size, num_channels, patch_size, patch_size))
        self.bias = nn.Parameter(torch.empty(hidden_size))
        self.packed: Tensor | None = None

    def pack_weight(self) -> None:
        self.packed = pack_for_cpu(self.weight.reshape(self.weight.shape[0], -1))

    def forward(self, pixel_values: Tensor) -> Tensor:
        """[N, C, S, S] (S a multiple of the patch size) -> [N, (S / patch)^2, hidden], patches row-major."""
        num_crops, channels, height, width = pixel_values.shape
        patch = self.patch_size
        rows, cols = height // patch, width // patch
        patches = pixel_values.reshape(num_crops, channels, rows, patch, cols, patch)
        # [N, rows, cols, C, patch, patch]: each patch flattened in the conv weight's (C, kh, kw) order.
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(num_crops, rows * cols, channels * patch * patch)
        weight = self.weight.reshape(self.weight.shape[0], -1)
        return project(patches, weight, None, self.packed, self.bias)


class SiglipAttention(nn.Module):
    """Full multi-head attention among one crop's patches, with biased projections."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"vision hidden_size ({hidden_size}) must be a multiple of num_attention_heads "
                             f"({num_heads})")
        self.num_heads = num_heads
        self.qkv_proj = VisionMergedLinear(hidden_size, (hidden_size,) * 3)
        self.out_proj = VisionLinear(hidden_size, hidden_size)

    def forward(self, hidden: Tensor) -> Tensor:
        num_crops, num_patches, hidden_size = hidden.shape
        qkv = self.qkv_proj(hidden).view(num_crops, num_patches, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [N, heads, patches, head_dim]
        # SDPA's fused CPU kernel works in blocks: a [patches, patches] float32 score matrix per head is
        # never materialised (4096 patches: 64 MiB per head otherwise).
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(num_crops, num_patches, hidden_size))


class SiglipMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, activation: str) -> None:
        super().__init__()
        self.fc1 = VisionLinear(hidden_size, intermediate_size)
        self.fc2 = VisionLinear(intermediate_size, hidden_size)
        self.act_fn = get_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act_fn(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        hidden_size, eps = config["hidden_size"], config["layer_norm_eps"]
        self.layer_norm1 = LayerNorm(hidden_size, eps)
        self.self_attn = SiglipAttention(hidden_size, config["num_attention_heads"])
        self.layer_norm2 = LayerNorm(hidden_size, eps)
        self.mlp = SiglipMLP(hidden_size, config["intermediate_size"], config["hidden_act"])

    def forward(self, hidden: Tensor) -> Tensor:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden))
        return hidden + self.mlp(self.layer_norm2(hidden))


class SiglipVisionEmbeddings(nn.Module):
    """Patch projection plus the learned position embedding (no class token)."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        hidden_size = config["hidden_size"]
        self.patch_embedding = PatchEmbedding(config["num_channels"], hidden_size, config["patch_size"])
        num_patches = (config["image_size"] // config["patch_size"]) ** 2
        self.position_embedding = CheckpointEmbedding(num_patches, hidden_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.patch_embedding(pixel_values) + self.position_embedding.weight


class SiglipEncoder(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config["num_hidden_layers"]))

    def forward(self, hidden: Tensor) -> Tensor:
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


class SiglipVisionModel(nn.Module):
    """pixel_values [N, C, S, S] -> last hidden states [N, (S / patch)^2, hidden] after `post_layernorm`.

    `config` is a complete vision config (`pagoda.models.hf_config.vision_config`); submodules carry the
    checkpoint's names (`embeddings`, `encoder.layers`, `post_layernorm`).
    """

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.input_shape = (config["num_channels"], config["image_size"], config["image_size"])
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = LayerNorm(config["hidden_size"], config["layer_norm_eps"])

    def forward(self, pixel_values: Tensor) -> Tensor:
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != self.input_shape:
            raise ValueError(f"pixel_values must be [N, {', '.join(map(str, self.input_shape))}], "
                             f"got {list(pixel_values.shape)}")
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))
