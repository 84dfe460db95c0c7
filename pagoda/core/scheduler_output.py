"""Core layer: what the scheduler tells the workers to compute this step.

New requests travel in full once (`NewRequestData`); requests the worker
already knows travel as diffs (`CachedRequestData`). msgspec Structs so a
multi-process executor can send them without pickle. Each connector's worker
side gets its own field (its struct defined in `pagoda.core.connector`).
"""

from __future__ import annotations

import msgspec

from pagoda.core.connector.ec_metadata import ECConnectorMetadata
from pagoda.core.connector.kv_metadata import KVConnectorMetadata
from pagoda.core.kv_cache_interface import BlockIds
from pagoda.core.multimodal import MultiModalFeature
from pagoda.sampling_params import SamplingParams


class NewRequestData(msgspec.Struct, kw_only=True):
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: BlockIds
    num_computed_tokens: int
    mm_features: list[MultiModalFeature] = msgspec.field(default_factory=list)


class CachedRequestData(msgspec.Struct, kw_only=True):
    """Parallel lists, one entry per request scheduled again."""

    req_ids: list[str] = msgspec.field(default_factory=list)
    # A resumed request's new_block_ids replace its old ones instead of extending them.
    resumed_from_preemption: list[bool] = msgspec.field(default_factory=list)
    new_block_ids: list[BlockIds | None] = msgspec.field(default_factory=list)
    num_computed_tokens: list[int] = msgspec.field(default_factory=list)
    # Pipeline parallelism only (else empty): a running request's tokens this step computes, a resumed
    # one's output tokens so far; the stages that did not sample them take them from here.
    new_token_ids: list[list[int]] = msgspec.field(default_factory=list)


class GrammarBitmask(msgspec.Struct, kw_only=True):
    """The allowed next tokens of this step's constrained requests (structured output).

    `words` holds, per request in `req_ids`' order, ceil(vocab_size / 32)
    little-endian int32 words; bit j of word i allows token 32 * i + j.
    """

    req_ids: list[str]
    words: bytes


class SchedulerOutput(msgspec.Struct, kw_only=True):
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    # req_id -> tokens to compute this step; only scheduled requests appear.
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Finished since the previous step: the worker drops their state.
    finished_req_ids: set[str] = msgspec.field(default_factory=set)
    # What the KV connector's worker side loads and saves this step (None without a connector).
    kv_connector_metadata: KVConnectorMetadata | None = None
    # Image items to encode this step, by identifier (the worker finds their pixels in its requests).
    scheduled_encoder_inputs: list[str] = msgspec.field(default_factory=list)
    # Encoder cache entries the scheduler evicted: the worker drops their outputs.
    free_encoder_mm_hashes: list[str] = msgspec.field(default_factory=list)
    # What the encoder-cache connector's worker side loads this step (None without one).
    ec_connector_metadata: ECConnectorMetadata | None = None
    # Allowed next tokens of the requests under a grammar that sample this step (None: no such request).
    grammar_bitmask: GrammarBitmask | None = None
