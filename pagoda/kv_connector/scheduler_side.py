"""KV connector layer, scheduler side: which prompt tokens the store can supply, and what to save.

Implements `pagoda.core.connector.kv.KVConnectorSchedulerSide`. Runs inside
the scheduler, never imports torch, and reaches the store only through a
lookup client (`pagoda.kvstore.lookup`), so it works the same when the
workers live in another process. Per request it keeps the prompt's chunk
hashes (the engine's block-hash chain at chunk granularity) and how many
chunks are known to be stored already; which loads are in flight is the
scheduler's record (`pagoda.core.connector.kv_loads`), not this one's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from pagoda.config import KVTransferConfig
from pagoda.core.block_hash import HashFn
from pagoda.core.connector.kv import BlockIdsFn
from pagoda.core.connector.kv_metadata import KVConnectorMetadata, LoadSpec, SaveSpec
from pagoda.core.kv_cache_interface import BlockIds
from pagoda.core.request import Request
from pagoda.kv_connector.layout import StoreLayout
from pagoda.kvstore.keys import CacheEngineKey
from pagoda.kvstore.token_database import ChunkedTokenDatabase


class StoreLookup(Protocol):
    """How many leading chunks the store holds (`pagoda.kvstore.lookup.LookupClient`)."""

    def lookup(self, keys: list[CacheEngineKey], prefetch: bool = False) -> int: ...

    def close(self) -> None: ...


@dataclass
class _RequestState:
    chunk_hashes: list[bytes]
    # Chunks [0, num_saved_chunks) are in the store or already sent to it.
    num_saved_chunks: int = 0
    # A load of this request came back short: it recomputes instead of asking the store again.
    loads_disabled: bool = False


class KVConnectorScheduler:
    def __init__(self, config: KVTransferConfig, layout: StoreLayout, lookup: StoreLookup, hash_fn: HashFn) -> None:
        self.config = config
        self.layout = layout
        self.lookup = lookup
        self.token_database = ChunkedTokenDatabase(config.chunk_size, hash_fn)
        self._states: dict[str, _RequestState] = {}
        self._new_loads: list[LoadSpec] = []

    def _state(self, request: Request) -> _RequestState:
        state = self._states.get(request.request_id)
        if state is None:
            hashes = [h for _, _, h in self.token_database.process_tokens(
                request.prompt_token_ids, request.cache_salt, request.mm_features)]
            state = self._states[request.request_id] = _RequestState(hashes)
        return state

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        """Prompt tokens past `num_computed_tokens` the store can supply, and whether the load is asynchronous.

        The hit ends block-aligned and at least one token short of the
        request's end (the model must run on some token). Requests asking
        for prompt logprobs compute every position and never load.
        """
        if request.sampling_params.prompt_logprobs is not None:
            return 0, False
        state = self._state(request)
        if not state.chunk_hashes or state.loads_disabled:
            return 0, False
        num_stored = self.lookup.lookup(self.layout.lookup_keys(state.chunk_hashes))
        state.num_saved_chunks = max(state.num_saved_chunks, num_stored)
        block_size = self.layout.block_size
        end = min(num_stored * self.config.chunk_size, (request.num_tokens - 1) // block_size * block_size)
        if end <= num_computed_tokens:
            return 0, False
        return end - num_computed_tokens, self.config.load_mode == "async"

    def update_state_after_alloc(self, request: Request, block_ids: BlockIds, num_computed_tokens: int,
                                 num_external_tokens: int, is_async: bool) -> None:
        """Plan the load of [num_computed_tokens, + num_external_tokens) into the blocks just allocated."""
        state = self._state(request)
        start, end = num_computed_tokens, num_computed_tokens + num_external_tokens
        chunk_size = self.config.chunk_size
        first_chunk, last_chunk = start // chunk_size, -(-end // chunk_size)
        self._new_loads.append(LoadSpec(req_id=request.request_id, start=start, end=end, first_chunk=first_chunk,
                                        chunk_hashes=state.chunk_hashes[first_chunk:last_chunk],
                                        block_ids=block_ids, is_async=is_async))

    def build_connector_meta(self, num_scheduled_tokens: dict[str, int], requests: dict[str, Request],
                             block_ids_of: BlockIdsFn) -> KVConnectorMetadata:
        """This step's loads, and saves of every prompt chunk the step completes.

        Called before the scheduler advances `num_computed_tokens`, so a
        request's tokens this step are [num_computed_tokens, + scheduled).
        Only full chunks of the prompt are saved; the last partial chunk is
        recomputed by whoever needs it.
        """
        saves: list[SaveSpec] = []
        chunk_size = self.config.chunk_size
        for req_id, num_tokens in num_scheduled_tokens.items():
            request = requests[req_id]
            state = self._state(request)
            num_full = min(request.num_computed_tokens + num_tokens, request.num_prompt_tokens) // chunk_size
            if num_full > state.num_saved_chunks:
                saves.append(SaveSpec(req_id=req_id, first_chunk=state.num_saved_chunks,
                                      chunk_hashes=state.chunk_hashes[state.num_saved_chunks:num_full],
                                      block_ids=block_ids_of(req_id)))
                state.num_saved_chunks = num_full
        loads, self._new_loads = self._new_loads, []
        return KVConnectorMetadata(loads=loads, saves=saves)

    def load_failed(self, request: Request, num_good_tokens: int) -> None:
        """A load ended short: no more loads for the request, and the chunks past the good prefix are saved
        again once recomputed (the worker dropped what the failed step would have saved)."""
        state = self._state(request)
        state.loads_disabled = True
        state.num_saved_chunks = min(state.num_saved_chunks, num_good_tokens // self.config.chunk_size)

    def request_finished(self, request: Request) -> None:
        self._states.pop(request.request_id, None)

    def close(self) -> None:
        self.lookup.close()
