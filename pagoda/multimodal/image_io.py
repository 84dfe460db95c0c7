"""Multimodal (front end, beside the engine layer): turn what a user sends as an image into a checked PIL image.

Sources: a `PIL.Image.Image`, a file path (str or Path), raw `bytes`, or a
`data:` URI with base64 content. Any other URL (http, https, file:, ftp, ...)
is refused: this server fetches nothing, so images travel inline.

Only PNG, JPEG, WEBP, GIF and BMP are decoded (PIL's other plugins, EPS
among them, are never tried on user bytes). The size is read from the header
and checked against an explicit pixel limit before any pixel is decoded, so
a decompression bomb costs nothing; PIL's own DecompressionBombWarning never
reaches the user. Corrupt or truncated data is a ValueError, found when the
pixels are decoded.

Images decoded here from a file, bytes or a data URI are turned upright by
their EXIF Orientation tag (phone photos set it; viewers apply it, so the
model sees what the user saw), as transformers' own `load_image` does. A
caller's PIL image is taken as it is, as transformers' processor takes it.

`LoadedImage.content` is what identifies the image for `mm_hash`: the file's
bytes as sent, or, for a caller's PIL image, a framed encoding of its mode,
size, transparency, palette and raw pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

SUPPORTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# Default upper bound on width * height, well below PIL's own hard limit (2 * 89.5 M pixels).
DEFAULT_MAX_PIXELS = 64_000_000

ImageSource = Image.Image | str | Path | bytes
# A URL scheme of two or more characters: "http:", "file:", "s3:" ... (not "C:" of a Windows path).
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:")
_DATA_URI = re.compile(r"^data:(?P<media_type>[^;,]*)(?P<params>(;[^;,]*)*),(?P<payload>.*)$", re.DOTALL)
# Bytes read to name an unsupported format by PIL's header checks.
_SNIFF_BYTES = 64
_EXIF_ORIENTATION = 0x0112
# Orientations that turn the image by 90 degrees, so the upright width and height swap.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


@dataclass(frozen=True, slots=True)
class LoadedImage:
    """A header-checked image and the bytes that identify its content."""

    # As stored (opened, decoded once `decode` ran); `decode()` returns it upright.
    image: Image.Image
    content: bytes
    # The EXIF Orientation applied on decoding (1: as stored).
    orientation: int = 1

    @property
    def size(self) -> tuple[int, int]:
        """The upright (width, height), known from the header before decoding."""
        width, height = self.image.size
        return (height, width) if self.orientation in _SWAPPING_ORIENTATIONS else (width, height)

    def decode(self) -> Image.Image:
        """The upright image with its pixels decoded; ValueError for corrupt or truncated data."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                self.image.load()
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:
            kind = self.image.format or "image"
            raise ValueError(f"corrupt or truncated {kind} data: {err}") from None
        return self.image if self.orientation == 1 else ImageOps.exif_transpose(self.image)


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, decode: bool = True) -> LoadedImage:
    """Open `source` and check its format and size; decode its pixels too unless `decode` is False."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if isinstance(source, Image.Image):
        loaded = LoadedImage(source, _pil_content(source, max_pixels))
    else:
        data = _read_source(source)
        image = _open_bytes(data, max_pixels)
        loaded = LoadedImage(image, data, _orientation(image))
    if decode:
        loaded.decode()
    return loaded


def _read_source(source: str | Path | bytes) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, str):
        if source[:5].lower() == "data:":
            return _decode_data_uri(source)
        if _URL_SCHEME.match(source):
            scheme = source.split(":", 1)[0]
            raise ValueError(f"image URLs with scheme {scheme!r} are not fetched: this server fetches nothing; "
                             "send the image inline as a data: URI (data:image/png;base64,...)")
        source = Path(source)
    if isinstance(source, Path):
        if not source.is_file():
            raise ValueError(f"image file {str(source)!r} does not exist")
        return source.read_bytes()
    raise ValueError(f"an image must be a PIL image, a file path, bytes or a data: URI, got {type(source).__name__}")


def _decode_data_uri(uri: str) -> bytes:
    match = _DATA_URI.match(uri)
    if match is None:
        raise ValueError("malformed data: URI (expected data:image/<type>;base64,<data>)")
    media_type = match["media_type"].strip().lower()
    if media_type and not media_type.startswith("image/"):
        raise ValueError(f"data: URI has media type {media_type!r}, not an image")
    if "base64" not in (param.strip().lower() for param in match["params"].split(";")):
        raise ValueError("data: URI must be base64-encoded (data:image/<type>;base64,<data>)")
    try:
        data = base64.b64decode("".join(match["payload"].split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("malformed data: URI: its payload is not valid base64") from None
    if not data:
        raise ValueError("data: URI carries no image bytes")
    return data


def _open_bytes(data: bytes, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as err:
        raise ValueError(f"image is over the pixel limit of {max_pixels} pixels ({err})") from None
    except Image.UnidentifiedImageError:
        raise ValueError(_unsupported_message(data)) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:
        raise ValueError(f"corrupt image header: {err}") from None
    _check_pixels(image.size, max_pixels)
    if image.format == "PNG":
        _check_png_chunks(data)
    return image


def _check_png_chunks(data: bytes) -> None:
    """Every chunk's CRC: PIL's decoder skips them, and a damaged PNG would decode into other pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.open(io.BytesIO(data), formats=("PNG",)).verify()
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as err:
        raise ValueError(f"corrupt or truncated PNG data: {err}") from None


def _orientation(image: Image.Image) -> int:
    """The EXIF Orientation the header states (1 when absent, unreadable or out of range)."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, KeyError, TypeError):
        return 1  # broken EXIF metadata does not make the pixels unusable
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def _unsupported_message(data: bytes) -> str:
    supported = ", ".join(SUPPORTED_FORMATS)
    prefix = data[:_SNIFF_BYTES]
    Image.init()
    # PIL's `accept` functions compare magic bytes only; no plugin parses the data here.
    if not data:
        return f"the image is empty (0 bytes; supported formats: {supported})"
    for name, (_, accept) in Image.OPEN.items():
        if name not in SUPPORTED_FORMATS and accept is not None and _accepts(accept, prefix):
            return f"unsupported image format {name} (supported: {supported})"
    return f"not an image in a supported format (supported: {supported})"


def _accepts(accept: Callable[[bytes], object], prefix: bytes) -> bool:
    try:
        return bool(accept(prefix))
    except (struct.error, IndexError, ValueError):  # some plugins' checks read past a short prefix
        return False


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ValueError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} pixels")


def _pil_content(image: Image.Image, max_pixels: int) -> bytes:
    """Mode, size, transparency, palette and pixels, each length-prefixed: equal only for equal images."""
    _check_pixels(image.size, max_pixels)
    try:
        pixels = image.tobytes()
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ValueError(f"the PIL image's pixels cannot be read: {err}") from None
    palette = image.getpalette(rawmode="RGBA") if image.mode in ("P", "PA") else None
    # Transparency changes the RGB conversion (it is composited on white), so it is part of the content.
    transparency = image.info.get("transparency")
    parts = [b"pil-image", image.mode.encode(), struct.pack("<QQ", *image.size),
             repr(transparency).encode(), bytes(palette or b""), pixels]
    return b"".join(struct.pack("<Q", len(part)) + part for part in parts)
