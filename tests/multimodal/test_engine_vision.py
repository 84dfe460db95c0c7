"""The whole engine on image prompts: `LLM` against transformers, the caches on their counters, bad input.

A tiny random-weight Gemma 3 vision model (`tiny_gemma3`); float32. Prompt
log-probabilities are compared position by position with transformers'
(which gets `token_type_ids`, so it attends bidirectionally within a crop):
within 1e-4, where causal attention inside the crops moves them by 0.03 or
more (tests/multimodal/test_gemma3_mm.py); greedy tokens must be identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from vision_engine_helpers import noise_image, pagoda_prompt_logprobs, pixels_of, png_bytes

from pagoda import LLM, SamplingParams

TOLERANCE = 1e-4
NEW_TOKENS = 6
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, prompt_logprobs=0)
# Prompt logprobs need every prompt position computed, so requests asking for them skip the prefix cache.
CACHED = SamplingParams(temperature=0, max_tokens=NEW_TOKENS)


def make_llm(folder: Path, **kwargs: object) -> LLM:
    kwargs.setdefault("kv_cache_memory", 64 << 20)
    return LLM(str(folder), dtype="float32", max_model_len=512, **kwargs)


@pytest.fixture(scope="module")
def llm(vision_folder: Path) -> LLM:
    return make_llm(vision_folder)


def _check_against_transformers(llm: LLM, reference, prompt: dict) -> None:
    output = llm.generate(prompt, GREEDY, use_tqdm=False)[0]
    processor = llm.llm_engine.input_processor.mm_processor
    images = prompt["multi_modal_data"]["image"]
    token_ids, features = processor.process(prompt["prompt"], images, prompt.get("mm_processor_kwargs"))
    assert token_ids == output.prompt_token_ids
    pixels = pixels_of(features)
    expected = reference.prompt_logprobs(token_ids, pixels)
    assert torch.allclose(pagoda_prompt_logprobs(output), expected, atol=TOLERANCE, rtol=0)
    assert output.outputs[0].token_ids == reference.greedy(token_ids, pixels, NEW_TOKENS)


CASES = {
    "one_image": {"prompt": "Look:<start_of_image> What is it?", "multi_modal_data": {"image": noise_image(1)}},
    "two_images": {"prompt": "<start_of_image> and <start_of_image>: which is brighter?",
                   "multi_modal_data": {"image": [noise_image(2, 60, 60), noise_image(3, 90, 200)]}},
    "pan_and_scan": {"prompt": "Wide:<start_of_image>\nDescribe.",
                     "multi_modal_data": {"image": noise_image(4, 1000, 400)},
                     "mm_processor_kwargs": {"do_pan_and_scan": True}},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_image_prompts_match_transformers(llm: LLM, vision_reference, case: str) -> None:
    _check_against_transformers(llm, vision_reference, CASES[case])


def test_pan_and_scan_with_a_token_budget_smaller_than_the_image(vision_folder: Path, vision_reference) -> None:
    """Four crops of 4 soft tokens plus text take ~40 prompt tokens: with 6 per step the image is chunked
    between crops, never inside one, and the logits stay transformers'."""
    llm = make_llm(vision_folder, max_num_batched_tokens=6)
    prompt = CASES["pan_and_scan"]
    assert len(llm.generate(prompt, GREEDY, use_tqdm=False)[0].prompt_token_ids) > 30
    _check_against_transformers(llm, vision_reference, prompt)
    llm.shutdown()


def test_a_token_budget_below_one_crop_is_refused_at_start(vision_folder: Path) -> None:
    with pytest.raises(ValueError, match="soft tokens of one image crop"):
        make_llm(vision_folder, max_num_batched_tokens=3)


def test_chat_places_images_by_the_template(llm: LLM, vision_reference) -> None:
    image = noise_image(5)
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image", "image": png_bytes(image)}]}]
    output = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    assert output.prompt_token_ids.count(262144) == 4
    assert "<start_of_image>" in output.prompt


def test_a_second_request_with_the_same_image_skips_preprocessing_and_the_encoder(vision_folder: Path) -> None:
    llm = make_llm(vision_folder, enable_prefix_caching=False)
    image = png_bytes(noise_image(6))
    first = llm.generate({"prompt": "A<start_of_image>?", "multi_modal_data": {"image": image}}, GREEDY,
                         use_tqdm=False)[0]
    second = llm.generate({"prompt": "A<start_of_image>?", "multi_modal_data": {"image": image}}, GREEDY,
                          use_tqdm=False)[0]
    metrics = llm.get_metrics()
    assert metrics["mm.processor_cache.hits"] == 1 and metrics["mm.processor_cache.misses"] == 1
    assert metrics["mm.encoder.encoded_items"] == 1 and metrics["mm.encoder_cache.hits"] == 1
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    llm.shutdown()


def test_the_same_text_with_another_image_shares_no_kv_blocks(vision_folder: Path) -> None:
    llm = make_llm(vision_folder, block_size=4)
    text = "Some context that spans a few blocks. <start_of_image> And the question after it?"
    a, b = png_bytes(noise_image(7)), png_bytes(noise_image(8))
    first = llm.generate({"prompt": text, "multi_modal_data": {"image": a}}, CACHED, use_tqdm=False)[0]
    image_start = first.prompt_token_ids.index(255999)
    other = llm.generate({"prompt": text, "multi_modal_data": {"image": b}}, CACHED, use_tqdm=False)[0]
    again = llm.generate({"prompt": text, "multi_modal_data": {"image": a}}, CACHED, use_tqdm=False)[0]
    assert other.num_cached_tokens <= image_start - image_start % 4, "blocks holding the image were shared"
    assert again.num_cached_tokens > first.prompt_token_ids.index(256000), "the same image shares its blocks"
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    llm.shutdown()


@pytest.mark.parametrize(("prompt", "message"), [
    ({"prompt": "<start_of_image>", "multi_modal_data": {"image": b"\x89PNG\r\n\x1a\n broken"}}, "image 0"),
    ({"prompt": "<start_of_image>", "multi_modal_data": {"image": b"%!PS-Adobe-3.0 EPSF-3.0\n"}}, "EPS"),
    ({"prompt": "<start_of_image>", "multi_modal_data": {"image": "https://example.com/cat.png"}}, "fetches nothing"),
    ({"prompt": "no placeholder", "multi_modal_data": {"image": noise_image(9)}}, "placeholders"),
    ({"prompt": "<start_of_image>", "multi_modal_data": {"image": noise_image(9)},
      "mm_processor_kwargs": {"do_pan_and_scan": "yes"}}, "do_pan_and_scan"),
    ({"prompt": "<start_of_image>", "multi_modal_data": {"image": noise_image(9)},
      "mm_processor_kwargs": {"crop": 2}}, "crop"),
])
def test_bad_image_input_fails_alone_with_a_clear_error(llm: LLM, prompt: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        llm.generate(prompt, GREEDY, use_tqdm=False)
    good = llm.generate({"prompt": "<start_of_image>ok", "multi_modal_data": {"image": noise_image(10)}}, GREEDY,
                        use_tqdm=False)
    assert len(good[0].outputs[0].token_ids) == NEW_TOKENS


def test_limits_on_images_are_enforced_up_front(vision_folder: Path) -> None:
    llm = make_llm(vision_folder, limit_mm_per_prompt={"image": 1}, encoder_cache_size=8)
    two = {"prompt": "<start_of_image><start_of_image>", "multi_modal_data": {"image": [noise_image(1)] * 2}}
    with pytest.raises(ValueError, match="limit_mm_per_prompt"):
        llm.generate(two, GREEDY, use_tqdm=False)
    wide = {"prompt": "<start_of_image>", "multi_modal_data": {"image": noise_image(4, 1000, 400)},
            "mm_processor_kwargs": {"do_pan_and_scan": True}}
    with pytest.raises(ValueError, match="encoder_cache_size=8"):
        llm.generate(wide, GREEDY, use_tqdm=False)
    llm.shutdown()


def test_a_text_model_refuses_images(gemma_llm) -> None:
    with pytest.raises(ValueError, match="takes no images"):
        gemma_llm.generate({"prompt": "<start_of_image>", "multi_modal_data": {"image": noise_image(1)}})


def test_processor_options_given_to_llm_apply_to_every_image_unless_a_prompt_overrides(vision_folder: Path) -> None:
    llm = make_llm(vision_folder, mm_processor_kwargs={"do_pan_and_scan": True})
    wide = noise_image(4, 1000, 400)  # three Pan-and-Scan crops
    default = llm.generate({"prompt": "<start_of_image>", "multi_modal_data": {"image": wide}}, CACHED,
                           use_tqdm=False)[0]
    off = llm.generate({"prompt": "<start_of_image>", "multi_modal_data": {"image": wide},
                        "mm_processor_kwargs": {"do_pan_and_scan": False}}, CACHED, use_tqdm=False)[0]
    llm.shutdown()
    assert default.prompt_token_ids.count(262144) == 4 * 4, "the original image and its three crops"
    assert off.prompt_token_ids.count(262144) == 4
