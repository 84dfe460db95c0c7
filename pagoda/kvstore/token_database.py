"""KV store layer: splits a prompt into fixed-size chunks named by a prefix hash chain.

The chain is the engine's block-hash chain (`pagoda.core.block_hash`): chunk
i's hash covers chunk i - 1's hash, its tokens and the engine's extra keys
(the cache salt in the first chunk, the identifier of every image a chunk touches). With `chunk_size == block_size` a chunk hash therefore equals
the engine's block hash for the same tokens, so a prefix maps to the same keys
in the engine, in every tier and on every server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from pagoda.core.block_hash import NONE_HASH, HashFn, block_extra_keys, get_hash_fn, hash_block_tokens
from pagoda.core.multimodal import MultiModalFeature


class ChunkedTokenDatabase:
    """Maps token ids to `(start, end, chunk_hash)` for every full chunk."""

    def __init__(self, chunk_size: int = 256, hash_fn: HashFn | None = None, hash_algo: str = "sha256") -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size
        self.hash_fn = hash_fn if hash_fn is not None else get_hash_fn(hash_algo)

    def process_tokens(
        self, token_ids: Sequence[int], cache_salt: str | None = None, mm_features: Sequence[MultiModalFeature] = ()
    ) -> Iterator[tuple[int, int, bytes]]:
        """Yield each full chunk's token range and hash; the trailing partial chunk is recomputed, never stored."""
        parent_hash = NONE_HASH
        num_full_tokens = len(token_ids) - len(token_ids) % self.chunk_size
        for start in range(0, num_full_tokens, self.chunk_size):
            end = start + self.chunk_size
            extra_keys = block_extra_keys(start, end, cache_salt, mm_features)
            parent_hash = hash_block_tokens(self.hash_fn, parent_hash, token_ids[start:end], extra_keys)
            yield start, end, parent_hash

    def lookup_prefix(
        self, token_ids: Sequence[int], contains: Callable[[bytes], bool], cache_salt: str | None = None
    ) -> int:
        """Number of leading tokens whose chunks are all present; stops at the first missing chunk.

        A later chunk is useless without every chunk before it (its KV attends
        to theirs), so nothing past a gap is even asked about.
        """
        num_tokens = 0
        for _, end, chunk_hash in self.process_tokens(token_ids, cache_salt):
            if not contains(chunk_hash):
                break
            num_tokens = end
        return num_tokens
