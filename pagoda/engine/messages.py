"""Engine layer: the messages between the front end and `EngineCore`.

msgspec Structs (array-like, no GC tracking) so the same values travel
in-process today and over ZMQ with msgpack later, never through pickle.
"""

from __future__ import annotations

from enum import IntEnum

import msgspec

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


class EngineCoreRequestType(IntEnum):
    ADD = 0
    ABORT = 1


class SchedulerStatsMessage(msgspec.Struct, array_like=True, gc=False, kw_only=True):
    """Scheduler gauges and counters at the end of a step."""

    num_running_reqs: int
    num_waiting_reqs: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, kw_only=True):
    outputs: list[EngineCoreOutput] = msgspec.field(default_factory=list)
    scheduler_stats: SchedulerStatsMessage | None = None
