"""Tests for the models layer: model code and loader on tiny random Hugging Face folders.

transformers builds and saves the tiny models, so these also prove that
folders written by transformers itself (tied embeddings without lm_head,
untied lm_head, Llama 3 rope scaling, Gemma soft-capping) load and match.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from random_models import save_random_model
from dense_attention import DenseAttention, prefill_logits
from safetensors.torch import load_file, save_file

from pagoda.models import layers, load_hf_config, load_model
from pagoda.models.layers import RotaryEmbedding, apply_rotary, rope_inv_freq
from pagoda.models.registry import get_model_class

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128)


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Gemma3TextConfig

    # No attn_logit_softcapping: transformers' Gemma 3 reads it but never applies it (and no
    # released Gemma 3 sets it), so it cannot serve as the reference; see test_attention_layer_specs.
    config = Gemma3TextConfig(**COMMON, sliding_window=5, query_pre_attn_scalar=24, final_logit_softcapping=3.0,
                              layer_types=["sliding_attention", "full_attention"] * 2,
                              architectures=["Gemma3ForCausalLM"])
    return save_random_model(tmp_path_factory.mktemp("gemma3"), config)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    config = LlamaConfig(**COMMON, tie_word_embeddings=False, rope_parameters=rope, architectures=["LlamaForCausalLM"])
    return save_random_model(tmp_path_factory.mktemp("llama"), config)


@pytest.fixture(params=["gemma", "llama"])
def folder(request: pytest.FixtureRequest, gemma_folder: Path, llama_folder: Path) -> Path:
    return gemma_folder if request.param == "gemma" else llama_folder


@torch.no_grad()
def test_logits_match_transformers(folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    model = load_model(folder, torch.float32, torch.device("cpu"))
    token_ids = [int(t) for t in torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(1))]
    expected = reference(torch.tensor([token_ids])).logits[0]
    torch.testing.assert_close(prefill_logits(model, token_ids), expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_ragged_batch_equals_separate_runs(folder: Path) -> None:
    # Two prompts and a decode step of a third sequence in one flat batch.
    model = load_model(folder, torch.float32, torch.device("cpu"))
    first, second, third = list(range(3, 20)), list(range(30, 37)), list(range(50, 60))
    attention = DenseAttention(model.attention_layer_specs())
    attention.begin_step([2], [len(third) - 1])
    model(torch.tensor(third[:-1]), torch.arange(len(third) - 1), attention)
    attention.begin_step([0, 1, 2], [len(first), len(second), 1])
    ids = torch.tensor(first + second + third[-1:])
    positions = torch.cat([torch.arange(len(first)), torch.arange(len(second)), torch.tensor([len(third) - 1])])
    logits = model.compute_logits(model(ids, positions, attention))
    torch.testing.assert_close(logits[: len(first)], prefill_logits(model, first), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[len(first) : -1], prefill_logits(model, second), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits[-1], prefill_logits(model, third)[-1], rtol=0, atol=1e-5)


def test_attention_layer_specs(gemma_folder: Path, llama_folder: Path) -> None:
    config = {**load_hf_config(gemma_folder), "attn_logit_softcapping": 2.0}
    with torch.device("meta"):
        gemma = get_model_class("Gemma3ForCausalLM")(config).attention_layer_specs()
    assert [s.sliding_window for s in gemma] == [5, None, 5, None]
    assert {(s.num_heads, s.num_kv_heads, s.head_dim, s.scale, s.logit_softcap) for s in gemma} == {
        (4, 2, 16, 24**-0.5, 2.0)
    }
    llama = load_model(llama_folder, torch.float32, torch.device("cpu")).attention_layer_specs()
    assert len(llama) == 4 and {(s.scale, s.sliding_window, s.logit_softcap) for s in llama} == {(0.25, None, None)}


def test_bfloat16_load_keeps_float32_logits(gemma_folder: Path) -> None:
    model = load_model(gemma_folder, torch.bfloat16, torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb["full_attention"].cos_sin_cache.dtype == torch.bfloat16
    logits = prefill_logits(model, [1, 2, 3])
    assert logits.dtype == torch.float32 and logits.abs().max() <= 3.0  # soft-capped at 3


def test_rotary_matches_transformers() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rope = RotaryEmbedding(16, 64, {"rope_type": "default", "rope_theta": 10000.0})
    rope.init_buffers(torch.device("cpu"), torch.float32)
    positions = torch.tensor([0, 5, 63, 7])
    q, k = torch.randn(4, 3, 16), torch.randn(4, 1, 16)
    freqs = positions[:, None].float() * rope_inv_freq(16, {"rope_theta": 10000.0})[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    expected_q, expected_k = apply_rotary_pos_emb(q, k, emb.cos(), emb.sin(), unsqueeze_dim=1)
    cos, sin = rope(positions)
    torch.testing.assert_close(apply_rotary(q, cos, sin), expected_q, rtol=0, atol=0)
    torch.testing.assert_close(apply_rotary(k, cos, sin), expected_k, rtol=0, atol=0)


def test_llama3_rope_frequencies_match_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_parameters=dict(rope))
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, None)
    torch.testing.assert_close(rope_inv_freq(64, rope), expected)


def test_unsupported_rope_type_is_named() -> None:
    with pytest.raises(ValueError, match="'yarn'"):
        rope_inv_freq(16, {"rope_type": "yarn", "rope_theta": 1.0})


def test_unknown_architecture_lists_supported() -> None:
    with pytest.raises(ValueError, match="Gemma3ForCausalLM, Gemma3ForConditionalGeneration, LlamaForCausalLM"):
        get_model_class("GPT2LMHeadModel")


def _rewrite_weights(folder: Path, target: Path, edit) -> Path:
    target.mkdir()
    for name in ("config.json",):
        (target / name).write_bytes((folder / name).read_bytes())
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, target / "model.safetensors")
    return target


def test_missing_weight_is_named(llama_folder: Path, tmp_path: Path) -> None:
    broken = _rewrite_weights(llama_folder, tmp_path / "m", lambda w: w.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing weights.*layers\.1\.self_attn\.qkv_proj\.weight\[1\]"):
        load_model(broken, torch.float32, torch.device("cpu"))


def test_unexpected_weight_is_named(llama_folder: Path, tmp_path: Path) -> None:
    def add_bias(weights: dict) -> None:
        weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)

    broken = _rewrite_weights(llama_folder, tmp_path / "u", add_bias)
    with pytest.raises(ValueError, match=r"unexpected weight 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        load_model(broken, torch.float32, torch.device("cpu"))


def test_wrong_shape_is_named(llama_folder: Path, tmp_path: Path) -> None:
    def shrink(weights: dict) -> None:
        weights["model.norm.weight"] = torch.ones(63)

    broken = _rewrite_weights(llama_folder, tmp_path / "s", shrink)
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \(63,\), expected \(64,\)"):
        load_model(broken, torch.float32, torch.device("cpu"))


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_written_into_a_reused_buffer_equal_fresh_ones(gemma_folder: Path, dtype: torch.dtype,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # The model runner reuses one float32 buffer for every step's sampled logits; the soft cap runs in place.
    monkeypatch.setattr(layers, "LM_HEAD_SLICE_ROWS", 48)  # bf16 on oneDNN: a packed head in three slices
    model = load_model(gemma_folder, dtype, torch.device("cpu"))
    assert model.final_logit_softcap is not None
    hidden = torch.randn(5, model.model.embed_tokens.weight.shape[1]).to(dtype)
    scratch = torch.full((8, model.vocab_size), float("nan"))  # left over from an earlier, larger step
    written = model.compute_logits(hidden, out=scratch[:5])
    fresh = model.compute_logits(hidden)
    assert written.data_ptr() == scratch.data_ptr() and written.dtype == torch.float32
    assert torch.equal(written, fresh)
    cap, model.final_logit_softcap = model.final_logit_softcap, None
    uncapped = model.compute_logits(hidden)
    assert torch.equal(fresh, torch.tanh(uncapped / cap) * cap)
