"""Core layer: one step's scheduling decisions, and their translation into a `SchedulerOutput`."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.core.encoder_scheduling import EncoderStepPlan
from pagoda.core.kv_cache_interface import BlockIds
from pagoda.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
from pagoda.core.request import Request
from pagoda.core.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput


@dataclass
class SchedulePlan:
    """What one `schedule()` call has decided so far: scratch state, dropped after the step."""

    token_budget: int
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    new_reqs: list[Request] = field(default_factory=list)
    resumed_reqs: list[Request] = field(default_factory=list)
    running_reqs: list[Request] = field(default_factory=list)
    new_blocks: dict[str, KVCacheBlocks] = field(default_factory=dict)
    num_preempted: int = 0
    # Image items this step encodes or loads; None for text-only models.
    encoder: EncoderStepPlan | None = None

    def add_running(self, request: Request, num_new_tokens: int, new_blocks: KVCacheBlocks) -> None:
        self._spend(request, num_new_tokens)
        self.running_reqs.append(request)
        self.new_blocks[request.request_id] = new_blocks

    def add_admitted(self, request: Request, num_new_tokens: int, resumed: bool) -> None:
        self._spend(request, num_new_tokens)
        (self.resumed_reqs if resumed else self.new_reqs).append(request)

    def drop_running(self, request: Request) -> None:
        """Undo the scheduling of a running request preempted later in the same pass."""
        self.token_budget += self.num_scheduled_tokens.pop(request.request_id)
        self.running_reqs.remove(request)
        del self.new_blocks[request.request_id]

    def _spend(self, request: Request, num_new_tokens: int) -> None:
        self.num_scheduled_tokens[request.request_id] = num_new_tokens
        self.token_budget -= num_new_tokens

    def make_scheduler_output(self, kv_cache_manager: KVCacheManager, finished_req_ids: set[str],
                              send_token_ids: bool = False) -> SchedulerOutput:
        """New requests in full; running and resumed ones as diffs against what the worker holds.

        `send_token_ids` (pipeline parallelism): also the tokens of each scheduled request that the stages
        which did not sample may lack (`CachedRequestData.new_token_ids`). Called before the scheduler
        advances `num_computed_tokens` past this step.
        """
        new_reqs_data = [
            NewRequestData(
                req_id=request.request_id,
                prompt_token_ids=request.prompt_token_ids,
                sampling_params=request.sampling_params,
                block_ids=kv_cache_manager.get_block_ids(request.request_id),
                num_computed_tokens=request.num_computed_tokens,
                mm_features=request.mm_features,
            )
            for request in self.new_reqs
        ]
        cached = CachedRequestData()
        for request in self.running_reqs:
            new_blocks = self.new_blocks[request.request_id]
            _add_cached(cached, request, False, None if new_blocks.is_empty() else new_blocks.get_block_ids())
            if send_token_ids:
                start = request.num_computed_tokens
                cached.new_token_ids.append(
                    request.all_token_ids[start : start + self.num_scheduled_tokens[request.request_id]])
        for request in self.resumed_reqs:
            # All block ids: they replace the ones the worker had before the preemption.
            _add_cached(cached, request, True, kv_cache_manager.get_block_ids(request.request_id))
            if send_token_ids:
                cached.new_token_ids.append(list(request.output_token_ids))
        return SchedulerOutput(
            scheduled_new_reqs=new_reqs_data,
            scheduled_cached_reqs=cached,
            num_scheduled_tokens=self.num_scheduled_tokens,
            total_num_scheduled_tokens=sum(self.num_scheduled_tokens.values()),
            finished_req_ids=finished_req_ids,
            scheduled_encoder_inputs=self.encoder.scheduled_encoder_inputs() if self.encoder is not None else [],
        )


def _add_cached(cached: CachedRequestData, request: Request, resumed: bool, new_block_ids: BlockIds | None) -> None:
    cached.req_ids.append(request.request_id)
    cached.resumed_from_preemption.append(resumed)
    cached.new_block_ids.append(new_block_ids)
    cached.num_computed_tokens.append(request.num_computed_tokens)
