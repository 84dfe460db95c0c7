"""Test helpers: the prompts, engines and stored-entry surgery of the end-to-end KV store tests.

Gemma 3 270M in float32 (its sliding-window layers load only their window),
a 1,100-token prompt = four full 256-token chunks + a recomputed tail. With
this layout a load is all or nothing: a sliding-window layer loads only
chunks 2-3 and needs chunks 0-1 for any shorter prefix, so one bad entry
anywhere means the whole prompt is recomputed.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from pagoda import LLM, SamplingParams
from pagoda.kvstore.entry import FIXED_HEADER_SIZE, peek_entry_key
from pagoda.kvstore.keys import CacheEngineKey
from pagoda.kvstore.token_database import ChunkedTokenDatabase

KV_BYTES = 256 << 20
PROMPT_LEN = 1100
NUM_STORED = 1024  # four full chunks; the last 76 tokens are always recomputed
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
CORRUPTIONS = ("flipped", "truncated", "another key's entry")


def make_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [2] + [rng.randrange(1000, 200000) for _ in range(length - 1)]


PROMPT = make_prompt(PROMPT_LEN, 0)
# Shares the first 600 tokens (two full chunks) with PROMPT.
PARTIAL_PROMPT = PROMPT[:600] + make_prompt(500, 1)[1:]
# Its own four chunks: what a second engine computes while the first computes PROMPT.
OTHER_PROMPT = make_prompt(PROMPT_LEN, 2)


def store_engine(model_path: Path, kv_store: str, **kwargs) -> LLM:
    return LLM(str(model_path), dtype="float32", kv_cache_memory=KV_BYTES, max_model_len=2048, kv_store=kv_store,
               **kwargs)


def generate_one(llm: LLM, prompt: list[int]):
    return llm.generate([prompt], PARAMS, use_tqdm=False)[0]


def store_warnings(records: list[logging.LogRecord]) -> list[str]:
    """The store's own warnings (a short load's note from the connector is not one of them)."""
    return [r.getMessage() for r in records if r.name.startswith("pagoda.kvstore") and r.levelno >= logging.WARNING]


@dataclass(frozen=True)
class StoredEntry:
    """Where one entry lives (a file or a Redis key), what it holds, and which chunk and layer it is."""

    location: Path | bytes
    key: CacheEngineKey
    chunk: int
    layer: int
    full_attention: bool


def describe(location: Path | bytes, data: bytes, prompt: list[int]) -> StoredEntry:
    key, _ = peek_entry_key(data)
    chunks = {chunk_hash: index for index, (_, _, chunk_hash) in
              enumerate(ChunkedTokenDatabase(256).process_tokens(prompt))}
    layer, attention = key.layout.split(":")[:2]
    return StoredEntry(location, key, chunks[key.chunk_hash], int(layer.removeprefix("layer")), attention == "full")


def pick(entries: list[StoredEntry], chunk: int, *, full_attention: bool) -> StoredEntry:
    """The entry of `chunk` in the first layer of that attention kind: one that a load of PROMPT reads."""
    chosen = [e for e in entries if e.chunk == chunk and e.full_attention == full_attention]
    return min(chosen, key=lambda e: e.layer)


def corrupt(data: bytes, kind: str, other: bytes) -> bytes:
    """Stored bytes damaged as `kind` says: one flipped byte in the payload, cut short, or `other` (a valid entry)."""
    if kind == "flipped":
        damaged = bytearray(data)
        damaged[FIXED_HEADER_SIZE + (len(data) - FIXED_HEADER_SIZE) // 2] ^= 0x40
        return bytes(damaged)
    if kind == "truncated":
        return data[: len(data) - 4096]
    if kind == "another key's entry":
        return other
    raise ValueError(f"unknown corruption {kind!r}")

