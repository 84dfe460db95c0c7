"""Models layer: opt-in weight-only int8 (`quantization="int8"`), used where it is faster — single rows.

A decode step over one sequence is bound by reading the weights, so an int8
copy of each weight (one scale per output channel, absmax / 127) halves the
bytes it reads; `torch.ops.aten._weight_int8pack_mm` multiplies the
activations, still in the model dtype, by it. That kernel is a
matrix-vector product at heart. Measured on Gemma 3 270M (2 cores), against
bf16 weights packed for oneDNN (`layers.pack_for_cpu`), a whole decode step
with it is 1.14x faster for one sequence, 1.03x for two, 0.81x for four (and
0.43x for 64 against plain bf16). So each quantized layer keeps its original
weight as well, and calls with more than `INT8_MAX_ROWS` rows multiply by
that: int8 buys single-stream speed for half the linear weights' memory
again. A tied LM head's original weight is the embedding table, which stays
anyway, so its int8 copy is the only addition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

QUANTIZATIONS = (None, "int8")
# Above this many rows per call, the model dtype's own GEMM beats `_weight_int8pack_mm` (see the docstring).
INT8_MAX_ROWS = 1
# Rows of a weight quantized at once: bounds the float32 temporaries (the 262k-row Gemma LM head).
_QUANTIZE_ROWS = 16384


@dataclass(frozen=True)
class Int8Weight:
    """An int8 copy of a [N, K] weight: weight[n] ~= values[n] * scales[n]."""

    values: Tensor  # int8 [N, K]
    scales: Tensor  # [N], in the activation dtype (the kernel requires it)

    @classmethod
    def quantize(cls, weight: Tensor) -> Int8Weight:
        values = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scales = torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device)
        for start in range(0, weight.shape[0], _QUANTIZE_ROWS):
            rows = weight[start : start + _QUANTIZE_ROWS].float()
            # Round the scales to the activation dtype first and quantize with the rounded value, so the
            # kernel's dequantization uses exactly the scale the values were computed for.
            row_scales = (rows.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny).to(weight.dtype)
            values[start : start + _QUANTIZE_ROWS] = (rows / row_scales.float()[:, None]).round().clamp(-127, 127)
            scales[start : start + _QUANTIZE_ROWS] = row_scales
        return cls(values=values, scales=scales)

    def applies_to(self, x: Tensor) -> bool:
        """Whether `x` has few enough rows for the int8 kernel to be the faster one."""
        return x.numel() <= INT8_MAX_ROWS * x.shape[-1]

    def matmul(self, x: Tensor) -> Tensor:
        """x [..., K] -> x @ weight.T [..., N], in x's dtype."""
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.ops.aten._weight_int8pack_mm(rows, self.values, self.scales)
        return out.view(*x.shape[:-1], -1)


def quantize_model(model: nn.Module, quantization: str | None) -> None:
    """Give every module that has an int8 path (a `quantize_int8()` method) its int8 weights."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization is None:
        return
    for module in model.modules():
        if hasattr(module, "quantize_int8"):
            module.quantize_int8()
