"""Tests for the models layer: the two no-download models, converted from their GGUF files, against transformers.

The session fixtures `gemma_path` / `smollm_path` (tests/conftest.py) convert
each model into the real cache on first use, so these pass on an empty cache.
The reference is transformers' eager attention on the same converted folder,
in float32. Measured: Pagoda's logits equal it exactly (max abs diff 0.0, on
logits of magnitude ~20-35); the asserted tolerance leaves room for other
BLAS builds.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from dense_attention import DenseAttention, greedy_generate, prefill_logits
from tokenizers import Tokenizer

from pagoda.models import MODEL_ALIASES, load_model
from pagoda.models.gguf_convert import open_gguf, read_metadata

pytestmark = pytest.mark.slow

ATOL = 1e-4
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def folders(gemma_path: Path, smollm_path: Path) -> dict[str, Path]:
    return {"gemma3-270m": gemma_path, "smollm2-135m": smollm_path}


@pytest.fixture(scope="module")
def models(folders: dict[str, Path]) -> dict[str, torch.nn.Module]:
    return {name: load_model(path, torch.float32, torch.device("cpu")) for name, path in folders.items()}


@pytest.fixture(scope="module")
def references(folders: dict[str, Path]) -> dict[str, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    return {
        name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
        for name, path in folders.items()
    }


@pytest.fixture(scope="module")
def tokenizers(folders: dict[str, Path]) -> dict:
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(path) for name, path in folders.items()}


@pytest.mark.parametrize("name", ["gemma3-270m", "smollm2-135m"])
def test_tokenizer_adds_bos_exactly_as_the_gguf_says(name: str, folders: dict[str, Path], tokenizers: dict) -> None:
    metadata = read_metadata(open_gguf(MODEL_ALIASES[name]()))
    add_bos, bos_id = metadata["tokenizer.ggml.add_bos_token"], metadata["tokenizer.ggml.bos_token_id"]
    assert (name, add_bos, bos_id) in {("gemma3-270m", True, 2), ("smollm2-135m", False, 1)}
    raw = Tokenizer.from_file(str(folders[name] / "tokenizer.json")).encode("Hello world").ids
    hf = tokenizers[name]("Hello world")["input_ids"]
    assert raw == hf
    assert (raw[0] == bos_id) is add_bos
    assert raw.count(bos_id) == (1 if add_bos else 0)


def test_chat_template_is_kept(folders: dict[str, Path], tokenizers: dict) -> None:
    smollm_config = json.loads((folders["smollm2-135m"] / "tokenizer_config.json").read_text())
    gguf_template = read_metadata(open_gguf(MODEL_ALIASES["smollm2-135m"]()))["tokenizer.chat_template"]
    assert smollm_config["chat_template"] == gguf_template
    text = tokenizers["smollm2-135m"].apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    gemma_config = json.loads((folders["gemma3-270m"] / "tokenizer_config.json").read_text())
    assert "chat_template" not in gemma_config  # the 270M base model has none


def test_gemma_config_describes_the_architecture(folders: dict[str, Path]) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folders["gemma3-270m"])
    assert config.model_type == "gemma3_text" and config.num_hidden_layers == 18
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 1, 256)
    assert config.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert config.sliding_window == 512 and config.query_pre_attn_scalar == 256
    assert config.vocab_size == 262144 and config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (2, 1, 0)


@torch.no_grad()
@pytest.mark.parametrize("name", ["gemma3-270m", "smollm2-135m"])
def test_logits_match_transformers(name: str, models: dict, references: dict, tokenizers: dict) -> None:
    for prompt in PROMPTS:
        token_ids = tokenizers[name](prompt)["input_ids"]
        expected = references[name](torch.tensor([token_ids])).logits[0]
        actual = prefill_logits(models[name], token_ids)
        assert actual.dtype == torch.float32
        torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL, msg=lambda m, prompt=prompt: f"{prompt!r}: {m}")


@torch.no_grad()
def test_gemma_prompt_longer_than_the_sliding_window(models: dict, references: dict, tokenizers: dict) -> None:
    model = models["gemma3-270m"]
    text = " ".join(f"Item {i} costs {i * 7 % 13} coins." for i in range(80))  # 729 tokens
    token_ids = tokenizers["gemma3-270m"](text)["input_ids"]
    assert len(token_ids) > 700
    tail = 32
    expected = references["gemma3-270m"](torch.tensor([token_ids]), logits_to_keep=tail).logits[0]
    torch.testing.assert_close(prefill_logits(model, token_ids)[-tail:], expected, rtol=0, atol=ATOL)

    # The same run with every layer global must differ: the window really cut the context.
    unwindowed = [dataclasses.replace(spec, sliding_window=None) for spec in model.attention_layer_specs()]
    attention = DenseAttention(unwindowed)
    attention.begin_step([0], [len(token_ids)])
    hidden = model(torch.tensor(token_ids), torch.arange(len(token_ids)), attention)
    assert (model.compute_logits(hidden[-tail:]) - expected).abs().max() > 1.0


@torch.no_grad()
@pytest.mark.parametrize("name", ["gemma3-270m", "smollm2-135m"])
def test_greedy_tokens_match_transformers(name: str, models: dict, references: dict, tokenizers: dict) -> None:
    for prompt in PROMPTS[:2]:
        token_ids = tokenizers[name](prompt)["input_ids"]
        expected = references[name].generate(
            torch.tensor([token_ids]), max_new_tokens=16, do_sample=False, min_new_tokens=16
        )[0, len(token_ids):].tolist()
        assert greedy_generate(models[name], token_ids, 16) == expected, prompt
