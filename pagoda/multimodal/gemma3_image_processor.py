"""Multimodal (front end): Gemma 3's image preprocessing on PIL and numpy, equal bit for bit to transformers' PIL one.

For each image: convert to RGB (transparency composited on white), cut the
Pan-and-Scan crops from the original-resolution pixels when asked, resize
the original and each crop with PIL (BILINEAR by default, which antialiases
when it shrinks) to the model's square size, rescale in float64 and cast to
float32, then normalize with the mean and std. The result is one float32
array `[1 + num_crops, 3, size, size]`: the whole image first, then the crops
in row-major order.

The crop count depends on the image's size only, so `num_crops` answers it
from the header, before any pixel is decoded (the prompt's token count needs
it; the pixels may come from the processor cache).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
# Gemma 3's values wherever preprocessor_config.json says null or is absent.
_DEFAULT_IMAGE_SIZE = 896
_DEFAULT_MEAN = (0.5, 0.5, 0.5)
_DEFAULT_STD = (0.5, 0.5, 0.5)
_DEFAULT_RESCALE_FACTOR = 1 / 255
_DEFAULT_RESAMPLE = int(Image.Resampling.BILINEAR)


@dataclass(frozen=True, slots=True)
class PanAndScanOptions:
    """Gemma 3's processor options, as vLLM's users pass them in `mm_processor_kwargs` (the processor's defaults)."""

    do_pan_and_scan: bool = False
    pan_and_scan_min_crop_size: int = 256
    pan_and_scan_max_num_crops: int = 4
    pan_and_scan_min_ratio_to_activate: float = 1.2

    def __post_init__(self) -> None:
        if not isinstance(self.do_pan_and_scan, bool):
            raise ValueError(f"do_pan_and_scan must be true or false, got {self.do_pan_and_scan!r}")
        _check_int("pan_and_scan_min_crop_size", self.pan_and_scan_min_crop_size, minimum=1)
        _check_int("pan_and_scan_max_num_crops", self.pan_and_scan_max_num_crops, minimum=1)
        ratio = self.pan_and_scan_min_ratio_to_activate
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
            raise ValueError(f"pan_and_scan_min_ratio_to_activate must be a positive number, got {ratio!r}")

    def updated(self, kwargs: Mapping[str, Any] | None) -> PanAndScanOptions:
        """These options with `kwargs` applied; ValueError naming an unknown key or a bad value."""
        if not kwargs:
            return self
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"mm_processor_kwargs must be a mapping, got {type(kwargs).__name__}")
        unknown = sorted(str(key) for key in kwargs if key not in self.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown mm_processor_kwargs {unknown}; Gemma 3 takes {sorted(self.__dataclass_fields__)}")
        return replace(self, **kwargs)

    def tensor_options(self) -> dict[str, bool | int | float]:
        """The options that change an image's tensors: the crop settings matter only when Pan-and-Scan is on."""
        if not self.do_pan_and_scan:
            return {"do_pan_and_scan": False}
        return {"do_pan_and_scan": True,
                "pan_and_scan_min_crop_size": self.pan_and_scan_min_crop_size,
                "pan_and_scan_max_num_crops": self.pan_and_scan_max_num_crops,
                "pan_and_scan_min_ratio_to_activate": float(self.pan_and_scan_min_ratio_to_activate)}


@dataclass(frozen=True, slots=True)
class Gemma3ImageProcessorConfig:
    """The image processor's settings, from the model folder's preprocessor_config.json."""

    image_size: int = _DEFAULT_IMAGE_SIZE
    image_mean: tuple[float, float, float] = _DEFAULT_MEAN
    image_std: tuple[float, float, float] = _DEFAULT_STD
    rescale_factor: float = _DEFAULT_RESCALE_FACTOR
    resample: int = _DEFAULT_RESAMPLE

    def __post_init__(self) -> None:
        _check_int("size", self.image_size, minimum=1)
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) == 0:
            raise ValueError(f"image_mean and image_std need 3 values (std non-zero), got "
                             f"{self.image_mean} and {self.image_std}")
        if self.resample not in {int(mode) for mode in Image.Resampling}:
            raise ValueError(f"resample must be a PIL resampling filter (0-5), got {self.resample!r}")

    @classmethod
    def from_folder(cls, folder: Path, default_image_size: int = _DEFAULT_IMAGE_SIZE) -> Gemma3ImageProcessorConfig:
        """Read `folder`/preprocessor_config.json; absent or null values take Gemma 3's defaults."""
        path = folder / PREPROCESSOR_CONFIG_FILE
        raw: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path} must hold a JSON object")
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if raw.get(flag) is False:
                raise ValueError(f"{path}: {flag}=false is not Gemma 3's preprocessing; Pagoda supports only true")
        return cls(image_size=_square_size(raw.get("size"), default_image_size, path),
                   image_mean=_per_channel("image_mean", _or(raw.get("image_mean"), _DEFAULT_MEAN), path),
                   image_std=_per_channel("image_std", _or(raw.get("image_std"), _DEFAULT_STD), path),
                   rescale_factor=float(_or(raw.get("rescale_factor"), _DEFAULT_RESCALE_FACTOR)),
                   resample=int(_or(raw.get("resample"), _DEFAULT_RESAMPLE)))

    def tensor_options(self) -> dict[str, bool | int | float]:
        """The settings that change the tensors, for `mm_hash` (preprocessor_config.json is not in the model's
        identity)."""
        options: dict[str, bool | int | float] = {"size": self.image_size, "rescale_factor": self.rescale_factor,
                                                  "resample": self.resample}
        for channel in range(3):
            options[f"image_mean_{channel}"] = float(self.image_mean[channel])
            options[f"image_std_{channel}"] = float(self.image_std[channel])
        return options


class Gemma3ImageProcessor:
    """Pixels for Gemma 3's vision tower: float32 `[1 + num_crops, 3, size, size]` per image."""

    def __init__(self, config: Gemma3ImageProcessorConfig) -> None:
        self.config = config
        self._mean = np.asarray(config.image_mean, dtype=np.float32)
        self._std = np.asarray(config.image_std, dtype=np.float32)

    def preprocess(self, image: Image.Image, options: PanAndScanOptions) -> np.ndarray:
        rgb = to_rgb(image)
        pieces = [rgb] + [Image.fromarray(crop) for crop in pan_and_scan_crops(np.asarray(rgb), options)]
        return np.stack([self._transform(piece) for piece in pieces])

    def _transform(self, image: Image.Image) -> np.ndarray:
        size = self.config.image_size
        resized = np.asarray(image.resize((size, size), resample=Image.Resampling(self.config.resample)))
        # float64 first, then float32, as transformers rescales; the normalization then runs in float32.
        scaled = (resized.astype(np.float64) * self.config.rescale_factor).astype(np.float32)
        normalized = (scaled - self._mean) / self._std
        return np.ascontiguousarray(normalized.transpose(2, 0, 1))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white (not dropped), as transformers converts."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def num_crops(width: int, height: int, options: PanAndScanOptions) -> int:
    """How many Pan-and-Scan crops an image of this size gets (0 when Pan-and-Scan is off or does not apply)."""
    grid = _crop_grid(width, height, options)
    return 0 if grid is None else grid[0] * grid[1]


def pan_and_scan_crops(pixels: np.ndarray, options: PanAndScanOptions) -> list[np.ndarray]:
    """The crops of an HWC array, row-major; a crop at the right or bottom edge may be narrower than the others."""
    height, width = pixels.shape[:2]
    grid = _crop_grid(width, height, options)
    if grid is None:
        return []
    rows, cols = grid
    crop_h, crop_w = math.ceil(height / rows), math.ceil(width / cols)
    return [np.ascontiguousarray(pixels[row * crop_h:(row + 1) * crop_h, col * crop_w:(col + 1) * crop_w])
            for row in range(rows) for col in range(cols)]


def _crop_grid(width: int, height: int, options: PanAndScanOptions) -> tuple[int, int] | None:
    """(rows, cols) of crops, or None for no crops."""
    if not options.do_pan_and_scan:
        return None
    long_side, short_side = max(width, height), min(width, height)
    if long_side / short_side < options.pan_and_scan_min_ratio_to_activate:
        return None
    # As many crops as the aspect ratio rounds (half up) to, no more than min_crop_size allows, in [2, max].
    count = min(math.floor(long_side / short_side + 0.5), math.floor(long_side / options.pan_and_scan_min_crop_size))
    count = min(options.pan_and_scan_max_num_crops, max(2, count))
    rows, cols = (1, count) if width >= height else (count, 1)
    if min(math.ceil(width / cols), math.ceil(height / rows)) < options.pan_and_scan_min_crop_size:
        return None
    return rows, cols


def _square_size(size: Any, default: int, path: Path) -> int:
    if size is None:
        return default
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    if isinstance(size, dict) and size.get("height") is not None and size.get("height") == size.get("width"):
        return int(size["height"])
    raise ValueError(f"{path}: size must be a square {{'height': N, 'width': N}}, got {size!r}")


def _per_channel(name: str, value: Any, path: Path) -> tuple[float, float, float]:
    """A mean or std: one number for all three channels, or three numbers."""
    values = [value] * 3 if isinstance(value, (int, float)) else value
    if (not isinstance(values, list | tuple) or len(values) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise ValueError(f"{path}: {name} must be a number or 3 numbers, got {value!r}")
    return (float(values[0]), float(values[1]), float(values[2]))


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
