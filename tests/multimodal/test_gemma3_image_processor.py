"""Gemma 3 preprocessing: bit-identical to transformers' `Gemma3ImageProcessorPil` for sizes, aspect ratios, modes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from pagoda.multimodal.gemma3_image_processor import (
    Gemma3ImageProcessor,
    Gemma3ImageProcessorConfig,
    PanAndScanOptions,
    num_crops,
)

# (width, height): tiny, huge, portrait, landscape, square, and the research notes' crop-count table.
SIZES = [(1, 1), (7, 3), (300, 200), (896, 896), (640, 480), (1200, 1000), (1000, 400), (1920, 480),
         (480, 1920), (2000, 300), (4000, 800), (50, 1000), (1280, 480), (2500, 2600)]
MODES = ["RGB", "RGBA", "LA", "L", "P", "P-transparent", "CMYK", "I;16", "1"]
PROCESSOR_DEFAULTS = {"do_convert_rgb": True, "pan_and_scan_min_crop_size": 256, "pan_and_scan_max_num_crops": 4,
                      "pan_and_scan_min_ratio_to_activate": 1.2}


def make_image(width: int, height: int, mode: str, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 7919 + height)
    # Smooth structure plus noise: resizing must get both right.
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), (x + y) % 256], axis=-1)
    rgb = ((base + rng.integers(0, 64, (height, width, 3))) % 256).astype(np.uint8)
    image = Image.fromarray(rgb)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (height, width), dtype=np.uint8)]))
    if mode == "LA":
        return Image.fromarray(np.dstack([rgb[..., 0], rgb[..., 1]]), mode="LA")
    if mode == "I;16":
        return Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    if mode == "P-transparent":
        palette = image.quantize(16)
        palette.info["transparency"] = 3
        return palette
    return image.convert(mode)


def hf_processor(image_size: int) -> Gemma3ImageProcessorPil:
    return Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3, rescale_factor=1 / 255, resample=2)


def assert_identical(image: Image.Image, image_size: int, pan_and_scan: bool) -> None:
    reference = hf_processor(image_size)(image, do_pan_and_scan=pan_and_scan, return_tensors="np",
                                         **PROCESSOR_DEFAULTS)
    options = PanAndScanOptions(do_pan_and_scan=pan_and_scan)
    ours = Gemma3ImageProcessor(Gemma3ImageProcessorConfig(image_size=image_size)).preprocess(image, options)
    expected = reference["pixel_values"]
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    assert ours.shape == (1 + reference["num_crops"][0], 3, image_size, image_size)
    assert np.abs(ours - expected).max() == 0
    assert num_crops(*image.size, options) == reference["num_crops"][0]


@pytest.mark.parametrize("pan_and_scan", [False, True])
@pytest.mark.parametrize("width, height", SIZES)
def test_sizes_bit_identical_at_56(width: int, height: int, pan_and_scan: bool) -> None:
    assert_identical(make_image(width, height, "RGB"), 56, pan_and_scan)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("width, height", [(640, 480), (300, 1000), (33, 17)])
def test_colour_modes_bit_identical_with_pan_and_scan(mode: str, width: int, height: int) -> None:
    image = make_image(width, height, mode)
    assert image.mode == mode.split("-")[0]
    assert_identical(image, 56, pan_and_scan=True)


@pytest.mark.parametrize("pan_and_scan", [False, True])
@pytest.mark.parametrize("width, height", [(640, 480), (1920, 480), (480, 1920), (896, 896), (300, 200), (2000, 300)])
def test_sizes_bit_identical_at_896(width: int, height: int, pan_and_scan: bool) -> None:
    assert_identical(make_image(width, height, "RGB"), 896, pan_and_scan)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16", "1"])
def test_colour_modes_bit_identical_at_896(mode: str) -> None:
    assert_identical(make_image(1000, 400, mode), 896, pan_and_scan=True)


@pytest.mark.parametrize("width, height, expected", [
    (640, 480, 2), (1200, 1000, 2), (1000, 400, 3), (1920, 480, 4), (480, 1920, 4), (2000, 300, 4),
    (4000, 800, 4), (896, 896, 0), (300, 200, 0), (50, 1000, 0)])
def test_crop_counts_match_the_research_table_and_transformers(width: int, height: int, expected: int) -> None:
    on = PanAndScanOptions(do_pan_and_scan=True)
    assert num_crops(width, height, on) == expected
    assert num_crops(width, height, PanAndScanOptions()) == 0
    image = Image.new("RGB", (width, height))
    assert hf_processor(56)(image, do_pan_and_scan=True, **PROCESSOR_DEFAULTS)["num_crops"][0] == expected


@pytest.mark.parametrize("kwargs", [{"pan_and_scan_min_crop_size": 100}, {"pan_and_scan_max_num_crops": 2},
                                    {"pan_and_scan_min_ratio_to_activate": 3.0}, {"pan_and_scan_max_num_crops": 8,
                                                                                   "pan_and_scan_min_crop_size": 64}])
def test_non_default_pan_and_scan_settings_match(kwargs: dict) -> None:
    image = make_image(2400, 500, "RGB")
    hf_kwargs = {**PROCESSOR_DEFAULTS, **kwargs}
    reference = hf_processor(56)(image, do_pan_and_scan=True, return_tensors="np", **hf_kwargs)
    options = PanAndScanOptions().updated({"do_pan_and_scan": True, **kwargs})
    ours = Gemma3ImageProcessor(Gemma3ImageProcessorConfig(image_size=56)).preprocess(image, options)
    assert ours.shape == reference["pixel_values"].shape
    assert np.abs(ours - reference["pixel_values"]).max() == 0
    assert num_crops(2400, 500, options) == reference["num_crops"][0]


def test_options_refuse_unknown_keys_and_bad_values() -> None:
    options = PanAndScanOptions()
    with pytest.raises(ValueError, match="unknown mm_processor_kwargs.*'do_pan_scan'"):
        options.updated({"do_pan_scan": True})
    with pytest.raises(ValueError, match="do_pan_and_scan must be true or false"):
        options.updated({"do_pan_and_scan": "yes"})
    with pytest.raises(ValueError, match="pan_and_scan_min_crop_size"):
        options.updated({"pan_and_scan_min_crop_size": 0})
    with pytest.raises(ValueError, match="pan_and_scan_max_num_crops"):
        options.updated({"pan_and_scan_max_num_crops": 2.5})
    with pytest.raises(ValueError, match="pan_and_scan_min_ratio_to_activate"):
        options.updated({"pan_and_scan_min_ratio_to_activate": float("nan")})
    assert options.updated(None) is options
    assert options.updated({"do_pan_and_scan": True}).do_pan_and_scan


def test_tensor_options_ignore_crop_settings_while_pan_and_scan_is_off() -> None:
    off = PanAndScanOptions()
    assert off.tensor_options() == off.updated({"pan_and_scan_min_crop_size": 64}).tensor_options()
    on = off.updated({"do_pan_and_scan": True})
    assert on.tensor_options() != on.updated({"pan_and_scan_min_crop_size": 64}).tensor_options()


def test_imagenet_style_mean_and_std_match() -> None:
    # Means that are not exact in float32 (0.485 ...): the normalization must round as transformers' does.
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    image = make_image(300, 200, "RGB")
    reference = Gemma3ImageProcessorPil(size={"height": 56, "width": 56}, image_mean=list(mean), image_std=list(std),
                                        rescale_factor=1 / 255, resample=2)(image, return_tensors="np",
                                                                            do_pan_and_scan=False, **PROCESSOR_DEFAULTS)
    config = Gemma3ImageProcessorConfig(image_size=56, image_mean=mean, image_std=std)
    ours = Gemma3ImageProcessor(config).preprocess(image, PanAndScanOptions())
    assert np.abs(ours - reference["pixel_values"]).max() == 0


def test_config_from_folder_fills_nulls_and_rejects_odd_settings(tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 56, "width": 56}, "image_mean": None, "image_std": None, "rescale_factor": None,
         "resample": None, "do_pan_and_scan": None}))
    config = Gemma3ImageProcessorConfig.from_folder(tmp_path)
    assert config == Gemma3ImageProcessorConfig(image_size=56)
    (tmp_path / "preprocessor_config.json").unlink()
    assert Gemma3ImageProcessorConfig.from_folder(tmp_path, default_image_size=112).image_size == 112
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 56, "width": 64}}))
    with pytest.raises(ValueError, match="size must be a square"):
        Gemma3ImageProcessorConfig.from_folder(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": 0.25, "image_std": [1, 2, 4]}))
    config = Gemma3ImageProcessorConfig.from_folder(tmp_path)
    assert config.image_mean == (0.25, 0.25, 0.25) and config.image_std == (1.0, 2.0, 4.0)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5]}))
    with pytest.raises(ValueError, match="image_mean must be a number or 3 numbers"):
        Gemma3ImageProcessorConfig.from_folder(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False}))
    with pytest.raises(ValueError, match="do_normalize=false"):
        Gemma3ImageProcessorConfig.from_folder(tmp_path)
