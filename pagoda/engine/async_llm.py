"""Engine layer: `AsyncLLM` — the asyncio front end over an `EngineCore` in its own process.

    engine = AsyncLLM.from_engine_args(EngineArgs(model="smollm2-135m"))
    params = SamplingParams(max_tokens=32, output_kind=RequestOutputKind.DELTA)
    async for output in engine.generate("Hello", params, request_id="req-0"):
        print(output.outputs[0].text, end="")

Input processing runs in the caller's coroutine, so a bad prompt or bad
parameters raise `ValueError` from `generate` before anything reaches the
engine. One output-handler task pulls `EngineCoreOutputs` from the
`AsyncMPClient`, turns them into `RequestOutput`s (detokenizing, stop
strings) and routes each to its request's queue. A consumer that stops
iterating early (break, task cancellation) aborts its request in the core,
which frees its KV blocks. When the engine process dies, every waiting and
every new call raises `EngineDeadError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any

from pagoda.config import PagodaConfig
from pagoda.engine.arg_utils import EngineArgs
from pagoda.engine.core_client import AsyncMPClient
from pagoda.engine.dp_client import AsyncDPClient
from pagoda.engine.exceptions import EngineDeadError
from pagoda.engine.input_processor import make_input_processor
from pagoda.engine.iteration_stats import IterationStats, StatLogger
from pagoda.engine.llm_engine import prepare_request
from pagoda.engine.messages import SchedulerStatsMessage
from pagoda.engine.output_processor import OutputProcessor
from pagoda.engine.prompt_inputs import ProcessedPrompt, PromptType, cache_salt_of
from pagoda.engine.tokenizer import load_tokenizer_in_background
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# What a request's queue carries: an output, or the error that ends the stream.
_QueueItem = RequestOutput | BaseException


class AsyncLLM:
    """Streams `RequestOutput`s for concurrent requests; belongs to the event loop it is first used in."""

    def __init__(self, config: PagodaConfig) -> None:
        self.config = config
        self.model_config = config.model_config
        tokenizer = load_tokenizer_in_background(config.model_config.path)
        self.engine_core = AsyncDPClient(config) if config.parallel_config.data_parallel_size > 1 else AsyncMPClient(config)
        self.tokenizer = tokenizer.result()
        self.input_processor = make_input_processor(config, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer.backend_tokenizer)
        # The scheduler's gauges after the latest step.
        self.scheduler_stats: SchedulerStatsMessage | None = None
        self._queues: dict[str, asyncio.Queue[_QueueItem]] = {}
        self._stat_loggers: list[StatLogger] = []
        self._output_handler: asyncio.Task[None] | None = None
        self._error: EngineDeadError | None = None

    @classmethod
    def from_engine_args(cls, engine_args: EngineArgs) -> AsyncLLM:
        return cls(engine_args.create_config())

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def add_stat_logger(self, stat_logger: StatLogger) -> None:
        """Call `stat_logger(iteration_stats, scheduler_stats)` after every engine step with outputs."""
        self._stat_loggers.append(stat_logger)

    @property
    def errored(self) -> bool:
        return self._error is not None or not self.engine_core.engine.is_alive()

    @property
    def is_running(self) -> bool:
        return not self.errored

    async def check_health(self) -> None:
        """Raises `EngineDeadError` once the engine process is gone (or the output handler failed)."""
        if self.errored:
            raise self._dead_error()

    def _dead_error(self) -> EngineDeadError:
        return self._error or EngineDeadError(self.engine_core.engine.death_message())

    async def process_prompt(self, prompt: PromptType, add_special_tokens: bool = True) -> ProcessedPrompt:
        """Tokenize a prompt and preprocess its images off the event loop (decoding and resizing an image
        takes tens to hundreds of milliseconds: other requests' streams must not wait for it)."""
        return await asyncio.to_thread(self.input_processor.process_prompt, prompt, add_special_tokens)

    async def generate(
        self,
        prompt: PromptType | ProcessedPrompt,
        sampling_params: SamplingParams,
        request_id: str,
        priority: int = 0,
        *,
        add_special_tokens: bool = True,
        cache_salt: str | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream the request's outputs as `sampling_params.output_kind` asks (DELTA, CUMULATIVE, FINAL_ONLY).

        The last output has `finished=True`; a request that failed in the
        engine ends with finish_reason "error" and `RequestOutput.error` set.
        After `abort(request_id)` from elsewhere (a server draining at shutdown), the stream ends with an
        output whose unfinished sequences have finish_reason "abort".
        """
        if self.errored:
            raise self._dead_error()
        if request_id in self._queues:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if isinstance(prompt, dict) and prompt.get("multi_modal_data"):
            cache_salt = cache_salt_of(prompt, cache_salt)  # the processed prompt no longer carries it
            prompt = await self.process_prompt(prompt, add_special_tokens)
        prepared = prepare_request(
            self.input_processor, request_id, prompt, sampling_params, priority, cache_salt,
            add_special_tokens=add_special_tokens,
        )
        self.output_processor.check_request_ids(request_id, [child.request_id for child in prepared.children])
        self._start_output_handler()
        queue: asyncio.Queue[_QueueItem] = asyncio.Queue()
        self._queues[request_id] = queue
        finished = False
        try:
            for index, child in enumerate(prepared.children):
                self.output_processor.add_request(prepared.parent, index, child)
                await self.engine_core.add_request_async(child)
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                # The consumer left early (break, cancellation, error): free the request in the core.
                # Shielded: a cancel scope around the consumer (Starlette on disconnect) must not
                # cancel the abort itself, or the core would keep the request's blocks.
                await asyncio.shield(self.abort(request_id))

    def request_ids(self) -> list[str]:
        """The requests whose outputs someone is still reading."""
        return list(self._queues)

    async def abort(self, request_id: str) -> None:
        """Stop a request: the core frees its blocks and its `generate` stream, if still read, ends with
        finish_reason "abort"; unknown ids are ignored."""
        queue = self._queues.get(request_id)
        if queue is None:
            core_ids = self.output_processor.abort_requests([request_id])
        else:
            iteration_stats = IterationStats() if self._stat_loggers else None
            outputs, core_ids = self.output_processor.finish_aborted(request_id, iteration_stats)
            for output in outputs:
                queue.put_nowait(output)
            if iteration_stats is not None and iteration_stats.finished_requests:
                self._log_stats(iteration_stats)
        if core_ids and not self.errored:
            await self.engine_core.abort_requests_async(core_ids)

    async def reset_prefix_cache(self) -> bool:
        """Drop every cached block; False while some block is still in use."""
        return await self.engine_core.reset_prefix_cache_async()

    async def flush_kv_store(self) -> bool:
        """Wait until every KV save so far reached the KV store's tiers; False without a store."""
        return await self.engine_core.flush_kv_store_async()

    async def get_scheduler_stats(self) -> SchedulerStatsMessage:
        """The scheduler's gauges now (a round trip to the engine, unlike `scheduler_stats`)."""
        return await self.engine_core.get_stats_async()

    def _start_output_handler(self) -> None:
        if self._output_handler is None:
            self._output_handler = asyncio.get_running_loop().create_task(self._handle_outputs())

    async def _handle_outputs(self) -> None:
        try:
            while True:
                outputs = await self.engine_core.get_output_async()
                iteration_stats = IterationStats() if self._stat_loggers else None
                request_outputs, to_abort = self.output_processor.process_outputs(outputs.outputs, iteration_stats)
                for output in request_outputs:
                    queue = self._queues.get(output.request_id)
                    if queue is not None:
                        queue.put_nowait(output)
                # Requests that hit a stop string are finished here; the core still runs them.
                await self.engine_core.abort_requests_async(to_abort)
                if outputs.scheduler_stats is not None:
                    self.scheduler_stats = outputs.scheduler_stats
                if iteration_stats is not None:
                    self._log_stats(iteration_stats)
        except Exception as e:
            self._error = e if isinstance(e, EngineDeadError) else EngineDeadError(f"the output handler failed: {e!r}")
            if not isinstance(e, EngineDeadError):
                logger.exception("the output handler failed")
            for queue in self._queues.values():
                queue.put_nowait(self._error)

    def _log_stats(self, iteration_stats: IterationStats) -> None:
        for stat_logger in self._stat_loggers:
            try:
                stat_logger(iteration_stats, self.scheduler_stats)
            except Exception:
                # Metrics are not worth failing requests for.
                logger.exception("stat logger %r failed", stat_logger)

    def shutdown(self) -> None:
        """Stop the output handler and the engine process; callable from outside the event loop."""
        handler = self._output_handler
        if handler is not None and not handler.get_loop().is_closed():
            handler.cancel()
        self.engine_core.shutdown()
