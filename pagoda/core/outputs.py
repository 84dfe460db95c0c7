"""Core layer: what the scheduler reports per request after each step."""

from __future__ import annotations

from enum import IntEnum

import msgspec

from pagoda.core.model_runner_output import LogprobsLists


class FinishReason(IntEnum):
    STOP = 0
    LENGTH = 1
    ABORT = 2
    ERROR = 3

    def __str__(self) -> str:
        return self.name.lower()


class EngineCoreOutput(msgspec.Struct, kw_only=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: LogprobsLists | None = None
    new_prompt_logprobs: LogprobsLists | None = None
    finish_reason: FinishReason | None = None
    # A stop token id (int) or, set later by the output processor, a stop string.
    stop_reason: int | str | None = None
    # Prompt tokens served from the prefix cache when the request was first scheduled.
    num_cached_tokens: int = 0
    # Of the cached tokens, those the KV store supplied, by tier name.
    kv_store_tokens: dict[str, int] = msgspec.field(default_factory=dict)
    # Seconds the request waited in the scheduler's queue before it first ran; on its first output only.
    queue_time: float | None = None
    error: str | None = None
    # The error is the request's own (a constraint this model's vocabulary cannot carry): a client error.
    invalid_request: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
