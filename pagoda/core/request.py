"""Core layer: the scheduler's record of one request — its tokens, progress and status.

A request's life: WAITING → RUNNING → (PREEMPTED → back in the waiting
queue →) RUNNING → one of the FINISHED_* statuses. WAITING_FOR_REMOTE_KVS
marks a request whose KV is being loaded from an external store.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum

from pagoda.core.block_hash import BlockHash
from pagoda.core.multimodal import MultiModalFeature
from pagoda.core.outputs import FinishReason
from pagoda.sampling_params import SamplingParams


class RequestStatus(IntEnum):
    """Where a request is in its life; every finished status sorts after PREEMPTED."""

    WAITING = 0
    WAITING_FOR_REMOTE_KVS = 1
    RUNNING = 2
    PREEMPTED = 3
    FINISHED_STOPPED = 4
    FINISHED_LENGTH_CAPPED = 5
    FINISHED_ABORTED = 6
    FINISHED_ERROR = 7

    @staticmethod
    def is_finished(status: RequestStatus) -> bool:
        return status > RequestStatus.PREEMPTED

    @staticmethod
    def get_finished_reason(status: RequestStatus) -> FinishReason | None:
        """The reason reported to the client, None while the request is not finished."""
        return _FINISHED_REASONS.get(status)


_FINISHED_REASONS: dict[RequestStatus, FinishReason] = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH_CAPPED: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}


class Request:
    """One generation request as the scheduler tracks it.

    `output_token_ids` and `all_token_ids` are read-only for everyone else:
    only `append_output_token_ids` extends them, because it also keeps
    `block_hashes` in step with the tokens.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_id: int | None,
        arrival_time: float,
        priority: int = 0,
        cache_salt: str | None = None,
        block_hasher: Callable[[Request], list[BlockHash]] | None = None,
        mm_features: list[MultiModalFeature] | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = arrival_time
        self.priority = priority
        self.cache_salt = cache_salt
        # Image items in prompt order; their identifiers enter the hash of every block they touch.
        self.mm_features: list[MultiModalFeature] = sorted(mm_features or (), key=lambda f: f.position.offset)
        # None: unlimited, up to the scheduler's max_model_len.
        self.max_tokens = sampling_params.max_tokens

        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        # Prefix-cache hit in tokens, set when first scheduled; -1 until then.
        self.num_cached_tokens = -1
        # Of those, prompt tokens whose KV the KV store supplied, by tier name.
        self.kv_store_tokens: dict[str, int] = {}
        self.num_preemptions = 0
        # time.monotonic() when the scheduler queued it; the wait until it first ran, until reported.
        self.queued_at = 0.0
        self.unreported_queue_time: float | None = None

        self.block_hashes: list[BlockHash] = []
        self._block_hasher = block_hasher
        self.update_block_hashes()

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def has_block_hasher(self) -> bool:
        return self._block_hasher is not None

    def set_block_hasher(self, block_hasher: Callable[[Request], list[BlockHash]]) -> None:
        """Attach a hasher after construction (the scheduler does this) and hash the prompt."""
        self._block_hasher = block_hasher
        self.update_block_hashes()

    def update_block_hashes(self) -> None:
        """Hash any full blocks that appeared since the last call."""
        if self._block_hasher is not None:
            self.block_hashes.extend(self._block_hasher(self))

    def append_output_token_ids(self, token_ids: int | list[int]) -> None:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)
        self.update_block_hashes()

    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)

    def get_finished_reason(self) -> FinishReason | None:
        return RequestStatus.get_finished_reason(self.status)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"num_tokens={self.num_tokens}, num_computed_tokens={self.num_computed_tokens})"
        )
