"""Engine layer: `EngineCore` — the loop body that schedules, executes and updates.

It owns the scheduler and the executor. At start-up it asks the workers for
their KV layer specs and free memory, sizes the block pool (`kv_cache_sizing`),
and logs how many blocks that is, why, and how many full-length requests fit
at once. With a KV store, the connector factory (`pagoda.kv_connector.factory`)
builds the scheduler side the scheduler holds; the engine knows no store class.

With pipeline parallelism, a step keeps a batch queue (as vLLM's
`step_with_batch_queue`): it schedules and sends batches until one per stage
is in flight, then waits for the oldest, so every stage has a batch to work
on. Requests of a batch in flight are not scheduled again until its tokens
are in (the scheduler has already counted them computed).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait

from pagoda.config import PagodaConfig
from pagoda.core.model_runner_output import ModelRunnerOutput
from pagoda.core.outputs import EngineCoreOutput, FinishReason
from pagoda.core.request import Request, RequestStatus
from pagoda.core.scheduler import Scheduler
from pagoda.engine.kv_cache_sizing import blocks_per_request, size_kv_cache
from pagoda.core.scheduler_output import SchedulerOutput
from pagoda.engine.messages import EngineCoreOutputs, EngineCoreRequest, SchedulerStatsMessage
from pagoda.ec_connector.factory import make_ec_scheduler_connector, with_private_ec_lookup_address
from pagoda.kv_connector.factory import make_scheduler_connector, with_private_lookup_address
from pagoda.structured_output.manager import StructuredOutputManager
from pagoda.worker.executor import Executor, PendingStep, executor_class_for

logger = logging.getLogger(__name__)

_GRAMMAR_POLL_S = 0.02  # how long an otherwise idle step waits for a grammar being compiled


class EngineCore:
    def __init__(self, config: PagodaConfig, executor_class: type[Executor] | None = None) -> None:
        started = time.monotonic()
        config, self._lookup_dir = with_private_lookup_address(config)
        config, self._ec_lookup_dir = with_private_ec_lookup_address(config)
        if config.ec_transfer_config is not None and config.model_config.mm_tokens_per_image is None:
            raise ValueError(f"--ec-store keeps image encoder outputs; {config.model_config.model!r} takes no images")
        self.config = config
        self.executor = (executor_class or executor_class_for(config))(config)
        self.executor.load_model()
        num_stages = config.parallel_config.pipeline_parallel_size
        sizing = size_kv_cache(self.executor.get_kv_cache_spec(), self.executor.determine_available_memory(),
                               config.cache_config, config.scheduler_config, num_stages)
        kv_cache_config = sizing.config
        self.executor.initialize_kv_cache(kv_cache_config)
        self.kv_cache_config = kv_cache_config
        mm_tokens_per_image = config.model_config.mm_tokens_per_image
        if mm_tokens_per_image is not None and config.scheduler_config.max_num_batched_tokens < mm_tokens_per_image:
            # An image crop's soft tokens are computed in one step (they attend to each other both ways).
            raise ValueError(
                f"max_num_batched_tokens={config.scheduler_config.max_num_batched_tokens} is below the "
                f"{mm_tokens_per_image} soft tokens of one image crop, which must be computed in one step"
            )
        self.scheduler = Scheduler(config.scheduler_config, config.cache_config, kv_cache_config,
                                   kv_connector=make_scheduler_connector(config, kv_cache_config),
                                   enable_multimodal=mm_tokens_per_image is not None,
                                   ec_connector=make_ec_scheduler_connector(config),
                                   pipeline_parallel=num_stages > 1)
        # Batches sent to the workers and not yet answered, oldest first (more than one only with stages).
        self._batch_queue: deque[tuple[SchedulerOutput, PendingStep]] = deque()
        self._max_batches_in_flight = num_stages
        self.structured_output = StructuredOutputManager(config.model_config, config.scheduler_config.max_num_seqs)
        # Constrained requests whose grammar is still compiling: they join the scheduler when it is ready.
        self._awaiting_grammar: dict[str, tuple[Request, Future]] = {}
        max_len = config.scheduler_config.max_model_len
        blocks_needed = blocks_per_request(kv_cache_config, max_len, config.scheduler_config.max_num_batched_tokens)
        if blocks_needed > kv_cache_config.num_blocks - 1:
            # Such a request could never be scheduled; refuse now rather than hang later.
            raise ValueError(
                f"the KV cache holds {kv_cache_config.num_blocks - 1} blocks but one request of "
                f"max_model_len={max_len} tokens needs {blocks_needed}: raise kv_cache_memory or lower max_model_len"
            )
        concurrency = (kv_cache_config.num_blocks - 1) / blocks_needed
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB: %s), %d groups; max concurrency at %d tokens: %.2fx; "
            "engine ready in %.1f s",
            kv_cache_config.num_blocks, kv_cache_config.block_size,
            kv_cache_config.num_blocks * kv_cache_config.bytes_per_block / 2**20, sizing.reason,
            len(kv_cache_config.groups), max_len, concurrency, time.monotonic() - started,
        )

    def add_request(self, request: EngineCoreRequest) -> None:
        constraint = request.sampling_params.structured_outputs
        scheduled = (
            Request(
                request_id=request.request_id,
                prompt_token_ids=request.prompt_token_ids,
                sampling_params=request.sampling_params,
                eos_token_id=request.eos_token_id,
                arrival_time=request.arrival_time,
                priority=request.priority,
                cache_salt=request.cache_salt,
                mm_features=request.mm_features,
            )
        )
        if constraint is None:
            self.scheduler.add_request(scheduled)
        else:
            self._awaiting_grammar[request.request_id] = (scheduled, self.structured_output.compile(constraint))

    def abort_requests(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._awaiting_grammar.pop(request_id, None)
            self.structured_output.free(request_id)
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def step(self) -> EngineCoreOutputs:
        if self._max_batches_in_flight > 1:
            return self._step_with_batch_queue()
        outputs = self._admit_compiled()
        if not self.scheduler.has_unfinished_requests():
            return EngineCoreOutputs(outputs=outputs)
        scheduler_output = self._schedule()
        model_output = self.executor.execute_model(scheduler_output)
        return self._finish_step(scheduler_output, model_output, outputs)

    def _step_with_batch_queue(self) -> EngineCoreOutputs:
        """Send another batch if a stage is free and there is work; otherwise wait for the oldest batch."""
        outputs = self._admit_compiled()
        queue = self._batch_queue
        if len(queue) < self._max_batches_in_flight and self.scheduler.has_unfinished_requests():
            scheduler_output = self._schedule()
            queue.append((scheduler_output, self.executor.submit_step(scheduler_output)))
            if len(queue) < self._max_batches_in_flight and scheduler_output.total_num_scheduled_tokens > 0:
                return EngineCoreOutputs(outputs=outputs)  # fill the next stage before waiting
        if not queue:
            return EngineCoreOutputs(outputs=outputs)
        scheduler_output, pending = queue.popleft()
        return self._finish_step(scheduler_output, pending.result(), outputs)

    def _schedule(self) -> SchedulerOutput:
        scheduler_output = self.scheduler.schedule()
        if self.structured_output.num_matchers:
            scheduler_output.grammar_bitmask = self.structured_output.bitmask(self._sampling_request_ids(
                scheduler_output))
        return scheduler_output

    def _finish_step(self, scheduler_output: SchedulerOutput, model_output: ModelRunnerOutput,
                     outputs: list[EngineCoreOutput]) -> EngineCoreOutputs:
        outputs += self.scheduler.update_from_output(scheduler_output, model_output)
        if self.structured_output.num_matchers:
            self._advance_grammars(outputs)
        return EngineCoreOutputs(outputs=outputs, scheduler_stats=self.make_stats())

    def _admit_compiled(self) -> list[EngineCoreOutput]:
        """Move constrained requests whose grammar is ready into the scheduler; fail those whose grammar failed.

        With nothing else to run, waits a little for a compilation rather than spinning the loop.
        """
        if not self._awaiting_grammar:
            return []
        if not self.scheduler.has_unfinished_requests():
            wait([future for _, future in self._awaiting_grammar.values()], timeout=_GRAMMAR_POLL_S,
                 return_when=FIRST_COMPLETED)
        outputs: list[EngineCoreOutput] = []
        for request_id, (request, future) in list(self._awaiting_grammar.items()):
            if not future.done():
                continue
            del self._awaiting_grammar[request_id]
            error = future.exception()
            if error is not None:
                outputs.append(EngineCoreOutput(request_id=request_id, new_token_ids=[],
                                                finish_reason=FinishReason.ERROR, error=str(error),
                                                invalid_request=isinstance(error, ValueError)))
                continue
            self.structured_output.start(request_id, future.result())
            self.scheduler.add_request(request)
        return outputs

    def _sampling_request_ids(self, scheduler_output: SchedulerOutput) -> list[str]:
        """The scheduled requests that sample a token this step (their prompt is computed by its end)."""
        requests = self.scheduler.requests
        return [request_id for request_id in scheduler_output.num_scheduled_tokens
                if self.structured_output.is_constrained(request_id)
                and requests[request_id].num_computed_tokens >= requests[request_id].num_tokens]

    def _advance_grammars(self, outputs: list[EngineCoreOutput]) -> None:
        """Feed each constrained request's new tokens to its matcher; stop it where its grammar is complete."""
        for output in outputs:
            request_id = output.request_id
            if not self.structured_output.is_constrained(request_id):
                continue
            problem = self.structured_output.accept(request_id, output.new_token_ids) if output.new_token_ids else None
            if output.finished:
                self.structured_output.free(request_id)
            elif problem == "complete":  # under ignore_eos: the grammar's end-of-sequence was not taken as one
                self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_STOPPED)
                self.structured_output.free(request_id)
                output.finish_reason = FinishReason.STOP
            elif problem == "rejected":
                output.error = f"structured output: {self.structured_output.rejection(request_id)}"
                self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ERROR)
                self.structured_output.free(request_id)
                output.finish_reason = FinishReason.ERROR

    def fail_requests(self, error: str) -> EngineCoreOutputs:
        """Finish every unfinished request with `FinishReason.ERROR` (a step raised), freeing its blocks."""
        request_ids = list(self.scheduler.requests) + list(self._awaiting_grammar)
        self._awaiting_grammar.clear()
        for request_id in request_ids:
            self.structured_output.free(request_id)
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ERROR)
        outputs = [
            EngineCoreOutput(request_id=request_id, new_token_ids=[], finish_reason=FinishReason.ERROR, error=error)
            for request_id in request_ids
        ]
        return EngineCoreOutputs(outputs=outputs, scheduler_stats=self.make_stats())

    def make_stats(self) -> SchedulerStatsMessage:
        stats = self.scheduler.make_stats()
        return SchedulerStatsMessage(
            num_running_reqs=stats.num_running_reqs,
            num_waiting_reqs=stats.num_waiting_reqs + len(self._awaiting_grammar),
            kv_cache_usage=stats.kv_cache_usage,
            prefix_cache_queries=stats.prefix_cache_queries,
            prefix_cache_hits=stats.prefix_cache_hits,
            num_preemptions=stats.num_preemptions,
            kv_store=self.executor.kv_store_metrics(),
            multimodal=self._multimodal_metrics(),
        )

    def _multimodal_metrics(self) -> dict[str, dict[str, float]] | None:
        manager = self.scheduler.encoder_cache_manager
        if manager is None:
            return None
        return {"encoder_cache": manager.metrics(), **(self.executor.mm_metrics() or {})}

    def has_unfinished_requests(self) -> bool:
        return bool(self._awaiting_grammar or self._batch_queue) or self.scheduler.has_unfinished_requests()

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.reset_prefix_cache()

    def flush_kv_store(self) -> bool:
        return self.executor.flush_kv_store()

    def shutdown(self) -> None:
        self.structured_output.shutdown()
        self.scheduler.shutdown()
        self.executor.shutdown()
        for folder in (self._lookup_dir, self._ec_lookup_dir):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

