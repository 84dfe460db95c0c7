"""Shared factories for the KV store tests: keys and encoded entries."""

from __future__ import annotations

import hashlib

import numpy as np

from pagoda.kvstore.entry import encode_entry
from pagoda.kvstore.keys import CacheEngineKey


def make_key(name: str | int = 0, **fields: object) -> CacheEngineKey:
    """A key whose chunk hash is derived from `name`; other fields default to one fixed namespace."""
    defaults: dict[str, object] = {
        "model_id": "google/gemma-3-270m",
        "kv_dtype": "bfloat16",
        "layout": "LBTHD",
        "world_size": 1,
        "worker_id": 0,
        "chunk_hash": hashlib.sha256(str(name).encode()).digest(),
    }
    defaults.update(fields)
    return CacheEngineKey(**defaults)  # type: ignore[arg-type]


def make_entry(key: CacheEngineKey, num_values: int = 16, seed: int = 0) -> bytes:
    """An encoded float32 entry of `num_values` deterministic values."""
    values = np.random.default_rng(seed).standard_normal(num_values, dtype=np.float32)
    return encode_entry(key, values, (num_values,), "float32")
