"""Hypothesis fuzzing of the image decoder: random bytes, random data: URIs and damaged images fail with a
ValueError (a 400 over HTTP) or load within the pixel limit, never with another exception; a damaged PNG
never decodes into other pixels than the original's (its chunks' CRCs and zlib's checksum are checked)."""

from __future__ import annotations

import base64
import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pagoda.multimodal.image_io import SUPPORTED_FORMATS, load_image

MAX_PIXELS = 64 * 64
RNG = np.random.default_rng(0)
ORIGINAL = RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8)


def _encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(ORIGINAL).save(buffer, format=fmt)
    return buffer.getvalue()


ENCODED = {fmt: _encoded(fmt) for fmt in SUPPORTED_FORMATS}
fuzz_settings = settings(max_examples=400, deadline=None, database=None, derandomize=True,
                         suppress_health_check=[HealthCheck.too_slow])


def _load(source: bytes | str):
    """The decoded pixels, or None for a ValueError; any other exception fails the test."""
    try:
        loaded = load_image(source, max_pixels=MAX_PIXELS)
    except ValueError:
        return None
    width, height = loaded.size
    assert width * height <= MAX_PIXELS
    return np.asarray(loaded.decode().convert("RGB"))


@fuzz_settings
@given(st.binary(max_size=2048))
def test_random_bytes_are_refused_or_a_small_image(data: bytes) -> None:
    _load(data)


@fuzz_settings
@given(st.sampled_from(["data:", "data:image/png;base64,", "data:image/png,", "data:text/plain;base64,"]),
       st.text(max_size=64) | st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode()))
def test_random_data_uris_are_refused_or_a_small_image(prefix: str, payload: str) -> None:
    _load(prefix + payload)


@st.composite
def damaged(draw: st.DrawFn) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(sorted(ENCODED)))
    data = bytearray(ENCODED[fmt])
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "truncate", "insert"]))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[at:]
            if not data:
                break
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
    return fmt, bytes(data)


@fuzz_settings
@given(damaged())
def test_damaged_images_are_refused_and_a_damaged_png_never_gives_other_pixels(case: tuple[str, bytes]) -> None:
    fmt, data = case
    pixels = _load(data)
    if pixels is not None and fmt == "PNG" and data != ENCODED["PNG"]:
        np.testing.assert_array_equal(pixels, ORIGINAL)
