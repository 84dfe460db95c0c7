"""Tests for the models layer: GGUF -> Hugging Face conversion on tiny random GGUF files.

The tiny files carry llama.cpp's storage conventions, so these tests pin the
two quirks (Llama q/k row permutation, Gemma's 1 + w norms), dequantization,
the config and the tokenizer, and then check the converted folder against
transformers' own models.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dense_attention import prefill_logits
from safetensors.torch import load_file
from tiny_gguf import SLIDING_WINDOW, write_tiny_gguf
from tokenizers import Tokenizer

from pagoda.models import load_model
from pagoda.models.gguf_convert import convert_gguf
from pagoda.models.loader import weight_files

LAYERS = {"llama": 2, "gemma3": 6}  # six Gemma layers: five sliding, one global


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, dict]:
    architecture = request.param
    root = tmp_path_factory.mktemp(architecture)
    expected = write_tiny_gguf(root / f"{architecture}.gguf", architecture, LAYERS[architecture])
    out_dir = root / "hf"
    out_dir.mkdir()
    convert_gguf(root / f"{architecture}.gguf", out_dir)
    return architecture, out_dir, expected


def test_weights_come_back_in_hugging_face_layout(converted: tuple[str, Path, dict]) -> None:
    # Covers the q/k un-permutation (Llama), the 1 + w norms (Gemma) and Q8_0 dequantization.
    _, folder, expected = converted
    weights: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        weights.update(load_file(file))
    assert set(weights) == set(expected)
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32
        np.testing.assert_allclose(tensor.numpy(), expected[name], rtol=0, atol=1e-6, err_msg=name)


def test_config_loads_in_transformers(converted: tuple[str, Path, dict]) -> None:
    from transformers import AutoConfig

    architecture, folder, _ = converted
    config = AutoConfig.from_pretrained(folder)
    assert config.num_hidden_layers == LAYERS[architecture]
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    if architecture == "gemma3":
        assert config.model_type == "gemma3_text" and config.architectures == ["Gemma3ForCausalLM"]
        assert config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
        assert config.sliding_window == SLIDING_WINDOW and config.query_pre_attn_scalar == 16
        assert config.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
        assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
        assert config.tie_word_embeddings and config.hidden_activation == "gelu_pytorch_tanh"
    else:
        assert config.model_type == "llama" and not config.tie_word_embeddings
        assert config.rope_parameters["rope_theta"] == 10_000.0
    assert config.rms_norm_eps == 1e-6


def test_tokenizer_follows_the_gguf_bos_flag(converted: tuple[str, Path, dict]) -> None:
    from transformers import AutoTokenizer

    architecture, folder, _ = converted
    add_bos = architecture == "gemma3"  # what each tiny file says
    bos_id = 2 if architecture == "gemma3" else 1
    raw = Tokenizer.from_file(str(folder / "tokenizer.json")).encode("the cat").ids
    hf = AutoTokenizer.from_pretrained(folder)("the cat")["input_ids"]
    assert raw == hf
    assert (raw[0] == bos_id) == add_bos
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is add_bos
    assert not (folder / "chat_template.jinja").exists()
    if architecture == "llama":
        assert "<|im_start|>" in config["chat_template"]
    else:
        assert "chat_template" not in config


@torch.no_grad()
def test_logits_match_transformers(converted: tuple[str, Path, dict]) -> None:
    from transformers import AutoModelForCausalLM

    architecture, folder, _ = converted
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    model = load_model(folder, torch.float32, torch.device("cpu"))
    # Longer than the tiny sliding window (4), so windowed layers see a cut context.
    token_ids = [2, *range(200, 219)] if architecture == "gemma3" else list(range(40, 60))
    expected = reference(torch.tensor([token_ids])).logits[0]
    actual = prefill_logits(model, token_ids)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_weights_split_into_shards_when_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pagoda.models.gguf_convert._MAX_SHARD_BYTES", 100_000)
    write_tiny_gguf(tmp_path / "m.gguf", "llama", num_layers=2)
    out_dir = tmp_path / "hf"
    out_dir.mkdir()
    convert_gguf(tmp_path / "m.gguf", out_dir)
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    assert not list(out_dir.glob("*.tmp"))
    model = load_model(out_dir, torch.float32, torch.device("cpu"))
    assert prefill_logits(model, [5, 6, 7]).shape == (3, model.model.embed_tokens.num_embeddings)
