"""Fixtures for the multimodal front-end tests: Gemma 3 vision model folders (config + tokenizer, no weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gemma3_tokenizer import write_gemma3_tokenizer

from pagoda.engine.tokenizer import Tokenizer


def write_gemma3_mm_folder(gemma_path: Path, folder: Path, image_size: int, mm_tokens_per_image: int) -> Path:
    """A Gemma 3 vision folder's config.json, preprocessor_config.json and tokenizer (as the real 4B's, smaller)."""
    write_gemma3_tokenizer(gemma_path, folder)
    config = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
              "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144,
              "mm_tokens_per_image": mm_tokens_per_image,
              "text_config": {"model_type": "gemma3_text", "vocab_size": 262208},
              "vision_config": {"model_type": "siglip_vision_model", "image_size": image_size, "patch_size": 14}}
    (folder / "config.json").write_text(json.dumps(config))
    # Nulls where the real checkpoints have nulls: the processor-level defaults must fill them.
    preprocessor = {"image_processor_type": "Gemma3ImageProcessor", "do_convert_rgb": None, "do_normalize": True,
                    "do_pan_and_scan": None, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                    "image_std": [0.5, 0.5, 0.5], "image_seq_length": mm_tokens_per_image,
                    "pan_and_scan_max_num_crops": None, "pan_and_scan_min_crop_size": None,
                    "pan_and_scan_min_ratio_to_activate": None, "resample": 2, "rescale_factor": 1 / 255,
                    "size": {"height": image_size, "width": image_size}}
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


@pytest.fixture(scope="session")
def tiny_mm_folder(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """56 px images, 4 soft tokens per crop (the tiny test models' shape)."""
    return write_gemma3_mm_folder(gemma_path, tmp_path_factory.mktemp("gemma3-mm-tiny"), 56, 4)


@pytest.fixture(scope="session")
def full_mm_folder(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """896 px images, 256 soft tokens per crop (Gemma 3 4B-27B)."""
    return write_gemma3_mm_folder(gemma_path, tmp_path_factory.mktemp("gemma3-mm-full"), 896, 256)


@pytest.fixture(scope="session")
def mm_tokenizer(tiny_mm_folder: Path) -> Tokenizer:
    return Tokenizer.from_folder(tiny_mm_folder)


@pytest.fixture(scope="session")
def vision_folder(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny Gemma 3 vision model (transformers-written) with the Gemma 3 tokenizer."""
    from tiny_gemma3 import build_tiny_gemma3

    return build_tiny_gemma3(tmp_path_factory.mktemp("gemma3-vision"), tokenizer_source=gemma_path)


@pytest.fixture(scope="session")
def vision_reference(vision_folder: Path):
    from vision_engine_helpers import Reference

    return Reference(vision_folder)
