"""Core layer: content hashes of full KV blocks, chained so a hash names a whole prefix.

Block i's hash covers its parent's hash (block i - 1, or `NONE_HASH` for the
first block), its token ids and its extra keys. Two requests therefore share a
block hash only when everything before and inside that block is identical,
which is what makes the hash a safe key for prefix caching.

Hashes are computed over a canonical CBOR encoding, never Python's `hash()`,
so every process and every machine derives the same bytes for the same
tokens; a KV store shared by many servers relies on this.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import cbor2
import xxhash

if TYPE_CHECKING:
    from pagoda.core.multimodal import MultiModalFeature
    from pagoda.core.request import Request

BlockHash = bytes
# A block hash followed by the 4-byte big-endian id of its KV cache group.
BlockHashWithGroupId = bytes
HashFn = Callable[[Any], bytes]

_GROUP_ID_BYTES = 4

# The parent of every first block: fixed, so all servers agree on every hash.
NONE_HASH: BlockHash = hashlib.sha256(b"pagoda.core.block_hash.NONE_HASH").digest()


def sha256_cbor(obj: Any) -> bytes:
    """SHA-256 of the canonical CBOR encoding of `obj` (32 bytes)."""
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def xxhash_cbor(obj: Any) -> bytes:
    """xxh3-128 of the canonical CBOR encoding of `obj` (16 bytes, not cryptographic)."""
    return xxhash.xxh3_128_digest(cbor2.dumps(obj, canonical=True))


_HASH_FNS: dict[str, HashFn] = {"sha256": sha256_cbor, "xxhash": xxhash_cbor}


def get_hash_fn(name: str) -> HashFn:
    """The hash function for `CacheConfig.prefix_caching_hash_algo`."""
    try:
        return _HASH_FNS[name]
    except KeyError:
        raise ValueError(f"prefix_caching_hash_algo must be one of {sorted(_HASH_FNS)}, got {name!r}") from None


def hash_block_tokens(
    hash_fn: HashFn,
    parent_hash: BlockHash | None,
    token_ids: Sequence[int],
    extra_keys: tuple[Any, ...] | None = None,
) -> BlockHash:
    """Hash one full block given the hash of the block before it (None for the first)."""
    if parent_hash is None:
        parent_hash = NONE_HASH
    return hash_fn((parent_hash, tuple(token_ids), extra_keys))


def generate_block_extra_keys(request: Request, start: int, end: int) -> tuple[Any, ...] | None:
    """Keys besides token ids that decide whether the request's tokens [start, end) may share KV."""
    return block_extra_keys(start, end, request.cache_salt, request.mm_features)


def block_extra_keys(start: int, end: int, cache_salt: str | None,
                     mm_features: Sequence[MultiModalFeature] = ()) -> tuple[Any, ...] | None:
    """The extra keys of tokens [start, end): shared by the prefix cache and the KV store's chunks.

    The cache salt enters the first block only: every later hash chains from
    it, so requests with different salts (tenants) never share a block. Every
    block overlapping an image item's placeholder range, partly or wholly,
    carries the item's full identifier: the same text with another image
    shares no block from the first image on. `mm_features` are in prompt order.
    """
    keys: list[Any] = []
    if start == 0 and cache_salt is not None:
        keys.append(cache_salt)
    for feature in mm_features:
        if feature.position.offset >= end:
            break
        if feature.position.end > start:
            keys.append(feature.identifier)
    return tuple(keys) if keys else None


def get_request_block_hasher(block_size: int, hash_fn: HashFn) -> Callable[[Request], list[BlockHash]]:
    """A function returning the hashes of a request's full blocks not yet hashed."""

    def request_block_hasher(request: Request) -> list[BlockHash]:
        start = len(request.block_hashes) * block_size
        parent_hash = request.block_hashes[-1] if request.block_hashes else None
        new_hashes: list[BlockHash] = []
        while start + block_size <= request.num_tokens:
            end = start + block_size
            extra_keys = generate_block_extra_keys(request, start, end)
            parent_hash = hash_block_tokens(hash_fn, parent_hash, request.all_token_ids[start:end], extra_keys)
            new_hashes.append(parent_hash)
            start = end
        return new_hashes

    return request_block_hasher


def make_block_hash_with_group_id(block_hash: BlockHash, group_id: int) -> BlockHashWithGroupId:
    """The block pool's key: the same tokens cached for two groups are two different blocks."""
    return block_hash + group_id.to_bytes(_GROUP_ID_BYTES, "big")


def get_block_hash(key: BlockHashWithGroupId) -> BlockHash:
    return key[:-_GROUP_ID_BYTES]


def get_group_id(key: BlockHashWithGroupId) -> int:
    return int.from_bytes(key[-_GROUP_ID_BYTES:], "big")
