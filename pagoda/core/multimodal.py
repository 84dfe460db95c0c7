"""Core layer: what a request carries about its images, from the front end through the scheduler to the worker.

An image item (one `<start_of_image>` slot of a prompt, with its Pan-and-Scan
crops) replaces a run of prompt tokens: `PlaceholderRange` says where that run
starts and how long it is, and `embed_runs` which positions inside it take
encoder output rows (the soft tokens, one run per crop; the break tokens
around them stay ordinary text). Each run is one block of bidirectional
attention in the language model, so the scheduler never splits a run across
steps.

`MultiModalFeature.identifier` is the item's `mm_hash`: the full hex blake3
of the model's identity, the image's bytes and the processor options that
change its tensors. Every cache keys the item by it — the processor cache
(pixels), the encoder cache (encoder output), the KV prefix cache (block
extra keys) and the encoder-cache connector (persistent encoder output).

`pixel_values` is None when the engine side's mirrored processor cache holds
the pixels already; the engine fills it in before the request is scheduled.
"""

from __future__ import annotations

import msgspec


class PixelData(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A dense array as raw bytes (C order), so it crosses the socket without pickle or torch."""

    shape: tuple[int, ...]
    dtype: str  # a numpy dtype name, e.g. "float32"
    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data)


class PlaceholderRange(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Prompt positions [offset, offset + length) replaced by one item; embed runs are relative to offset."""

    offset: int
    length: int
    # [start, end) runs of the positions that take encoder rows, in order; row i of the encoder output goes
    # to the i-th such position.
    embed_runs: tuple[tuple[int, int], ...]

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def num_embeds(self) -> int:
        return sum(end - start for start, end in self.embed_runs)

    def absolute_embed_runs(self) -> list[tuple[int, int]]:
        """The embed runs as absolute prompt positions [start, end)."""
        return [(self.offset + start, self.offset + end) for start, end in self.embed_runs]


class MultiModalFeature(msgspec.Struct, array_like=True, frozen=True, gc=False, kw_only=True):
    """One image item of a request."""

    identifier: str  # mm_hash: full hex blake3, never truncated
    position: PlaceholderRange
    # Crops the encoder runs for this item (1 + Pan-and-Scan crops); pixel_values' first dimension.
    num_crops: int
    pixel_values: PixelData | None = None
    modality: str = "image"

    @property
    def num_embeds(self) -> int:
        return self.position.num_embeds

    def without_pixels(self) -> MultiModalFeature:
        return msgspec.structs.replace(self, pixel_values=None)

    def with_pixels(self, pixel_values: PixelData) -> MultiModalFeature:
        return msgspec.structs.replace(self, pixel_values=pixel_values)
