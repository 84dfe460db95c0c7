"""Pagoda's Gemma 3 vision model against transformers' `Gemma3ForConditionalGeneration`, float32.

Pagoda's model runs through the worker's real paged attention
(`paged_harness`), with each crop's soft tokens as a bidirectional run;
transformers gets `token_type_ids`, without which it runs causally too. The
tolerance is 1e-5 absolute on the logits: the two float32 implementations
agree to under 1e-6 on these prompts, while attending causally inside the
crops moves every logit row from the first soft token on by 0.03 to 0.8
(`test_causal_only_attention_misses_the_tolerance`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from paged_harness import PagedHarness
from tiny_gemma3 import IMAGE_TOKEN_ID, build_tiny_gemma3, image_prompt, soft_token_runs

from pagoda.models import load_model
from pagoda.models.layers import pack_for_cpu

ATOL = 1e-5
TOKENS_PER_CROP = 4
CROP = 56


def _text(count: int, seed: int) -> list[int]:
    return torch.randint(2, 255_000, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


# Prompts by name: text parts and images (a number of crops each); every one outgrows the sliding window (16).
PROMPTS = {
    "one_image": [_text(5, 1), 1, _text(9, 2)],
    "two_images": [_text(3, 3), 1, _text(6, 4), 1, _text(10, 5)],
    "one_image_three_crops": [_text(4, 6), 3, _text(7, 7)],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gemma3(tmp_path_factory.mktemp("gemma3_mm"))


@pytest.fixture(scope="module")
def reference(folder: Path):
    from transformers import Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                          attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def model(folder: Path) -> torch.nn.Module:
    return load_model(folder, torch.float32, torch.device("cpu"))


def _case(name: str) -> tuple[list[int], torch.Tensor]:
    parts = PROMPTS[name]
    num_crops = sum(part for part in parts if isinstance(part, int))
    pixels = torch.randn(num_crops, 3, CROP, CROP, generator=torch.Generator().manual_seed(len(name)))
    return image_prompt(parts, TOKENS_PER_CROP), pixels


@torch.no_grad()
def _reference_logits(reference, token_ids: list[int], pixels: torch.Tensor) -> torch.Tensor:
    ids = torch.tensor([token_ids])
    return reference(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == IMAGE_TOKEN_ID).long()).logits[0]


@torch.no_grad()
def _embeds(model, pixels: torch.Tensor) -> torch.Tensor:
    return model.embed_multimodal(pixels).flatten(0, 1)


def _chunks_between_runs(token_ids: list[int], num_chunks: int) -> list[int]:
    """About equal chunk sizes whose boundaries fall outside every soft-token run."""
    inside = {p for start, end in soft_token_runs(token_ids) for p in range(start + 1, end)}
    cuts = []
    for index in range(1, num_chunks):
        cut = index * len(token_ids) // num_chunks
        while cut in inside:
            cut += 1
        cuts.append(cut)
    bounds = [0, *sorted(set(cuts)), len(token_ids)]
    return [b - a for a, b in zip(bounds, bounds[1:]) if b > a]


@pytest.mark.parametrize("name", list(PROMPTS))
@pytest.mark.parametrize("num_chunks", [1, 3])
def test_logits_match_transformers(model, reference, name: str, num_chunks: int) -> None:
    token_ids, pixels = _case(name)
    harness = PagedHarness(model)
    chunks = _chunks_between_runs(token_ids, num_chunks)
    assert len(chunks) == num_chunks
    logits = harness.prefill(harness.add(token_ids, _embeds(model, pixels)), chunks)
    torch.testing.assert_close(logits, _reference_logits(reference, token_ids, pixels), rtol=0, atol=ATOL)


def test_causal_only_attention_misses_the_tolerance(model, reference) -> None:
    token_ids, pixels = _case("two_images")
    expected = _reference_logits(reference, token_ids, pixels)
    harness = PagedHarness(model, bidirectional=False)
    causal = harness.prefill(harness.add(token_ids, _embeds(model, pixels)))
    first_soft = token_ids.index(IMAGE_TOKEN_ID)
    # Before the first soft token nothing differs; from it on, the missing run mask shows everywhere.
    torch.testing.assert_close(causal[:first_soft], expected[:first_soft], rtol=0, atol=ATOL)
    assert (causal[first_soft:] - expected[first_soft:]).abs().amax(dim=-1).min() > 100 * ATOL


def test_several_sequences_in_one_step(model, reference) -> None:
    harness = PagedHarness(model)
    cases = [_case(name) for name in PROMPTS]
    sequences = [harness.add(ids, _embeds(model, pixels)) for ids, pixels in cases]
    outputs = harness.step(sequences, [len(ids) for ids, _ in cases])
    for (ids, pixels), logits in zip(cases, outputs):
        torch.testing.assert_close(logits, _reference_logits(reference, ids, pixels), rtol=0, atol=ATOL)


def test_prefix_hit_ending_inside_a_run(model, reference) -> None:
    # A second request shares the first blocks of a first one's KV, and those end inside a crop's run: the
    # rest of the run, computed now, must still see the whole run.
    token_ids, pixels = _case("one_image")
    embeds = _embeds(model, pixels)
    harness = PagedHarness(model, block_size=4)
    first = harness.add(token_ids, embeds)
    harness.prefill(first)
    (run_start, run_end), = soft_token_runs(token_ids)
    shared_blocks = run_end // 4
    assert run_start < shared_blocks * 4 < run_end
    second = harness.add(token_ids, embeds)
    second.block_ids[:shared_blocks] = first.block_ids[:shared_blocks]
    second.num_computed = shared = shared_blocks * 4
    rest = harness.step([second], [len(token_ids) - shared])[0]
    expected = _reference_logits(reference, token_ids, pixels)[shared:]
    torch.testing.assert_close(rest, expected, rtol=0, atol=ATOL)


@torch.no_grad()
@pytest.mark.parametrize("name", ["two_images", "one_image_three_crops"])
def test_greedy_tokens_match_transformers(model, reference, name: str) -> None:
    token_ids, pixels = _case(name)
    ids = torch.tensor([token_ids])
    expected = reference.generate(input_ids=ids, pixel_values=pixels, token_type_ids=(ids == IMAGE_TOKEN_ID).long(),
                                  attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    harness = PagedHarness(model)
    new_ids = harness.greedy(harness.add(token_ids, _embeds(model, pixels)), 6)
    assert new_ids == expected[0, len(token_ids) :].tolist()


@torch.no_grad()
def test_vision_tower_and_projector_match_get_image_features(model, reference) -> None:
    pixels = torch.randn(3, 3, CROP, CROP, generator=torch.Generator().manual_seed(11))
    expected = reference.model.get_image_features(pixel_values=pixels)
    expected = getattr(expected, "pooler_output", expected)
    embeds = model.embed_multimodal(pixels)
    assert embeds.shape == (3, TOKENS_PER_CROP, 64)
    torch.testing.assert_close(embeds, expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_patch_embedding_equals_the_conv(model) -> None:
    patch_embedding = model.vision_tower.embeddings.patch_embedding
    pixels = torch.randn(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(12))
    conv = torch.nn.functional.conv2d(pixels, patch_embedding.weight, patch_embedding.bias, stride=14)
    torch.testing.assert_close(patch_embedding(pixels), conv.flatten(2).transpose(1, 2), rtol=0, atol=1e-5)


@torch.no_grad()
def test_bfloat16_tower_runs_on_the_fast_linears(folder: Path, model) -> None:
    bf16 = load_model(folder, torch.bfloat16, torch.device("cpu"))
    if pack_for_cpu(torch.zeros(2, 2, dtype=torch.bfloat16)) is not None:
        tower = bf16.vision_tower
        packed = [tower.embeddings.patch_embedding, tower.encoder.layers[0].self_attn.qkv_proj,
                  tower.encoder.layers[0].mlp.fc2]
        assert all(module.packed is not None for module in packed)
    pixels = torch.randn(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(13))
    embeds = bf16.embed_multimodal(pixels)  # float32 pixels in, the model dtype out
    assert embeds.dtype == torch.bfloat16
    torch.testing.assert_close(embeds.float(), model.embed_multimodal(pixels), rtol=0.05, atol=0.05)


def test_mm_embeds_need_as_many_indices(model) -> None:
    # Checked before any attention runs, so no attention context is needed.
    with pytest.raises(ValueError, match="mm_embeds has 2 rows but mm_token_indices 1"):
        model(torch.tensor([1, 2]), torch.arange(2), None, torch.zeros(2, 64), torch.tensor([0]))


def test_pixel_values_of_the_wrong_size_are_refused(model) -> None:
    with pytest.raises(ValueError, match=r"pixel_values must be \[N, 3, 56, 56\], got \[1, 3, 28, 28\]"):
        model.embed_multimodal(torch.zeros(1, 3, 28, 28))


@torch.no_grad()
def test_dense_reference_with_runs_matches_transformers(model, reference) -> None:
    # The models layer's test context (tests/models/dense_attention.py) takes the same runs.
    from models.dense_attention import DenseAttention

    token_ids, pixels = _case("one_image_three_crops")
    attention = DenseAttention(model.attention_layer_specs())
    attention.begin_step([0], [len(token_ids)], [soft_token_runs(token_ids)])
    ids = torch.tensor(token_ids)
    indices = torch.nonzero(ids == IMAGE_TOKEN_ID).flatten()
    hidden = model(ids, torch.arange(len(token_ids)), attention, _embeds(model, pixels), indices)
    expected = _reference_logits(reference, token_ids, pixels)
    torch.testing.assert_close(model.compute_logits(hidden), expected, rtol=0, atol=ATOL)


@torch.no_grad()
def test_int8_leaves_the_tower_alone(folder: Path) -> None:
    # The tower always multiplies many rows, where int8 never applies: it keeps no int8 copies.
    plain = load_model(folder, torch.bfloat16, torch.device("cpu"))
    quantized = load_model(folder, torch.bfloat16, torch.device("cpu"), quantization="int8")
    tower_linears = [m for m in quantized.vision_tower.modules() if hasattr(m, "int8")]
    assert tower_linears and all(m.int8 is None for m in tower_linears)
    assert quantized.model.layers[0].mlp.down_proj.int8 is not None
    pixels = torch.randn(2, 3, CROP, CROP, generator=torch.Generator().manual_seed(14))
    assert torch.equal(quantized.embed_multimodal(pixels), plain.embed_multimodal(pixels))
