"""Engine layer: the messages between the front end and `EngineCore`.

msgspec Structs (array-like, no GC tracking) so the same values travel
in-process and over ZMQ with msgpack, never through pickle.

On the wire (see `core_proc`): the client sends two frames, a one-byte
`EngineCoreRequestType` and the msgpack payload (an `EngineCoreRequest`, a
list of request ids to abort, or a `UtilityRequest`); the engine answers with
one `EngineCoreOutputs` frame per step or per utility call. The engine's first
message is an `EngineCoreHandshake`.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import msgspec

from pagoda.core.multimodal import MultiModalFeature
from pagoda.core.outputs import EngineCoreOutput
from pagoda.sampling_params import SamplingParams


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, kw_only=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    arrival_time: float
    priority: int = 0
    cache_salt: str | None = None
    # Image items, in prompt order; pixel_values None where the engine's processor cache holds them.
    mm_features: list[MultiModalFeature] | None = None


class EngineCoreRequestType(IntEnum):
    ADD = 0
    ABORT = 1
    UTILITY = 2


class UtilityRequest(msgspec.Struct, array_like=True, gc=False, kw_only=True):
    """Call one of the engine's utility methods (`reset_prefix_cache`, `get_stats`) by name."""

    call_id: int
    method: str


class UtilityOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, kw_only=True):
    """The answer to the `UtilityRequest` with the same `call_id`: a msgpack-native result or an error."""

    call_id: int
    result: Any = None
    error: str | None = None


class EngineCoreHandshake(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, kw_only=True):
    """The engine process's first message: ready with its KV cache size, or why start-up failed."""

    num_kv_blocks: int = 0
    error: str | None = None


class SchedulerStatsMessage(msgspec.Struct, array_like=True, gc=False, kw_only=True):
    """Scheduler gauges and counters at the end of a step."""

    num_running_reqs: int
    num_waiting_reqs: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    # KV store counters by tier name (and "connector"); None without a store.
    kv_store: dict[str, dict[str, float]] | None = None
    # Image models: counters by cache ("encoder_cache", "encoder", and the EC connector's "ec.<tier>" groups).
    multimodal: dict[str, dict[str, float]] | None = None


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, kw_only=True):
    outputs: list[EngineCoreOutput] = msgspec.field(default_factory=list)
    scheduler_stats: SchedulerStatsMessage | None = None
    utility_output: UtilityOutput | None = None
    # Image models with the engine in its own process: requests the engine could not add because its mirror of
    # the front end's pixel cache lacked these items (request id -> identifiers); the front end resends them.
    mm_cache_misses: dict[str, list[str]] | None = None
