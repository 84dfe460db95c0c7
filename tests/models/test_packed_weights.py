"""CPU-packed bf16 weights give bit-identical results to `F.linear` on the plain weight, in layers and models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dense_attention import prefill_logits
from test_models_tiny import folder, gemma_folder, llama_folder  # noqa: F401  (fixtures)

from pagoda.models import layers, load_model
from pagoda.models.layers import Linear, pack_for_cpu
from pagoda.models.quantization import INT8_MAX_ROWS

pytestmark = pytest.mark.skipif(pack_for_cpu(torch.zeros(8, 8, dtype=torch.bfloat16)) is None,
                                reason="no packed bf16 here (needs oneDNN and a bf16 dot product)")


def test_only_bf16_weights_are_packed():
    assert pack_for_cpu(torch.zeros(8, 8)) is None
    assert pack_for_cpu(torch.zeros(8, 8, dtype=torch.float16)) is None


@pytest.mark.parametrize("shape", [(1, 48), (3, 48), (64, 48), (2, 5, 48)])
def test_packed_linear_equals_plain(shape):
    torch.manual_seed(0)
    linear = Linear(48, 40).bfloat16()
    linear.weight.data.normal_(0.0, 0.1)  # checkpoint layers are never initialised: the loader fills them
    weight = linear.weight.detach().clone()
    linear.pack_weight()
    assert linear.weight is None and linear.packed is not None
    x = torch.randn(shape).bfloat16()
    assert torch.equal(linear(x), F.linear(x, weight))
    wide = torch.randn(*shape[:-1], 96).bfloat16()
    assert torch.equal(linear(wide[..., :48]), F.linear(wide[..., :48], weight))  # a strided view, as after split


def test_int8_takes_few_rows_and_packed_the_rest():
    torch.manual_seed(1)
    linear = Linear(48, 40).bfloat16()
    linear.weight.data.normal_(0.0, 0.1)  # checkpoint layers are never initialised: the loader fills them
    weight = linear.weight.detach().clone()
    linear.quantize_int8()
    linear.pack_weight()
    few, many = torch.randn(INT8_MAX_ROWS, 48).bfloat16(), torch.randn(16, 48).bfloat16()
    assert torch.equal(linear(few), linear.int8.matmul(few))
    assert torch.equal(linear(many), F.linear(many, weight))


@torch.no_grad()
def test_packed_model_equals_plain_model(folder: Path, monkeypatch) -> None:  # noqa: F811
    """Tied (Gemma: packed copy beside the embedding) and untied (Llama: packed instead of lm_head.weight)."""
    monkeypatch.setattr(layers, "LM_HEAD_SLICE_ROWS", 48)  # several slices, the last one ragged
    packed = load_model(folder, torch.bfloat16, torch.device("cpu"))
    monkeypatch.setattr(layers, "pack_for_cpu", lambda weight: None)
    plain = load_model(folder, torch.bfloat16, torch.device("cpu"))
    assert packed.lm_head_packed is not None and plain.lm_head_packed is None
    assert len(packed.lm_head_packed) > 1 and packed.vocab_size % 48 != 0
    assert packed.model.embed_tokens.weight is not None
    token_ids = [5, 17, 3, 60, 41, 8, 22, 90, 11, 2]
    assert torch.equal(prefill_logits(packed, token_ids), prefill_logits(plain, token_ids))
    assert torch.equal(prefill_logits(packed, token_ids[:1]), prefill_logits(plain, token_ids[:1]))
