"""Multimodal (front end): the entry point the input processor calls for a prompt with images.

`MultiModalProcessor.process(prompt_text, images)` loads and checks each
image, keys it by `mm_hash`, takes its pixels from the processor cache or
preprocesses them, expands the prompt's `<start_of_image>` slots, tokenizes
the expanded text and returns the token ids with one `MultiModalFeature` per
image. `from_folder` returns None for a model without a vision tower, so
the caller keeps its text-only path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pagoda.core.multimodal import MultiModalFeature, PixelData
from pagoda.multimodal.gemma3_image_processor import (
    Gemma3ImageProcessor,
    Gemma3ImageProcessorConfig,
    PanAndScanOptions,
    num_crops,
)
from pagoda.multimodal.gemma3_prompt import Gemma3ImageTokens, count_slots, expand_prompt, locate_items
from pagoda.multimodal.hasher import mm_hash
from pagoda.multimodal.image_io import DEFAULT_MAX_PIXELS, ImageSource, LoadedImage, load_image
from pagoda.multimodal.processor_cache import ProcessedImage, ProcessorCache

if TYPE_CHECKING:
    from pagoda.engine.tokenizer import Tokenizer

# 1 GiB of pixels: ~110 full-size Gemma 3 crops (896 x 896 x 3 float32 = 9.6 MB each); vLLM's default is 4 GiB.
DEFAULT_PROCESSOR_CACHE_BYTES = 1 << 30
_MODALITIES = ("image",)


class MultiModalProcessor:
    """Prompt text + images -> token ids + features, for Gemma 3 (`model_type: gemma3` with a vision_config)."""

    def __init__(self, tokenizer: Tokenizer, image_tokens: Gemma3ImageTokens, image_processor: Gemma3ImageProcessor,
                 model_identity: str, default_options: PanAndScanOptions, max_images_per_prompt: int | None,
                 cache: ProcessorCache, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.tokenizer = tokenizer
        self.image_tokens = image_tokens
        self.image_processor = image_processor
        self.model_identity = model_identity
        self.default_options = default_options
        self.max_images_per_prompt = max_images_per_prompt
        self.cache = cache
        self.max_pixels = max_pixels

    @classmethod
    def from_folder(cls, folder: str | Path, tokenizer: Tokenizer, model_identity: str,
                    default_kwargs: Mapping[str, Any] | None = None,
                    limit_mm_per_prompt: Mapping[str, int] | None = None,
                    cache_bytes: int = DEFAULT_PROCESSOR_CACHE_BYTES,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> MultiModalProcessor | None:
        """The processor for the model in `folder`, or None when it takes no images."""
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        if not isinstance(config, dict) or not is_multimodal_config(config):
            return None
        vision = config["vision_config"]
        image_size = vision.get("image_size", 896)
        processor_config = Gemma3ImageProcessorConfig.from_folder(folder, default_image_size=image_size)
        if processor_config.image_size != image_size:
            raise ValueError(f"{folder}: preprocessor_config.json resizes to {processor_config.image_size} px but "
                             f"the vision tower takes {image_size} px (vision_config.image_size)")
        return cls(tokenizer, Gemma3ImageTokens.from_config(config, tokenizer), Gemma3ImageProcessor(processor_config),
                   model_identity, PanAndScanOptions().updated(default_kwargs),
                   _image_limit(limit_mm_per_prompt), ProcessorCache(cache_bytes), max_pixels)

    def process(self, prompt_text: str, images: ImageSource | Sequence[ImageSource] | None,
                mm_processor_kwargs: Mapping[str, Any] | None = None,
                add_special_tokens: bool = True) -> tuple[list[int], list[MultiModalFeature]]:
        """Token ids of the prompt with its images expanded, and one feature per image in prompt order."""
        if not isinstance(prompt_text, str):
            raise ValueError(f"the prompt must be text, got {type(prompt_text).__name__}")
        sources = _as_list(images)
        num_slots = count_slots(prompt_text, self.image_tokens)
        if len(sources) != num_slots:
            raise ValueError(f"the prompt has {num_slots} {self.image_tokens.boi_token} placeholders but "
                             f"{len(sources)} images were given; each image needs one placeholder")
        if self.max_images_per_prompt is not None and len(sources) > self.max_images_per_prompt:
            raise ValueError(f"{len(sources)} images in one prompt exceed limit_mm_per_prompt "
                             f"image={self.max_images_per_prompt}")
        options = self.default_options.updated(mm_processor_kwargs)
        hash_options = {**self.image_processor.config.tensor_options(), **options.tensor_options()}
        loaded = [self._load(source, index) for index, source in enumerate(sources)]
        # The crop counts come from the headers: the prompt is expanded and checked before any pixel is decoded.
        crops = [num_crops(*image.size, options) for image in loaded]
        expanded = expand_prompt(prompt_text, crops, self.image_tokens)
        token_ids = self.tokenizer.encode(expanded, add_special_tokens=add_special_tokens)
        ranges = locate_items(token_ids, crops, self.image_tokens)
        features = []
        for index, (image, position) in enumerate(zip(loaded, ranges)):
            identifier = mm_hash(self.model_identity, image.content, hash_options)
            processed = self._pixels(identifier, image, options, index)
            assert processed.num_crops == crops[index], "crops counted from the size differ from the crops cut"
            features.append(MultiModalFeature(identifier=identifier, position=position,
                                              num_crops=1 + processed.num_crops, pixel_values=processed.pixel_values))
        return token_ids, features

    def _load(self, source: ImageSource, index: int) -> LoadedImage:
        try:
            return load_image(source, max_pixels=self.max_pixels, decode=False)
        except ValueError as err:
            raise ValueError(f"image {index}: {err}") from None

    def _pixels(self, identifier: str, loaded: LoadedImage, options: PanAndScanOptions, index: int) -> ProcessedImage:
        cached = self.cache.get(identifier)
        if cached is not None:
            return cached
        try:
            image = loaded.decode()
        except ValueError as err:
            raise ValueError(f"image {index}: {err}") from None
        pixels = self.image_processor.preprocess(image, options)
        processed = ProcessedImage(_pixel_data(pixels), pixels.shape[0] - 1)
        self.cache.put(identifier, processed)
        return processed


def is_multimodal_config(config: Mapping[str, Any]) -> bool:
    """True for a Gemma 3 config with a vision tower (model_type gemma3; gemma3_text is text-only)."""
    return config.get("model_type") == "gemma3" and isinstance(config.get("vision_config"), dict)


def _pixel_data(pixels: np.ndarray) -> PixelData:
    contiguous = np.ascontiguousarray(pixels, dtype=np.float32)
    return PixelData(shape=tuple(contiguous.shape), dtype=contiguous.dtype.name, data=contiguous.tobytes())


def _as_list(images: ImageSource | Sequence[ImageSource] | None) -> list[ImageSource]:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _image_limit(limit_mm_per_prompt: Mapping[str, int] | None) -> int | None:
    if limit_mm_per_prompt is None:
        return None
    if not isinstance(limit_mm_per_prompt, Mapping):
        raise ValueError(f"limit_mm_per_prompt must map a modality to a count, e.g. {{'image': 2}}, "
                         f"got {limit_mm_per_prompt!r}")
    unknown = sorted(set(limit_mm_per_prompt) - set(_MODALITIES))
    if unknown:
        raise ValueError(f"limit_mm_per_prompt: unknown modalities {unknown}; this model takes {list(_MODALITIES)}")
    limit = limit_mm_per_prompt.get("image")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit_mm_per_prompt image must be an integer >= 0, got {limit!r}")
    return limit
