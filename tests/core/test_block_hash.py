"""Block hashing: chained, incremental, salted, and the same in every process."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from core_helpers import REPO_ROOT, TESTS_DIR, make_request

from pagoda.core.block_hash import (
    NONE_HASH,
    get_block_hash,
    get_group_id,
    get_hash_fn,
    hash_block_tokens,
    make_block_hash_with_group_id,
    sha256_cbor,
    xxhash_cbor,
)


def test_none_hash_is_a_fixed_constant() -> None:
    assert NONE_HASH == hashlib.sha256(b"pagoda.core.block_hash.NONE_HASH").digest()


def test_chain_matches_manual_computation() -> None:
    request = make_request("r", list(range(10)), block_size=4)
    assert len(request.block_hashes) == 2  # two full blocks; tokens 8, 9 wait for more
    first = hash_block_tokens(sha256_cbor, None, [0, 1, 2, 3], None)
    second = hash_block_tokens(sha256_cbor, first, [4, 5, 6, 7], None)
    assert request.block_hashes == [first, second]
    assert first == sha256_cbor((NONE_HASH, (0, 1, 2, 3), None))


def test_hashes_extend_incrementally_as_tokens_arrive() -> None:
    request = make_request("r", list(range(6)), block_size=4)
    first_hashes = list(request.block_hashes)
    assert len(first_hashes) == 1
    request.append_output_token_ids([6])
    assert request.block_hashes == first_hashes
    request.append_output_token_ids(7)
    assert request.block_hashes[:1] == first_hashes and len(request.block_hashes) == 2
    request.append_output_token_ids([8, 9, 10, 11, 12])
    whole = make_request("w", list(range(13)), block_size=4)
    assert request.block_hashes == whole.block_hashes and len(whole.block_hashes) == 3


def test_parent_chaining_makes_equal_blocks_differ() -> None:
    request = make_request("r", [5, 5, 5, 5, 5, 5, 5, 5, 0], block_size=4)
    assert request.block_hashes[0] != request.block_hashes[1]


def test_cache_salt_changes_every_block() -> None:
    prompt = list(range(12))
    plain = make_request("a", prompt).block_hashes
    salted = make_request("b", prompt, cache_salt="tenant-1").block_hashes
    other = make_request("c", prompt, cache_salt="tenant-2").block_hashes
    same = make_request("d", prompt, cache_salt="tenant-1").block_hashes
    assert salted == same
    for i in range(3):
        assert len({plain[i], salted[i], other[i]}) == 3


def test_xxhash_option() -> None:
    request = make_request("r", list(range(8)), hash_algo="xxhash")
    assert all(len(h) == 16 for h in request.block_hashes)
    assert request.block_hashes[0] == xxhash_cbor((NONE_HASH, (0, 1, 2, 3), None))
    assert get_hash_fn("xxhash") is xxhash_cbor and get_hash_fn("sha256") is sha256_cbor
    with pytest.raises(ValueError, match="prefix_caching_hash_algo"):
        get_hash_fn("md5")


def test_group_id_key_round_trip() -> None:
    block_hash = sha256_cbor("x")
    key = make_block_hash_with_group_id(block_hash, 7)
    assert len(key) == len(block_hash) + 4
    assert get_block_hash(key) == block_hash and get_group_id(key) == 7
    assert key != make_block_hash_with_group_id(block_hash, 8)


_SUBPROCESS_SCRIPT = """
import json, sys
sys.path[:0] = sys.argv[1:3]
from core_helpers import make_request
out = {}
for algo in ("sha256", "xxhash"):
    r = make_request("r", list(range(20)), hash_algo=algo, cache_salt="s")
    out[algo] = [h.hex() for h in r.block_hashes]
print(json.dumps(out))
"""


@pytest.mark.parametrize("seed", ["0", "12345"])
def test_hashes_are_identical_across_processes(seed: str) -> None:
    """Different PYTHONHASHSEEDs must not matter: a shared KV store relies on equal hashes."""
    result = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_SCRIPT, str(TESTS_DIR), str(REPO_ROOT)],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
    )
    theirs = json.loads(result.stdout)
    for algo in ("sha256", "xxhash"):
        mine = [h.hex() for h in make_request("r", list(range(20)), hash_algo=algo, cache_salt="s").block_hashes]
        assert theirs[algo] == mine
