"""ChunkedTokenDatabase: the engine's block-hash chain, full chunks only, salts isolated, lookup stops at a gap."""

from __future__ import annotations

import pytest

from pagoda.core.block_hash import (
    NONE_HASH,
    get_hash_fn,
    get_request_block_hasher,
    hash_block_tokens,
)
from pagoda.core.multimodal import MultiModalFeature, PlaceholderRange
from pagoda.core.request import Request
from pagoda.kvstore.token_database import ChunkedTokenDatabase
from pagoda.sampling_params import SamplingParams


def engine_block_hashes(token_ids: list[int], block_size: int, algo: str, cache_salt: str | None) -> list[bytes]:
    hasher = get_request_block_hasher(block_size, get_hash_fn(algo))
    request = Request("r", token_ids, SamplingParams(max_tokens=1), 1, 0.0, cache_salt=cache_salt, block_hasher=hasher)
    return list(request.block_hashes)


@pytest.mark.parametrize("algo", ["sha256", "xxhash"])
@pytest.mark.parametrize("cache_salt", [None, "tenant-a"])
def test_chunk_hashes_equal_engine_block_hashes(algo: str, cache_salt: str | None) -> None:
    token_ids = list(range(1000, 1000 + 4 * 16 + 5))
    database = ChunkedTokenDatabase(chunk_size=16, hash_algo=algo)
    chunks = list(database.process_tokens(token_ids, cache_salt))
    assert [chunk_hash for _, _, chunk_hash in chunks] == engine_block_hashes(token_ids, 16, algo, cache_salt)


def test_chunks_cover_full_chunks_only() -> None:
    database = ChunkedTokenDatabase(chunk_size=4)
    chunks = list(database.process_tokens(list(range(11))))
    assert [(start, end) for start, end, _ in chunks] == [(0, 4), (4, 8)]
    assert list(database.process_tokens([1, 2, 3])) == []


def test_chain_matches_manual_computation() -> None:
    hash_fn = get_hash_fn("sha256")
    database = ChunkedTokenDatabase(chunk_size=2, hash_fn=hash_fn)
    first = hash_block_tokens(hash_fn, NONE_HASH, [5, 6])
    second = hash_block_tokens(hash_fn, first, [7, 8])
    assert [h for _, _, h in database.process_tokens([5, 6, 7, 8])] == [first, second]


def test_default_chunk_size_is_256() -> None:
    assert ChunkedTokenDatabase().chunk_size == 256
    with pytest.raises(ValueError, match="chunk_size"):
        ChunkedTokenDatabase(chunk_size=0)


def test_salts_isolate_every_chunk() -> None:
    database = ChunkedTokenDatabase(chunk_size=4)
    token_ids = list(range(12))
    hashes = {salt: [h for _, _, h in database.process_tokens(token_ids, salt)] for salt in (None, "a", "b")}
    assert not set(hashes[None]) & set(hashes["a"])
    assert not set(hashes["a"]) & set(hashes["b"])


def test_shared_prefix_shares_keys_until_the_first_difference() -> None:
    database = ChunkedTokenDatabase(chunk_size=4)
    a = [h for _, _, h in database.process_tokens(list(range(12)))]
    b = [h for _, _, h in database.process_tokens(list(range(8)) + [99, 10, 11, 12])]
    assert a[:2] == b[:2]
    assert a[2] != b[2]


def test_lookup_prefix_stops_at_the_first_missing_chunk() -> None:
    database = ChunkedTokenDatabase(chunk_size=4)
    token_ids = list(range(18))
    hashes = [h for _, _, h in database.process_tokens(token_ids)]
    stored = {hashes[0], hashes[1], hashes[3]}  # chunk 2 missing: chunk 3 is useless
    asked: list[bytes] = []

    def contains(chunk_hash: bytes) -> bool:
        asked.append(chunk_hash)
        return chunk_hash in stored

    assert database.lookup_prefix(token_ids, contains) == 8
    assert asked == hashes[:3]
    assert database.lookup_prefix(token_ids, set(hashes).__contains__) == 16
    assert database.lookup_prefix(token_ids, set(hashes).__contains__, cache_salt="other") == 0


def _image(identifier: str, offset: int) -> MultiModalFeature:
    return MultiModalFeature(identifier=identifier, position=PlaceholderRange(offset, 6, ((1, 5),)), num_crops=1)


def test_chunks_touching_an_image_carry_its_identifier_like_engine_blocks() -> None:
    token_ids = list(range(1000, 1064))
    database = ChunkedTokenDatabase(chunk_size=16)
    cat = [h for _, _, h in database.process_tokens(token_ids, None, [_image("cat", 20)])]
    dog = [h for _, _, h in database.process_tokens(token_ids, None, [_image("dog", 20)])]
    assert cat[0] == dog[0], "the chunk before the image is shared"
    assert not set(cat[1:]) & set(dog[1:]), "from the chunk holding the image on, nothing is shared"
    hasher = get_request_block_hasher(16, get_hash_fn("sha256"))
    request = Request("r", token_ids, SamplingParams(max_tokens=1), 1, 0.0, mm_features=[_image("cat", 20)],
                      block_hasher=hasher)
    assert cat == request.block_hashes
