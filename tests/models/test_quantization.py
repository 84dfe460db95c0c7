"""Weight-only int8: the int8 path equals the model with dequantized weights; large calls keep the original."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dense_attention import prefill_logits
from test_models_tiny import folder, gemma_folder, llama_folder  # noqa: F401  (fixtures)

from pagoda.models import load_model
from pagoda.models.layers import Linear
from pagoda.models.quantization import INT8_MAX_ROWS, Int8Weight, quantize_model


def dequantized(int8: Int8Weight) -> torch.Tensor:
    return int8.values.float() * int8.scales.float()[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rounds_each_row_within_half_a_step(dtype):
    torch.manual_seed(0)
    weight = (torch.randn(70, 48) * torch.logspace(-3, 1, 70)[:, None]).to(dtype)
    weight[5] = 0  # an all-zero row must not divide by zero
    int8 = Int8Weight.quantize(weight)
    assert int8.values.dtype == torch.int8 and int8.scales.dtype == dtype
    assert int8.values.abs().max() <= 127
    error = (dequantized(int8) - weight.float()).abs()
    assert (error <= int8.scales.float()[:, None] * 0.5 * (1 + 1e-3)).all()
    assert (dequantized(int8)[5] == 0).all()


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matmul_equals_dequantized_weight(dtype, tolerance):
    torch.manual_seed(1)
    int8 = Int8Weight.quantize(torch.randn(40, 64).to(dtype))
    x = torch.randn(2, 3, 64).to(dtype)
    out = int8.matmul(x)
    assert out.shape == (2, 3, 40) and out.dtype == dtype
    torch.testing.assert_close(out.float(), x.float() @ dequantized(int8).T, atol=tolerance, rtol=tolerance)


def test_linear_uses_int8_only_for_few_rows():
    torch.manual_seed(2)
    linear = Linear(64, 32)
    # Checkpoint layers are never initialised (the loader fills them): give this one real values.
    linear.weight.data.normal_(0.0, 0.1)
    linear.quantize_int8()
    few, many = torch.randn(INT8_MAX_ROWS, 64), torch.randn(INT8_MAX_ROWS + 1, 64)
    torch.testing.assert_close(linear(few), few @ dequantized(linear.int8).T, atol=1e-5, rtol=1e-5)
    assert torch.equal(linear(many), torch.nn.functional.linear(many, linear.weight))


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="quantization"):
        quantize_model(torch.nn.Linear(2, 2), "int4")


def _with_dequantized_weights(model: torch.nn.Module) -> None:
    """Replace every weight that has an int8 copy by that copy's dequantized values: the plain reference."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.weight.data = dequantized(Int8Weight.quantize(module.weight)).to(module.weight.dtype)
    # A tied head gets a separate lm_head: the embedding lookup keeps the original table.
    weight = (model.model.embed_tokens if model.lm_head is None else model.lm_head).weight
    model.lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    model.lm_head.weight.data = dequantized(Int8Weight.quantize(weight)).to(weight.dtype)


@torch.no_grad()
def test_int8_model_equals_dequantized_model(folder: Path) -> None:  # noqa: F811
    """Tied (Gemma) and untied (Llama) LM heads; few rows take the int8 kernels, many the original weights."""
    model = load_model(folder, torch.float32, torch.device("cpu"), quantization="int8")
    original = load_model(folder, torch.float32, torch.device("cpu"))
    reference = load_model(folder, torch.float32, torch.device("cpu"))
    _with_dequantized_weights(reference)
    token_ids = [5, 17, 3, 60, 41, 8, 22, 90, 11, 2]
    few = token_ids[:INT8_MAX_ROWS]
    torch.testing.assert_close(prefill_logits(model, few), prefill_logits(reference, few), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(prefill_logits(model, few), prefill_logits(original, few), atol=1e-4, rtol=1e-4)
    assert torch.equal(prefill_logits(model, token_ids), prefill_logits(original, token_ids))
