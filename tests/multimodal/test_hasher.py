"""mm_hash: the full blake3 of (model identity, tensor-changing options, content); equal inputs only."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from pagoda.multimodal.gemma3_image_processor import PanAndScanOptions
from pagoda.multimodal.hasher import mm_hash
from pagoda.multimodal.image_io import load_image

OPTIONS = {"do_pan_and_scan": False, "size": 896}


def test_full_hex_digest() -> None:
    digest = mm_hash("gemma3-abc", b"image bytes", OPTIONS)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest == mm_hash("gemma3-abc", b"image bytes", dict(OPTIONS))


def test_every_input_changes_the_hash() -> None:
    base = mm_hash("gemma3-abc", b"image bytes", OPTIONS)
    variants = [
        mm_hash("gemma3-abd", b"image bytes", OPTIONS),
        mm_hash("gemma3-abc", b"image bytez", OPTIONS),
        mm_hash("gemma3-abc", b"image bytes", {**OPTIONS, "do_pan_and_scan": True}),
        mm_hash("gemma3-abc", b"image bytes", {**OPTIONS, "size": 56}),
        mm_hash("gemma3-abc", b"image bytes", {**OPTIONS, "size": 896.0}),  # types are part of the key
        mm_hash("gemma3-abc", b"image bytes", {"do_pan_and_scan": False}),
        mm_hash("gemma3-abc", b"image bytes", {}),
    ]
    assert len({base, *variants}) == 1 + len(variants)


def test_option_order_does_not_matter() -> None:
    forward = {"a": 1, "b": True, "c": 1.5}
    assert mm_hash("m", b"x", forward) == mm_hash("m", b"x", dict(reversed(list(forward.items()))))


def test_framing_keeps_field_boundaries() -> None:
    # Moving bytes between the model identity, an option and the content must never give the same key.
    assert mm_hash("ab", b"c", {}) != mm_hash("a", b"bc", {})
    assert mm_hash("m", b"x", {"ab": "c"}) != mm_hash("m", b"x", {"a": "bc"})
    assert mm_hash("m", b"", {"k": "v"}) != mm_hash("m", b"k", {})


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="model's identity"):
        mm_hash("", b"x", {})
    with pytest.raises(ValueError, match="'crops' has a value of type list"):
        mm_hash("m", b"x", {"crops": [1, 2]})  # type: ignore[dict-item]


def test_pil_image_and_its_png_are_different_keys_each_stable() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    options = PanAndScanOptions().tensor_options()
    pil_keys = {mm_hash("m", load_image(Image.fromarray(pixels)).content, options) for _ in range(3)}
    png_keys = {mm_hash("m", load_image(buffer.getvalue()).content, options) for _ in range(3)}
    assert len(pil_keys) == 1 and len(png_keys) == 1 and pil_keys != png_keys
