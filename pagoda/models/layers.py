"""Models layer: the building blocks shared by the decoder models (norms, rotary, projections, the LM head).

Projections that read the same input are fused into one matmul (`qkv_proj`,
`gate_up_proj`); `PACKED_MODULES_MAPPING` tells the loader which checkpoint
tensor fills which rows of the fused weight.

The attention and MLP blocks built from these live in `pagoda.models.blocks`
(split across tensor-parallel ranks there, through `pagoda.models.parallel_linear`).

Modules holding values derived from the config or from loaded weights (the
rotary cos/sin table, Gemma's float32 1 + w) define `init_buffers(device,
dtype)`. The loader builds models on the meta device and calls it once the
weights are in place.
Every projection is a `Linear` (bias-free in the decoders, biased in the
SigLIP vision tower), which can take an int8 copy of its weight for small
batches (`pagoda.models.quantization`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pagoda.cpu_features import cpu_flags, cpu_has_native_bf16
from pagoda.models.quantization import Int8Weight

# Checkpoint projection name -> (fused module name, shard index within it).
PACKED_MODULES_MAPPING: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalise in float32, cast back, then scale by w."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        # One fused op instead of pow, mean, add, rsqrt and mul: these norms run ~100 times per step.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: x * (1 + w), all in float32 before the cast back (the stored w is centred on 0).

    `init_buffers` computes the float32 (1 + w) once the checkpoint's w is in place.
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        # A placeholder: computing 1 + w on the meta device would import torch._dynamo (~1.4 s).
        self.register_buffer("scale", torch.empty(hidden_size), persistent=False)

    def init_buffers(self, device: torch.device | None, dtype: torch.dtype) -> None:
        self.register_buffer("scale", 1.0 + self.weight.float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), x.shape[-1:], self.scale, self.eps).to(x.dtype)


def rope_inv_freq(head_dim: int, rope_parameters: dict, device: torch.device | None = None) -> Tensor:
    """float32 inverse frequencies for one rope configuration ("default", "linear" or "llama3" scaling)."""
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    base = float(rope_parameters["rope_theta"])
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (base**exponents)
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(rope_parameters["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_parameters)
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, linear, llama3")


def _llama3_inv_freq(inv_freq: Tensor, params: dict) -> Tensor:
    # Llama 3.1 keeps high frequencies, divides low ones by `factor`, and blends
    # linearly between the two wavelength thresholds.
    factor = float(params["factor"])
    old_context = float(params["original_max_position_embeddings"])
    low_factor, high_factor = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    low_wavelen, high_wavelen = old_context / low_factor, old_context / high_factor
    wavelen = 2 * math.pi / inv_freq
    blend = (old_context / wavelen - low_factor) / (high_factor - low_factor)
    blended = (1 - blend) * inv_freq / factor + blend * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    in_between = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(in_between, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding with a cos|sin table for every position up to `max_position`."""

    def __init__(self, head_dim: int, max_position: int, rope_parameters: dict) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.rope_parameters = rope_parameters
        # A placeholder of the table's shape: the loader builds models on the meta device, where computing
        # the table would import torch._dynamo (~1.4 s); `init_buffers` fills it on the real device.
        self.register_buffer("cos_sin_cache", torch.empty(max_position, head_dim), persistent=False)

    def init_buffers(self, device: torch.device | None, dtype: torch.dtype) -> None:
        # Angles in float32 as the reference does, then one cast to the activation dtype.
        positions = torch.arange(self.max_position, dtype=torch.float32, device=device)
        freqs = positions[:, None] * rope_inv_freq(self.head_dim, self.rope_parameters, device)[None, :]
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin for each position, each [T, 1, head_dim // 2] (broadcast over heads)."""
        cos, sin = self.cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
        return cos, sin


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate [T, heads, head_dim] pairs (i, i + head_dim/2), as Hugging Face's rotate_half does."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def pack_for_cpu(weight: Tensor) -> Tensor | None:
    """A bf16 CPU weight in oneDNN's blocked layout, or None where that path does not apply.

    `F.linear` on CPU re-blocks the weight on every call; blocking it once at
    load makes a Gemma 3 270M decode step 1.4x faster for one sequence and
    1.2x for 64, with bit-identical results where the CPU has a bf16 dot
    product (only there). Only bf16: oneDNN's float32 kernels round
    differently from `F.linear`'s.
    """
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
        return None
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return None
    if cpu_has_native_bf16(cpu_flags()) is False:  # oneDNN converts there, rounding unlike F.linear
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def project(x: Tensor, weight: Tensor | None, int8: Int8Weight | None, packed: Tensor | None,
            bias: Tensor | None = None) -> Tensor:
    """x @ weight.T (+ bias) by the fastest form of the weight there is: int8 for few rows, then packed,
    then plain."""
    if int8 is not None and int8.applies_to(x):
        out = int8.matmul(x)
        return out if bias is None else out + bias
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


class CheckpointLinear(nn.Linear):
    """An `nn.Linear` whose weights always come from the checkpoint: built with no random init.

    Initialising on the meta device is not free: `torch.nn.init`'s first call
    imports `torch._dynamo` (~1.4 s of start-up).
    """

    def reset_parameters(self) -> None:
        """Nothing to initialise: the loader fills every parameter."""


class CheckpointEmbedding(nn.Embedding):
    """An `nn.Embedding` filled from the checkpoint, built with no random init (see `CheckpointLinear`)."""

    def reset_parameters(self) -> None:
        """Nothing to initialise: the loader fills every parameter."""


class Linear(CheckpointLinear):
    """A projection (bias-free unless asked) that can also hold faster forms of its weight.

    Once the weights are loaded, `quantize_int8()` adds an int8 copy for calls
    with few rows and `pack_weight()` replaces the weight by its CPU-packed
    form (`weight` is None afterwards: no second copy stays in memory).
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__(input_size, output_size, bias=bias)
        self.int8: Int8Weight | None = None
        self.packed: Tensor | None = None

    def quantize_int8(self) -> None:
        self.int8 = Int8Weight.quantize(self.weight)

    def pack_weight(self) -> None:
        self.packed = pack_for_cpu(self.weight)
        if self.packed is not None:
            self.weight = None

    def forward(self, x: Tensor) -> Tensor:
        return project(x, self.weight, self.int8, self.packed, self.bias)


class MergedLinear(Linear):
    """Several projections of one input stored as one weight (and bias), shard i in rows `shard_rows(i)`."""

    def __init__(self, input_size: int, output_sizes: tuple[int, ...], bias: bool = False) -> None:
        super().__init__(input_size, sum(output_sizes), bias)
        self.output_sizes = output_sizes

    def shard_rows(self, index: int) -> slice:
        start = sum(self.output_sizes[:index])
        return slice(start, start + self.output_sizes[index])


# Vocabulary rows per packed LM-head slice. A [64, 262k] bf16 result (33 MB) is mapped fresh by glibc and
# faulted in at every batch-64 decode step; [64, 16k] slices (2 MB) reuse heap memory, and each is widened
# into the float32 logits while still in cache: 62 -> 55 ms per call here, bit-identical.
LM_HEAD_SLICE_ROWS = 16384


def pack_lm_head_for_cpu(weight: Tensor) -> list[Tensor] | None:
    """The LM head weight [vocab, hidden] as packed slices of LM_HEAD_SLICE_ROWS rows; None where
    `pack_for_cpu` does not apply."""
    slices = [pack_for_cpu(weight[start : start + LM_HEAD_SLICE_ROWS])
              for start in range(0, weight.shape[0], LM_HEAD_SLICE_ROWS)]
    return None if any(packed is None for packed in slices) else slices  # type: ignore[return-value]


def compute_logits(hidden: Tensor, lm_head_weight: Tensor | None, softcap: float | None,
                   lm_head_int8: Int8Weight | None = None, lm_head_packed: list[Tensor] | None = None,
                   out: Tensor | None = None) -> Tensor:
    """float32 logits [N, vocab], written into `out` when given; the projection runs in the weights' dtype,
    the softcap in float32."""
    if lm_head_packed is not None and not (lm_head_int8 is not None and lm_head_int8.applies_to(hidden)):
        vocab_size = sum(packed.shape[0] for packed in lm_head_packed)
        logits = out if out is not None else hidden.new_empty(hidden.shape[0], vocab_size, dtype=torch.float32)
        start = 0
        for packed in lm_head_packed:
            end = start + packed.shape[0]
            logits[:, start:end] = project(hidden, None, None, packed)
            start = end
    else:
        projected = project(hidden, lm_head_weight, lm_head_int8, None)
        logits = projected.float() if out is None else out.copy_(projected)
    if softcap is not None:
        logits.div_(softcap).tanh_().mul_(softcap)  # in place: `logits` is a fresh tensor or the caller's scratch
    return logits
