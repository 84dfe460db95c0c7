"""Core layer: what the KV connector's scheduler side tells its worker side each step, and what comes back.

Part of the contract core owns (`pagoda.core.connector`): `pagoda.kv_connector`
fills and reads these; the scheduler and the model runner read them too.
msgspec Structs without tensors, so they travel inside `SchedulerOutput` and
`ModelRunnerOutput` across a process boundary without pickle.
"""

from __future__ import annotations

import msgspec

from pagoda.core.kv_cache_interface import BlockIds


class LoadSpec(msgspec.Struct, kw_only=True, gc=False):
    """Load the stored KV of prompt positions [start, end) of one request into its blocks.

    `chunk_hashes[i]` names chunk `first_chunk + i`; the chunks cover
    [start, end). Both ends are block-aligned. With `is_async` the request is
    parked (WAITING_FOR_REMOTE_KVS) and the load runs between steps;
    otherwise it completes inside the step that computes the rest.
    """

    req_id: str
    start: int
    end: int
    first_chunk: int
    chunk_hashes: list[bytes]
    block_ids: BlockIds
    is_async: bool


class SaveSpec(msgspec.Struct, kw_only=True, gc=False):
    """Save chunks `first_chunk ...` of one request once this step has computed them."""

    req_id: str
    first_chunk: int
    chunk_hashes: list[bytes]
    block_ids: BlockIds


class KVConnectorMetadata(msgspec.Struct, kw_only=True, gc=False):
    loads: list[LoadSpec] = msgspec.field(default_factory=list)
    saves: list[SaveSpec] = msgspec.field(default_factory=list)


class LoadResult(msgspec.Struct, kw_only=True, gc=False):
    """How a load ended: KV of positions [0, num_computed_tokens) is now valid in the request's blocks.

    Less than the spec's `end` when some entry was missing, unreadable or
    corrupt: those tokens are recomputed. The worker side, which did the
    load, decides `complete` (everything up to `end` arrived); the model
    runner and the scheduler only read it. `tokens_by_tier` says which tier
    supplied how many of the loaded tokens.
    """

    num_computed_tokens: int
    complete: bool
    tokens_by_tier: dict[str, int] = msgspec.field(default_factory=dict)


class KVConnectorOutput(msgspec.Struct, kw_only=True, gc=False):
    # Loads that finished since the last step: async ones whenever they end, in-step ones every step.
    finished_loads: dict[str, LoadResult] = msgspec.field(default_factory=dict)
