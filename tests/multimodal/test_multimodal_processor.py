"""MultiModalProcessor: token ids equal to transformers' `Gemma3Processor`, and features consistent with them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from transformers import AutoTokenizer
from transformers.models.gemma3 import Gemma3Processor
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from pagoda.core.multimodal import MultiModalFeature
from pagoda.engine.tokenizer import Tokenizer
from pagoda.multimodal.gemma3_image_processor import Gemma3ImageProcessor
from pagoda.multimodal.processor import MultiModalProcessor

BOI, EOI, SOFT = 255999, 256000, 262144
MODEL_IDENTITY = "gemma3-0123456789abcdef"


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def hf_processor(folder: Path) -> Gemma3Processor:
    tokens_per_image = 4 if "tiny" in folder.name else 256
    return Gemma3Processor(Gemma3ImageProcessorPil.from_pretrained(folder), AutoTokenizer.from_pretrained(folder),
                           image_seq_length=tokens_per_image)


@pytest.fixture(scope="module")
def hf_tiny(tiny_mm_folder: Path) -> Gemma3Processor:
    return hf_processor(tiny_mm_folder)


def make_processor(folder: Path, **kwargs) -> MultiModalProcessor:
    processor = MultiModalProcessor.from_folder(folder, Tokenizer.from_folder(folder), MODEL_IDENTITY, **kwargs)
    assert processor is not None
    return processor


@pytest.fixture(scope="module")
def tiny(tiny_mm_folder: Path) -> MultiModalProcessor:
    return make_processor(tiny_mm_folder)


def assert_features_consistent(token_ids: list[int], features: list[MultiModalFeature], tokens_per_image: int) -> None:
    soft_positions = []
    previous_end = 0
    for feature in features:
        position = feature.position
        assert position.offset >= previous_end
        previous_end = position.end
        assert token_ids[position.offset] == BOI and token_ids[position.end - 1] == EOI
        assert len(position.embed_runs) == feature.num_crops
        for start, end in position.absolute_embed_runs():
            assert end - start == tokens_per_image
            assert token_ids[start - 1] == BOI and token_ids[end] == EOI
            assert token_ids[start:end] == [SOFT] * tokens_per_image
            soft_positions.extend(range(start, end))
        assert feature.num_embeds == feature.num_crops * tokens_per_image
        assert len(feature.identifier) == 64
        assert feature.pixel_values is not None and feature.pixel_values.shape[0] == feature.num_crops
    assert soft_positions == [index for index, token_id in enumerate(token_ids) if token_id == SOFT]


def check_against_hf(processor: MultiModalProcessor, hf: Gemma3Processor, prompt: str, images: list[Image.Image],
                     pan_and_scan: bool = False, add_special_tokens: bool = True) -> list[MultiModalFeature]:
    kwargs = {"do_pan_and_scan": True} if pan_and_scan else None
    token_ids, features = processor.process(prompt, images, kwargs, add_special_tokens=add_special_tokens)
    reference = hf(text=[prompt], images=[images], do_pan_and_scan=pan_and_scan, return_tensors="np",
                   add_special_tokens=add_special_tokens)
    assert token_ids == reference["input_ids"][0].tolist()
    assert [int(t) for t in reference["token_type_ids"][0]] == [int(t == SOFT) for t in token_ids]
    assert_features_consistent(token_ids, features, hf.image_seq_length)
    ours = np.concatenate([np.frombuffer(f.pixel_values.data, np.float32).reshape(f.pixel_values.shape)
                           for f in features])
    assert ours.shape == reference["pixel_values"].shape
    assert np.abs(ours - reference["pixel_values"]).max() == 0
    return features


def test_one_image(tiny: MultiModalProcessor, hf_tiny: Gemma3Processor) -> None:
    features = check_against_hf(tiny, hf_tiny, "<start_of_image>Describe.", [image(64, 48)])
    assert features[0].position.offset == 2  # <bos> "\n\n" <start_of_image>
    assert features[0].position.length == 1 + 4 + 1


def test_several_images_with_newlines_around_them(tiny: MultiModalProcessor, hf_tiny: Gemma3Processor) -> None:
    prompt = "Look:\n<start_of_image>\nand\n\n<start_of_image>\n\n\nthen<start_of_image> compare them.\n"
    features = check_against_hf(tiny, hf_tiny, prompt, [image(64, 48, 1), image(20, 90, 2), image(300, 300, 3)])
    assert len(features) == 3 and len({f.identifier for f in features}) == 3


def test_pan_and_scan_crops(tiny: MultiModalProcessor, hf_tiny: Gemma3Processor) -> None:
    images = [image(1280, 480, 4), image(100, 100, 5), image(480, 1920, 6)]
    features = check_against_hf(tiny, hf_tiny, "A <start_of_image>\nB <start_of_image> C\n<start_of_image>", images,
                                pan_and_scan=True)
    assert [f.num_crops for f in features] == [4, 1, 5]


def test_without_special_tokens_and_text_only(tiny: MultiModalProcessor, hf_tiny: Gemma3Processor) -> None:
    check_against_hf(tiny, hf_tiny, "Describe <start_of_image>", [image(64, 48)], add_special_tokens=False)
    token_ids, features = tiny.process("no images here", None)
    assert features == [] and token_ids == tiny.tokenizer.encode("no images here")


def test_chat_template_places_the_images(tiny: MultiModalProcessor, hf_tiny: Gemma3Processor) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What differs?"}, {"type": "image"},
                                             {"type": "image"}]}]
    prompt = tiny.tokenizer.apply_chat_template(messages)
    assert prompt.count("<start_of_image>") == 2 and prompt.startswith("<bos><start_of_turn>user\nBe brief.")
    assert prompt.endswith("<end_of_turn>\n<start_of_turn>model\n")
    check_against_hf(tiny, hf_tiny, prompt, [image(64, 48, 7), image(1000, 400, 8)], pan_and_scan=True,
                     add_special_tokens=False)


def test_chat_template_renders_as_transformers_does(tiny_mm_folder: Path, tiny: MultiModalProcessor) -> None:
    messages = [{"role": "system", "content": [{"type": "text", "text": "Sys."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is this? "}]},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:..."}},
                                             {"type": "text", "text": "And now?"}]}]
    reference = AutoTokenizer.from_pretrained(tiny_mm_folder).apply_chat_template(messages, tokenize=False,
                                                                                 add_generation_prompt=True)
    assert tiny.tokenizer.apply_chat_template(messages) == reference
    assert reference.count("<start_of_image>") == 2 and "<start_of_turn>model\nA cat.<end_of_turn>" in reference
    with pytest.raises(ValueError, match="unsupported content part type: audio"):
        tiny.tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}])


def test_full_size_896_with_pan_and_scan(full_mm_folder: Path) -> None:
    check_against_hf(make_processor(full_mm_folder), hf_processor(full_mm_folder),
                     "Compare <start_of_image> with\n<start_of_image>.", [image(1280, 480, 9), image(64, 64, 10)],
                     pan_and_scan=True)


def test_sources_of_one_image_agree_on_tokens_and_pixels(tiny: MultiModalProcessor, tmp_path: Path) -> None:
    img = image(64, 48, 11)
    data = png(img)
    (tmp_path / "img.png").write_bytes(data)
    results = [tiny.process("<start_of_image>", [source]) for source in (img, data, tmp_path / "img.png")]
    assert results[0][0] == results[1][0] == results[2][0]
    assert results[0][1][0].pixel_values == results[1][1][0].pixel_values
    # Same file, two sources: one key; a PIL image's key is its framed pixels, not PNG bytes.
    assert results[1][1][0].identifier == results[2][1][0].identifier != results[0][1][0].identifier


def test_rotated_photo_is_processed_upright(tiny: MultiModalProcessor, hf_tiny: Gemma3Processor) -> None:
    photo = image(1280, 480, 13)
    exif = photo.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as phones tag portrait shots
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", exif=exif)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue())))
    assert upright.size == (480, 1280)
    token_ids, features = tiny.process("<start_of_image>", [buffer.getvalue()], {"do_pan_and_scan": True})
    reference = hf_tiny(text=["<start_of_image>"], images=[[upright]], do_pan_and_scan=True, return_tensors="np")
    assert token_ids == reference["input_ids"][0].tolist()
    assert features[0].num_crops == reference["input_ids"][0].tolist().count(BOI) == 4  # 3 crops, stacked vertically
    pixels = np.frombuffer(features[0].pixel_values.data, np.float32).reshape(features[0].pixel_values.shape)
    assert np.abs(pixels - reference["pixel_values"]).max() == 0


def test_processor_cache_skips_preprocessing_for_a_known_image(tiny_mm_folder: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    processor = make_processor(tiny_mm_folder)
    calls = []
    original = Gemma3ImageProcessor.preprocess
    monkeypatch.setattr(Gemma3ImageProcessor, "preprocess",
                        lambda self, img, options: calls.append(img.size) or original(self, img, options))
    data = png(image(640, 480, 12))
    first = processor.process("<start_of_image>", data)
    second = processor.process("again <start_of_image>", [data])
    assert len(calls) == 1 and processor.cache.stats.hits == 1 and processor.cache.stats.misses == 1
    assert first[1][0].identifier == second[1][0].identifier
    assert first[1][0].pixel_values == second[1][0].pixel_values
    with_crops = processor.process("<start_of_image>", [data], {"do_pan_and_scan": True})
    assert len(calls) == 2 and with_crops[1][0].identifier != first[1][0].identifier
    assert with_crops[1][0].num_crops == 3


def test_default_kwargs_apply_and_per_prompt_kwargs_override(tiny_mm_folder: Path) -> None:
    processor = make_processor(tiny_mm_folder, default_kwargs={"do_pan_and_scan": True})
    assert processor.process("<start_of_image>", [image(1280, 480)])[1][0].num_crops == 4
    assert processor.process("<start_of_image>", [image(1280, 480)], {"do_pan_and_scan": False})[1][0].num_crops == 1
    with pytest.raises(ValueError, match="unknown mm_processor_kwargs"):
        make_processor(tiny_mm_folder, default_kwargs={"num_crops": 2})


def test_count_mismatches_and_limits(tiny_mm_folder: Path, tiny: MultiModalProcessor) -> None:
    with pytest.raises(ValueError, match="1 <start_of_image> placeholders but 2 images"):
        tiny.process("<start_of_image>", [image(8, 8), image(9, 9)])
    with pytest.raises(ValueError, match="2 <start_of_image> placeholders but 1 images"):
        tiny.process("<start_of_image><start_of_image>", [image(8, 8)])
    with pytest.raises(ValueError, match="1 <start_of_image> placeholders but 0 images"):
        tiny.process("<start_of_image>", [])
    limited = make_processor(tiny_mm_folder, limit_mm_per_prompt={"image": 1})
    with pytest.raises(ValueError, match="2 images in one prompt exceed limit_mm_per_prompt image=1"):
        limited.process("<start_of_image><start_of_image>", [image(8, 8), image(9, 9)])
    with pytest.raises(ValueError, match="unknown modalities"):
        make_processor(tiny_mm_folder, limit_mm_per_prompt={"video": 1})
    with pytest.raises(ValueError, match="contains <image_soft_token>"):
        tiny.process("<image_soft_token><start_of_image>", [image(8, 8)])


def test_bad_images_name_their_index(tiny: MultiModalProcessor) -> None:
    with pytest.raises(ValueError, match="image 1: .*fetches nothing"):
        tiny.process("<start_of_image><start_of_image>", [image(8, 8), "https://example.com/x.png"])
    truncated = png(image(64, 64))[:100]
    with pytest.raises(ValueError, match="image 0: corrupt or truncated PNG"):
        tiny.process("<start_of_image>", [truncated])


def test_text_only_model_has_no_multimodal_processor(gemma_path: Path) -> None:
    assert MultiModalProcessor.from_folder(gemma_path, Tokenizer.from_folder(gemma_path), MODEL_IDENTITY) is None
