"""Core layer: decides each step which requests compute how many tokens, and absorbs the results.

Unified compute model: there are no prefill and decode phases. Every request
has `num_computed_tokens` chasing `num_tokens`; a step gives each scheduled
request some tokens out of a shared budget. Running requests go first, in
order; waiting requests are admitted after them while budget, `max_num_seqs`
and KV blocks last. When blocks run out, the lowest-priority running request
is preempted: its blocks are freed and it is recomputed later (the prefix
cache usually makes that cheap).

With a KV connector (any implementation of `pagoda.core.connector.kv`), a
waiting request may get part of its prompt from the KV store: loaded inside
the step that computes the rest, or, in async mode, while the request waits
in WAITING_FOR_REMOTE_KVS and others keep running (`KVLoadTracker` keeps
which). Blocks filled by a load enter the prefix cache only once the worker
confirms the load. A failed or partial load caches the prefix whose KV
arrived whole, frees the request's blocks and queues it again at the front,
without store loads: it resumes from that prefix through the prefix cache
and recomputes the rest.

For image models, each step also plans encoder work (`encoder_scheduling`):
a request's chunk never ends inside an image crop's run of soft tokens, and
reaches an image only when its encoder output is cached, loadable through
the encoder-cache connector, or fits this step's encoder budget and the
encoder cache (`EncoderCacheManager`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from pagoda.config import CacheConfig, SchedulerConfig
from pagoda.core.block_hash import get_hash_fn, get_request_block_hasher
from pagoda.core.connector.base import SchedulerConnector
from pagoda.core.connector.ec import ECConnectorSchedulerSide
from pagoda.core.connector.kv import KVConnectorSchedulerSide
from pagoda.core.connector.kv_loads import KVLoadTracker
from pagoda.core.connector.kv_metadata import KVConnectorOutput
from pagoda.core.encoder_cache_manager import EncoderCacheManager
from pagoda.core.encoder_scheduling import (
    EncoderInputs,
    EncoderStepPlan,
    commit_encoder_inputs,
    limit_to_encoder_inputs,
    release_computed_items,
)
from pagoda.core.kv_cache_interface import KVCacheConfig
from pagoda.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
from pagoda.core.model_runner_output import ModelRunnerOutput
from pagoda.core.outputs import EngineCoreOutput
from pagoda.core.request import Request, RequestStatus
from pagoda.core.request_queue import create_request_queue
from pagoda.core.schedule_plan import SchedulePlan
from pagoda.core.scheduler_output import SchedulerOutput
from pagoda.core.stats import PrefixCacheStats, SchedulerStats
from pagoda.core.stop_check import check_stop


class Scheduler:
    """Owns every unfinished request and the KV cache manager; driven by EngineCore each step."""

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        kv_cache_config: KVCacheConfig,
        log_stats: bool = True,
        enable_kv_cache_events: bool = False,
        kv_connector: KVConnectorSchedulerSide | None = None,
        enable_multimodal: bool = False,
        ec_connector: ECConnectorSchedulerSide | None = None,
        pipeline_parallel: bool = False,
    ) -> None:
        if cache_config.block_size != kv_cache_config.block_size:
            raise ValueError(
                f"CacheConfig.block_size ({cache_config.block_size}) differs from the KV cache's "
                f"block_size ({kv_cache_config.block_size})"
            )
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.kv_cache_config = kv_cache_config
        self.log_stats = log_stats
        self.max_model_len = scheduler_config.max_model_len
        self.policy = scheduler_config.policy
        # Pipeline stages but the last do not sample: each step tells them the tokens they lack.
        self.pipeline_parallel = pipeline_parallel

        self.requests: dict[str, Request] = {}
        self.waiting = create_request_queue(self.policy)
        self.running: list[Request] = []
        self.kv_connector = kv_connector
        # Every connector, for the calls that do not depend on what it moves.
        self.ec_connector = ec_connector
        self.connectors: list[SchedulerConnector] = [c for c in (kv_connector, ec_connector) if c is not None]
        self.encoder_cache_manager = (
            EncoderCacheManager(scheduler_config.encoder_cache_rows) if enable_multimodal else None
        )
        self.kv_loads = KVLoadTracker()
        # Finished since the previous schedule(): the workers drop their state.
        self.finished_req_ids: set[str] = set()

        self.kv_cache_manager = KVCacheManager(
            kv_cache_config,
            self.max_model_len,
            enable_caching=cache_config.enable_prefix_caching,
            log_stats=log_stats,
            enable_kv_cache_events=enable_kv_cache_events,
        )
        self.request_block_hasher = (
            get_request_block_hasher(cache_config.block_size, get_hash_fn(cache_config.prefix_caching_hash_algo))
            if cache_config.enable_prefix_caching
            else None
        )
        self.num_preemptions = 0
        self._prefix_cache_totals = PrefixCacheStats()

    def add_request(self, request: Request) -> None:
        """Queue a request; its prompt must fit max_model_len, since slots are capped there."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if not 0 < request.num_prompt_tokens <= self.max_model_len:
            raise ValueError(
                f"request {request.request_id!r}: prompt_token_ids has {request.num_prompt_tokens} tokens, "
                f"expected 1 to max_model_len ({self.max_model_len})"
            )
        if self.request_block_hasher is not None and not request.has_block_hasher:
            request.set_block_hasher(self.request_block_hasher)
        request.queued_at = time.monotonic()
        self.waiting.add_request(request)
        self.requests[request.request_id] = request

    def schedule(self) -> SchedulerOutput:
        plan = SchedulePlan(token_budget=self.scheduler_config.max_num_batched_tokens)
        if self.encoder_cache_manager is not None:
            plan.encoder = EncoderStepPlan(compute_budget=self.scheduler_config.encoder_compute_budget)
        self._schedule_running(plan)
        # Blocks just ran short: admitting newcomers would only preempt again.
        if plan.num_preempted == 0:
            self._schedule_waiting(plan)
        output = plan.make_scheduler_output(self.kv_cache_manager, self.finished_req_ids, self.pipeline_parallel)
        if self.kv_connector is not None:
            output.kv_connector_metadata = self.kv_connector.build_connector_meta(
                output.num_scheduled_tokens, self.requests, self.kv_cache_manager.get_block_ids)
        if self.encoder_cache_manager is not None:
            output.free_encoder_mm_hashes = self.encoder_cache_manager.get_freed_mm_hashes()
        if self.ec_connector is not None:
            output.ec_connector_metadata = self.ec_connector.build_connector_meta()
        self.finished_req_ids = set()
        # Advance now, as if the step had run, so the next schedule() can
        # already plan the following tokens.
        for request_id, num_tokens in plan.num_scheduled_tokens.items():
            self.requests[request_id].num_computed_tokens += num_tokens
        return output

    def _schedule_running(self, plan: SchedulePlan) -> None:
        index = 0
        while index < len(self.running) and plan.token_budget > 0:
            request = self.running[index]
            num_new_tokens = min(request.num_tokens - request.num_computed_tokens, plan.token_budget)
            num_new_tokens, encoder_inputs = self._limit_to_encoder_inputs(
                request, request.num_computed_tokens, num_new_tokens, plan)
            if num_new_tokens <= 0:
                index += 1
                continue
            while (new_blocks := self.kv_cache_manager.allocate_slots(request, num_new_tokens)) is None:
                victim_index = self._preempt_lowest_priority(plan)
                if victim_index == index:
                    return  # the request itself had to go: blocks are exhausted for this step
                if victim_index < index:
                    index -= 1
            plan.add_running(request, num_new_tokens, new_blocks)
            self._commit_encoder_inputs(request, encoder_inputs, plan)
            index += 1

    def _preempt_lowest_priority(self, plan: SchedulePlan) -> int:
        """Preempt one running request; return the index it had in `self.running`."""
        if self.policy == "priority":
            victim_index = max(
                range(len(self.running)), key=lambda i: (self.running[i].priority, self.running[i].arrival_time)
            )
        else:
            victim_index = len(self.running) - 1  # the latest admitted
        victim = self.running.pop(victim_index)
        if victim.request_id in plan.num_scheduled_tokens:
            plan.drop_running(victim)
        self.kv_cache_manager.free(victim)
        self._free_encoder_inputs(victim)
        victim.status = RequestStatus.PREEMPTED
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        plan.num_preempted += 1
        self.waiting.prepend_request(victim)
        return victim_index

    def _schedule_waiting(self, plan: SchedulePlan) -> None:
        max_num_seqs = self.scheduler_config.max_num_seqs
        while (self.waiting and plan.token_budget > 0
               and len(self.running) + self.kv_loads.num_parked < max_num_seqs):
            request = self.waiting.peek_request()
            num_external, load_async = 0, False
            if self.kv_loads.is_resumed(request.request_id):
                computed_blocks, num_computed_tokens = None, request.num_computed_tokens
            else:
                computed_blocks, num_computed_tokens = self.kv_cache_manager.get_computed_blocks(request)
            if self.kv_connector is not None and computed_blocks is not None:
                num_external, load_async = self.kv_connector.get_num_new_matched_tokens(request, num_computed_tokens)
            if load_async:
                if not self._start_async_load(request, computed_blocks, num_computed_tokens, num_external):
                    break
                continue
            num_local = num_computed_tokens
            num_computed_tokens += num_external
            num_new_tokens = request.num_tokens - num_computed_tokens
            if num_new_tokens > plan.token_budget:
                if not self.scheduler_config.enable_chunked_prefill:
                    break
                num_new_tokens = plan.token_budget
            wanted = num_new_tokens
            num_new_tokens, encoder_inputs = self._limit_to_encoder_inputs(
                request, num_computed_tokens, num_new_tokens, plan)
            if num_new_tokens <= 0 or (num_new_tokens < wanted and not self.scheduler_config.enable_chunked_prefill):
                break
            new_blocks = self.kv_cache_manager.allocate_slots(
                request, num_new_tokens, num_computed_tokens - request.num_computed_tokens, computed_blocks,
                delay_cache_blocks=num_external > 0,
            )
            if new_blocks is None:
                break
            self.kv_loads.admitted(request.request_id)
            if num_external > 0:
                self.kv_connector.update_state_after_alloc(
                    request, self.kv_cache_manager.get_block_ids(request.request_id), num_local, num_external,
                    is_async=False)
                self.kv_loads.start_in_step(request)
            self.waiting.pop_request()
            self.running.append(request)
            plan.add_admitted(request, num_new_tokens, resumed=request.status == RequestStatus.PREEMPTED)
            self._commit_encoder_inputs(request, encoder_inputs, plan)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_computed_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_computed_tokens
                request.unreported_queue_time = time.monotonic() - request.queued_at

    def _limit_to_encoder_inputs(self, request: Request, num_computed_tokens: int, num_new_tokens: int,
                                 plan: SchedulePlan) -> tuple[int, EncoderInputs | None]:
        if plan.encoder is None or not request.mm_features or num_new_tokens <= 0:
            return num_new_tokens, None
        return limit_to_encoder_inputs(request, num_computed_tokens, num_new_tokens, self.encoder_cache_manager,
                                       plan.encoder, self.ec_connector)

    def _commit_encoder_inputs(self, request: Request, encoder_inputs: EncoderInputs | None,
                               plan: SchedulePlan) -> None:
        if encoder_inputs is not None:
            commit_encoder_inputs(request, encoder_inputs, self.encoder_cache_manager, plan.encoder,
                                  self.ec_connector)

    def _free_encoder_inputs(self, request: Request) -> None:
        if self.encoder_cache_manager is not None and request.mm_features:
            self.encoder_cache_manager.free(request.request_id, [f.identifier for f in request.mm_features])

    def _start_async_load(self, request: Request, computed_blocks: KVCacheBlocks, num_computed_tokens: int,
                          num_external: int) -> bool:
        """Park a waiting request while the store loads `num_external` tokens; False if blocks ran short.

        Blocks for the whole prompt are taken now: a parked request that
        could not compute its tail after the load would hold blocks no one
        can preempt.
        """
        num_tail_tokens = request.num_tokens - num_computed_tokens - num_external
        new_blocks = self.kv_cache_manager.allocate_slots(
            request, num_tail_tokens, num_computed_tokens + num_external, computed_blocks, delay_cache_blocks=True
        )
        if new_blocks is None:
            return False
        self.waiting.pop_request()
        self.kv_loads.park(request)
        request.status = RequestStatus.WAITING_FOR_REMOTE_KVS
        request.num_computed_tokens = num_computed_tokens
        self.kv_connector.update_state_after_alloc(
            request, self.kv_cache_manager.get_block_ids(request.request_id), num_computed_tokens, num_external,
            is_async=True)
        return True

    def _apply_kv_connector_output(self, output: KVConnectorOutput) -> None:
        """Confirm or rewind finished loads; parked requests go back to the front of the waiting queue."""
        for request_id, result in output.finished_loads.items():
            load = self.kv_loads.end(request_id)
            if load is None:
                continue
            request = load.request
            if load.orphaned:
                self.kv_cache_manager.free(request)
                continue
            if not result.complete:
                self._restart_after_short_load(request, result.num_computed_tokens, load.resume_status)
                continue
            request.kv_store_tokens = result.tokens_by_tier
            if load.parked:
                request.num_computed_tokens = result.num_computed_tokens
            self.kv_cache_manager.commit_loaded_blocks(request)
            if load.parked:
                request.status = load.resume_status
                self.kv_loads.mark_resumed(request_id)
                self.waiting.prepend_request(request)

    def _restart_after_short_load(self, request: Request, num_good_tokens: int, resume_status: RequestStatus) -> None:
        """Keep the prefix whose KV arrived whole (in the prefix cache), free the rest, queue the request again.

        Its blocks past the good prefix hold KV that never arrived (and, for
        an in-step load, a step computed on it); sliding-window groups hold
        no blocks before the window of the load's end. Starting over from
        the prefix cache avoids both; the store is not asked again.
        """
        request.num_computed_tokens = num_good_tokens
        self.kv_cache_manager.commit_loaded_blocks(request)
        self.kv_cache_manager.free(request)
        self.kv_connector.load_failed(request, num_good_tokens)
        if request in self.running:
            self.running.remove(request)
        request.status = resume_status
        request.num_computed_tokens = 0
        request.num_cached_tokens = -1
        self.waiting.prepend_request(request)

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Append sampled tokens, finish and free requests that stopped, and report per request.

        Only requests that `scheduler_output` scheduled and that are still
        running take tokens: one aborted while the step ran is skipped.
        """
        outputs: list[EngineCoreOutput] = []
        finished_ids: set[str] = set()
        if model_runner_output.kv_connector_output is not None:
            self._apply_kv_connector_output(model_runner_output.kv_connector_output)
        logprobs = model_runner_output.logprobs
        for index, request_id in enumerate(model_runner_output.req_ids):
            request = self.requests.get(request_id)
            if (
                request is None
                or request.status != RequestStatus.RUNNING
                or request_id not in scheduler_output.num_scheduled_tokens
            ):
                continue
            if self.encoder_cache_manager is not None and request.mm_features:
                release_computed_items(request, self.encoder_cache_manager)
            new_token_ids = self._append_tokens(request, model_runner_output.sampled_token_ids[index])
            prompt_logprobs = model_runner_output.prompt_logprobs.get(request_id)
            finished = request.is_finished()
            if new_token_ids or finished or prompt_logprobs is not None:
                queue_time, request.unreported_queue_time = request.unreported_queue_time, None
                outputs.append(
                    EngineCoreOutput(
                        request_id=request_id,
                        new_token_ids=new_token_ids,
                        new_logprobs=logprobs[index] if logprobs is not None else None,
                        new_prompt_logprobs=prompt_logprobs,
                        finish_reason=request.get_finished_reason(),
                        stop_reason=request.stop_reason,
                        num_cached_tokens=request.num_cached_tokens,
                        kv_store_tokens=request.kv_store_tokens,
                        queue_time=queue_time,
                    )
                )
            if finished:
                finished_ids.add(request_id)
                self._free_request(request)
        if finished_ids:
            self.running = [request for request in self.running if request.request_id not in finished_ids]
        return outputs

    def _append_tokens(self, request: Request, sampled_token_ids: list[int]) -> list[int]:
        """Append tokens one by one; tokens after a stop are dropped."""
        new_token_ids: list[int] = []
        for token_id in sampled_token_ids:
            request.append_output_token_ids(token_id)
            new_token_ids.append(token_id)
            if check_stop(request, self.max_model_len):
                break
        return new_token_ids

    def finish_requests(self, request_ids: str | Iterable[str], finished_status: RequestStatus) -> None:
        """Finish requests from outside the step (abort, error); unknown ids are ignored."""
        if not RequestStatus.is_finished(finished_status):
            raise ValueError(f"finished_status must be a FINISHED_* status, got {finished_status.name}")
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        known_ids = [request_id for request_id in dict.fromkeys(request_ids) if request_id in self.requests]
        finished = [self.requests[request_id] for request_id in known_ids]
        finished_running = {request.request_id for request in finished if request.status == RequestStatus.RUNNING}
        finished_loading = {request.request_id for request in finished if self.kv_loads.is_parked(request.request_id)}
        self.running = [request for request in self.running if request.request_id not in finished_running]
        self.waiting.remove_requests(request for request in finished
                                     if request.request_id not in finished_running | finished_loading)
        for request in finished:
            request.status = finished_status
            self._free_request(request)

    def _free_request(self, request: Request) -> None:
        for connector in self.connectors:
            connector.request_finished(request)
        self._free_encoder_inputs(request)
        # A load still writing into its blocks frees them when it ends.
        if not self.kv_loads.request_finished(request):
            self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        self.finished_req_ids.add(request.request_id)

    def has_unfinished_requests(self) -> bool:
        """Whether steps are still needed: requests to run, loads to finish, or blocks waiting to be freed."""
        return self.get_num_unfinished_requests() > 0 or self.kv_loads.has_orphans()

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running) + self.kv_loads.num_parked

    def shutdown(self) -> None:
        for connector in self.connectors:
            connector.close()

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache (and unreferenced encoder outputs); False while any request holds blocks."""
        if not self.kv_cache_manager.reset_prefix_cache():
            return False
        if self.encoder_cache_manager is not None:
            self.encoder_cache_manager.reset()
        return True

    def make_stats(self) -> SchedulerStats:
        interval = self.kv_cache_manager.make_prefix_cache_stats()
        if interval is not None:
            self._prefix_cache_totals += interval
        return SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting) + self.kv_loads.num_parked,
            kv_cache_usage=self.kv_cache_manager.usage,
            num_free_blocks=self.kv_cache_manager.get_num_free_blocks(),
            num_blocks=self.kv_cache_config.num_blocks,
            prefix_cache_queries=self._prefix_cache_totals.queries,
            prefix_cache_hits=self._prefix_cache_totals.hits,
            num_preemptions=self.num_preemptions,
        )

