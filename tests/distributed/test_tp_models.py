"""Tests for tensor parallelism: whole decoders split across gloo ranks, against the same model on one rank.

Tiny random models (saved by transformers) cover the layouts: Gemma 3 with
one KV head replicated on 2 ranks, tied and soft-capped; Llama with 3 KV
heads split across 3 ranks, an untied LM head and a vocabulary (97) that
needs padding. Prefill logits agree within LOGITS_ATOL (row-parallel sums
reorder float additions) and are bitwise equal on every rank (gathered, so
every rank samples the same token); greedy tokens equal TP=1's. The
reference runs in a one-rank process with one thread, like the ranks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from models.random_models import save_random_model
from models.dense_attention import DenseAttention, greedy_generate, prefill_logits
from rank_runner import run_ranks

from pagoda.distributed.parallel_state import TensorParallelGroup
from pagoda.models import load_hf_config, load_model
from pagoda.models.hf_config import check_tensor_parallel_size, tensor_parallel_sizes
from pagoda.models.layers import Linear, pack_for_cpu

LOGITS_ATOL = 1e-5  # measured: at most 4.5e-7 on these models
BF16_ATOL = 5e-2  # measured: 1.1e-2
COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, head_dim=16,
              max_position_embeddings=128)
PROMPT = [int(t) for t in torch.randint(0, 97, (24,), generator=torch.Generator().manual_seed(5))]


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(**COMMON, num_attention_heads=4, num_key_value_heads=1, sliding_window=5,
                              query_pre_attn_scalar=24, final_logit_softcapping=3.0,
                              layer_types=["sliding_attention", "full_attention"] * 2,
                              architectures=["Gemma3ForCausalLM"])
    return save_random_model(tmp_path_factory.mktemp("gemma3"), config)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(**{**COMMON, "hidden_size": 96}, num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    return save_random_model(tmp_path_factory.mktemp("llama"), config)


@torch.no_grad()
def _run_model(tp: TensorParallelGroup, folder: Path, num_new_tokens: int) -> dict:
    model = load_model(folder, torch.float32, torch.device("cpu"), tp=tp)
    hidden = torch.randn(5, model.model.embed_tokens.embedding_dim, generator=torch.Generator().manual_seed(6))
    specs = model.attention_layer_specs()
    layer = model.model.layers[0]
    return {"prefill": prefill_logits(model, PROMPT).numpy(),
            "lm_head": model.compute_logits(hidden).numpy(),
            "greedy": greedy_generate(model, PROMPT, num_new_tokens),
            "heads": [(spec.num_heads, spec.num_kv_heads) for spec in specs],
            "weights": {name: layer.get_submodule(module).weight.numpy() for name, module in _LAYER0.items()},
            "embedding": model.model.embed_tokens.weight.numpy(),
            "storage": {name: _storage_kind(param, folder) for name, param in model.named_parameters()}}


def _storage_kind(param: torch.Tensor, folder: Path) -> str:
    """"own" (memory of exactly its own size), "mapped" (inside the checkpoint file's mapping) or "copy"."""
    if param.untyped_storage().nbytes() == param.nbytes:
        return "own"
    address, checkpoint = param.data_ptr(), str(folder / "model.safetensors")
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(bound, 16) for bound in fields[0].split("-"))
        if fields[-1] == checkpoint and start <= address < end:
            return "mapped"
    return "copy"


_LAYER0 = {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"}


@pytest.mark.parametrize(("name", "world_size", "local_heads"), [("gemma", 2, (2, 1)), ("llama", 3, (2, 1))])
def test_tp_model_matches_one_rank(name: str, world_size: int, local_heads: tuple[int, int],
                                   tiny_gemma: Path, tiny_llama: Path) -> None:
    folder = tiny_gemma if name == "gemma" else tiny_llama
    (reference,) = run_ranks(1, _run_model, folder, 8)
    ranks = run_ranks(world_size, _run_model, folder, 8)
    for out in ranks:
        assert out["heads"] == [local_heads] * 4, "attention_layer_specs must give this rank's heads"
        # Gathered logits: the same bits on every rank.
        assert np.array_equal(out["prefill"], ranks[0]["prefill"])
        assert out["greedy"] == reference["greedy"]
    # The LM head alone (same hidden states) is column-parallel: bit-exact.
    assert np.array_equal(ranks[0]["lm_head"], reference["lm_head"])
    assert ranks[0]["prefill"].shape == reference["prefill"].shape == (len(PROMPT), 97)
    np.testing.assert_allclose(ranks[0]["prefill"], reference["prefill"], rtol=0, atol=LOGITS_ATOL)
    heads = (4, 1) if name == "gemma" else (6, 3)
    _check_rank_weights(ranks, reference, *heads)


def _check_rank_weights(ranks: list[dict], reference: dict, num_heads: int, num_kv_heads: int) -> None:
    """Each rank's layer-0 weights and embedding rows, put back together, are the full model's, bitwise."""
    world_size, full = len(ranks), reference["weights"]
    q_rows, kv_rows = num_heads * 16, num_kv_heads * 16
    full_q, full_k, full_v = np.split(full["qkv"], [q_rows, q_rows + kv_rows])
    local_q, local_kv = q_rows // world_size, kv_rows // min(num_kv_heads, world_size)
    pieces = [np.split(out["weights"]["qkv"], [local_q, local_q + local_kv]) for out in ranks]
    assert np.array_equal(np.concatenate([q for q, _, _ in pieces]), full_q)
    for index, full_kv in ((1, full_k), (2, full_v)):
        if num_kv_heads >= world_size:
            assert np.array_equal(np.concatenate([piece[index] for piece in pieces]), full_kv)
        else:  # one KV head, replicated on every rank
            assert all(np.array_equal(piece[index], full_kv) for piece in pieces)
    for name, axis in (("o", 1), ("down", 1)):
        assert np.array_equal(np.concatenate([out["weights"][name] for out in ranks], axis=axis), full[name])
    gate_ups = [np.split(out["weights"]["gate_up"], 2) for out in ranks]
    assert np.array_equal(np.concatenate([gate for gate, _ in gate_ups]), np.split(full["gate_up"], 2)[0])
    assert np.array_equal(np.concatenate([up for _, up in gate_ups]), np.split(full["gate_up"], 2)[1])
    table = np.concatenate([out["embedding"] for out in ranks])
    vocab = reference["embedding"].shape[0]
    assert np.array_equal(table[:vocab], reference["embedding"]) and not table[vocab:].any()
    # No rank copies a whole tensor: each parameter is a view of the mapped file or holds only its own bytes.
    for out in ranks:
        assert {name for name, kind in out["storage"].items() if kind == "copy"} == set()
    # Row slices of a float32 file are adopted as they lie in it (rank 0's embedding rows need no padding).
    assert ranks[0]["storage"]["model.embed_tokens.weight"] == "mapped"


def _load_error(tp: TensorParallelGroup, folder: Path) -> str:
    try:
        load_model(folder, torch.float32, torch.device("cpu"), tp=tp)
    except ValueError as err:
        return str(err)
    return ""


def test_head_counts_that_do_not_split_are_refused(smollm_path: Path, gemma_path: Path) -> None:
    smollm, gemma = load_hf_config(smollm_path), load_hf_config(gemma_path)
    # SmolLM2 135M: 9 query heads, 3 KV heads, MLP 1536.
    assert tensor_parallel_sizes(smollm) == [1, 3]
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 .* 9 attention heads .* sizes that work: 1, 3$"):
        check_tensor_parallel_size(smollm, 2)
    check_tensor_parallel_size(smollm, 3)
    # Gemma 3 270M: 4 query heads and 1 KV head, replicated on every rank.
    assert tensor_parallel_sizes(gemma) == [1, 2, 4]
    check_tensor_parallel_size(gemma, 2)
    with pytest.raises(ValueError, match="sizes that work: 1, 2, 4"):
        check_tensor_parallel_size(gemma, 3)
    # A rank refuses the model before reading any weight.
    errors = run_ranks(2, _load_error, smollm_path)
    assert all("tensor_parallel_size 2 does not split this model" in error for error in errors)


@torch.no_grad()
def _bf16_model(tp: TensorParallelGroup, folder: Path) -> dict:
    model = load_model(folder, torch.bfloat16, torch.device("cpu"), tp=tp)
    linears = [module for module in model.modules() if isinstance(module, Linear)]
    return {"logits": prefill_logits(model, PROMPT).numpy(),
            "packed": all(module.packed is not None and module.weight is None for module in linears),
            "num_linears": len(linears), "lm_head_packed": model.lm_head_packed is not None}


@pytest.mark.skipif(pack_for_cpu(torch.zeros(8, 8, dtype=torch.bfloat16)) is None,
                    reason="no packed bf16 here (needs oneDNN and a bf16 dot product)")
def test_bf16_shards_take_the_packed_cpu_layout(tiny_gemma: Path) -> None:
    (reference,) = run_ranks(1, _bf16_model, tiny_gemma)
    ranks = run_ranks(2, _bf16_model, tiny_gemma)
    for out in ranks:
        assert out["packed"] and out["lm_head_packed"] and out["num_linears"] == 4 * 4
        assert np.array_equal(out["logits"], ranks[0]["logits"])
    # bf16 rounds each rank's partial sums before the all-reduce adds them: close, not equal (|logits| <= 3).
    np.testing.assert_allclose(ranks[0]["logits"], reference["logits"], rtol=0, atol=BF16_ATOL)


MM_TEXT = dict(vocab_size=262208, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=16,
               max_position_embeddings=128)
MM_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                 patch_size=14, layer_norm_eps=1e-6, vision_use_head=False)
IMAGE_TOKEN_ID, SOFT_TOKENS = 262144, 4


@pytest.fixture(scope="module")
def tiny_gemma_mm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    config = Gemma3Config(text_config=MM_TEXT, vision_config=MM_VISION, mm_tokens_per_image=SOFT_TOKENS,
                          image_token_index=IMAGE_TOKEN_ID, architectures=["Gemma3ForConditionalGeneration"])
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).to(torch.float32)
    with torch.no_grad():  # image rows about as large as text rows, so they move the logits
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.05)
    folder = tmp_path_factory.mktemp("gemma3_mm")
    model.save_pretrained(folder)
    return folder


@torch.no_grad()
def _image_prompt_logits(tp: TensorParallelGroup, folder: Path) -> np.ndarray:
    model = load_model(folder, torch.float32, torch.device("cpu"), tp=tp)
    token_ids = PROMPT[:5] + [IMAGE_TOKEN_ID] * SOFT_TOKENS + PROMPT[5:12]
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(7))
    attention = DenseAttention(model.attention_layer_specs())
    attention.begin_step([0], [len(token_ids)], [[(5, 5 + SOFT_TOKENS)]])
    embeds = model.embed_multimodal(pixels).flatten(0, 1)
    indices = torch.arange(5, 5 + SOFT_TOKENS)
    hidden = model(torch.tensor(token_ids), torch.arange(len(token_ids)), attention, embeds, indices)
    return model.compute_logits(hidden).numpy()


def test_image_model_splits_its_decoder(tiny_gemma_mm: Path) -> None:
    # The vision tower runs whole on every rank; the decoder and its 262k-row LM head are split.
    (reference,) = run_ranks(1, _image_prompt_logits, tiny_gemma_mm)
    ranks = run_ranks(2, _image_prompt_logits, tiny_gemma_mm)
    assert np.array_equal(ranks[0], ranks[1])
    np.testing.assert_allclose(ranks[0], reference, rtol=0, atol=LOGITS_ATOL)


def test_one_rank_builds_the_unsplit_layers(tiny_llama: Path) -> None:
    # World size 1 is the single-process path: no parallel class, no process group, no collective.
    from pagoda.models import parallel_linear

    model = load_model(tiny_llama, torch.float32, torch.device("cpu"))
    parallel = (parallel_linear.MergedColumnParallelLinear, parallel_linear.RowParallelLinear,
                parallel_linear.VocabParallelEmbedding, parallel_linear.ParallelLMHead)
    assert not any(isinstance(module, parallel) for module in model.modules())
    assert not torch.distributed.is_initialized()
