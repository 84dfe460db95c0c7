"""Engine layer: turns `EngineCoreOutput`s into user-facing `RequestOutput`s.

Per request it keeps a detokenizer, the logprobs gathered so far and the
timing metrics. Stop strings are found here (they need text), so a request
that hits one is reported back to the caller for aborting in the core.
`n > 1` requests fan out into child requests in the core and fan back in here
through a `ParentRequest`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from pagoda.core.outputs import EngineCoreOutput, FinishReason
from pagoda.engine.detokenizer import IncrementalDetokenizer
from pagoda.engine.iteration_stats import IterationStats
from pagoda.engine.logprobs import LogprobsProcessor
from pagoda.engine.messages import EngineCoreRequest
from pagoda.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagoda.sampling_params import RequestOutputKind


@dataclass
class ParentRequest:
    """Collects the `n` child sequences of one user request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    n: int
    output_kind: RequestOutputKind
    metrics: RequestMetrics
    child_outputs: dict[int, CompletionOutput] = field(default_factory=dict)
    num_finished: int = 0

    def child_id(self, index: int) -> str:
        return self.request_id if self.n == 1 else f"{index}_{self.request_id}"


@dataclass
class RequestState:
    """One sequence the core is computing."""

    request_id: str
    index: int
    parent: ParentRequest
    detokenizer: IncrementalDetokenizer
    logprobs: LogprobsProcessor
    output_token_ids: list[int] = field(default_factory=list)
    num_tokens_sent: int = 0
    num_logprobs_sent: int = 0


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.request_states: dict[str, RequestState] = {}
        self.parents: dict[str, ParentRequest] = {}

    def add_request(self, parent: ParentRequest, index: int, request: EngineCoreRequest) -> None:
        self.parents[parent.request_id] = parent
        params = request.sampling_params
        self.request_states[request.request_id] = RequestState(
            request_id=request.request_id,
            index=index,
            parent=parent,
            detokenizer=IncrementalDetokenizer(self._tokenizer, request.prompt_token_ids, params),
            logprobs=LogprobsProcessor(self._tokenizer, params),
        )

    def check_request_ids(self, request_id: str, core_request_ids: list[str]) -> None:
        """Refuse a request whose id, or the id of one of its `n` sequences, is already in flight.

        Sequence ids are derived from the user's id (`0_x`, `1_x`, ...), so a
        user id may collide with another request's sequence id.
        """
        taken = [i for i in core_request_ids if i in self.request_states]
        if request_id in self.parents or taken:
            raise ValueError(f"request_id {request_id!r} is already in use" +
                             (f" (sequence id {taken[0]!r})" if taken else ""))

    def has_unfinished_requests(self) -> bool:
        return bool(self.request_states)

    def abort_requests(self, request_ids: list[str]) -> list[str]:
        """Forget requests the user gave up on; returns the core-side ids to abort."""
        core_ids: list[str] = []
        for request_id in request_ids:
            parent = self.parents.pop(request_id, None)
            if parent is None:
                continue
            for index in range(parent.n):
                child_id = parent.child_id(index)
                if self.request_states.pop(child_id, None) is not None:
                    core_ids.append(child_id)
        return core_ids

    def finish_aborted(
        self, request_id: str, iteration_stats: IterationStats | None = None
    ) -> tuple[list[RequestOutput], list[str]]:
        """End a request the engine stops while its caller still reads: each unfinished sequence finishes
        with "abort" (carrying what it has so far, as its output kind says). Returns those outputs, the
        last one finished, and the core-side ids to abort."""
        parent = self.parents.get(request_id)
        if parent is None:
            return [], []
        now = time.monotonic()
        outputs: list[RequestOutput] = []
        core_ids: list[str] = []
        for index in range(parent.n):
            state = self.request_states.get(parent.child_id(index))
            if state is None:
                continue
            core_ids.append(state.request_id)
            output = self._make_output(state, FinishReason.ABORT, None, now)
            if output is not None:
                outputs.append(output)
        if iteration_stats is not None and outputs and outputs[-1].finished:
            iteration_stats.update_from_finished_request(request_id, str(FinishReason.ABORT), parent.metrics)
        return outputs, core_ids

    def process_outputs(
        self, outputs: list[EngineCoreOutput], iteration_stats: IterationStats | None = None
    ) -> tuple[list[RequestOutput], list[str]]:
        """Returns the outputs to deliver and the core request ids to abort (stop strings).

        With `iteration_stats`, also records this step's latencies, token counts and finished requests.
        """
        now = time.monotonic()
        request_outputs: list[RequestOutput] = []
        to_abort: list[str] = []
        for output in outputs:
            state = self.request_states.get(output.request_id)
            if state is None:
                continue  # aborted by the user meanwhile
            if iteration_stats is not None:
                iteration_stats.update_from_output(state.parent.metrics, len(output.new_token_ids), now)
            finish_reason, stop_reason = self._update_state(state, output, now)
            if finish_reason is not None and output.finish_reason is None:
                to_abort.append(output.request_id)
            request_output = self._make_output(state, finish_reason, stop_reason, now)
            if request_output is not None:
                request_output.error = output.error
                request_output.invalid_request = output.invalid_request
                request_outputs.append(request_output)
            if iteration_stats is not None and request_output is not None and request_output.finished:
                parent = state.parent
                iteration_stats.update_from_finished_request(parent.request_id, str(finish_reason), parent.metrics)
        return request_outputs, to_abort

    def _update_state(
        self, state: RequestState, output: EngineCoreOutput, now: float
    ) -> tuple[FinishReason | None, int | str | None]:
        metrics = state.parent.metrics
        if output.queue_time is not None and metrics.queue_time is None:
            metrics.queue_time = output.queue_time
        if output.new_token_ids and metrics.first_token_time is None:
            metrics.first_token_time = now
            metrics.num_cached_tokens = output.num_cached_tokens
            metrics.kv_store_tokens = dict(output.kv_store_tokens)
        if output.new_token_ids:
            metrics.last_token_time = now
        finish_reason, stop_reason = output.finish_reason, output.stop_reason
        skip_last = finish_reason == FinishReason.STOP and not state.detokenizer.include_stop_token
        stop_string = state.detokenizer.update(output.new_token_ids, skip_last)
        state.output_token_ids.extend(output.new_token_ids)
        metrics.num_generation_tokens += len(output.new_token_ids)
        state.logprobs.update(output.new_logprobs, output.new_prompt_logprobs)
        if stop_string is not None:
            finish_reason, stop_reason = FinishReason.STOP, stop_string
        return finish_reason, stop_reason

    def _make_output(
        self,
        state: RequestState,
        finish_reason: FinishReason | None,
        stop_reason: int | str | None,
        now: float,
    ) -> RequestOutput | None:
        parent = state.parent
        finished = finish_reason is not None
        delta = parent.output_kind == RequestOutputKind.DELTA
        completion = self._make_completion(state, finish_reason, stop_reason, delta)
        if finished:
            del self.request_states[state.request_id]
            parent.num_finished += 1
        all_finished = parent.num_finished == parent.n
        if all_finished:
            parent.metrics.finished_time = now
            self.parents.pop(parent.request_id, None)
        if parent.output_kind == RequestOutputKind.FINAL_ONLY:
            parent.child_outputs[state.index] = completion
            if not all_finished:
                return None
            completions = [parent.child_outputs[i] for i in sorted(parent.child_outputs)]
        elif delta:
            completions = [completion]
        else:
            parent.child_outputs[state.index] = completion
            completions = [parent.child_outputs[i] for i in sorted(parent.child_outputs)]
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=completions,
            finished=all_finished,
            prompt_logprobs=state.logprobs.take_prompt_logprobs(delta),
            num_cached_tokens=parent.metrics.num_cached_tokens,
            metrics=parent.metrics,
        )

    def _make_completion(
        self,
        state: RequestState,
        finish_reason: FinishReason | None,
        stop_reason: int | str | None,
        delta: bool,
    ) -> CompletionOutput:
        finished = finish_reason is not None
        if delta:
            token_ids = state.output_token_ids[state.num_tokens_sent :]
            state.num_tokens_sent = len(state.output_token_ids)
        else:
            token_ids = list(state.output_token_ids)
        return CompletionOutput(
            index=state.index,
            text=state.detokenizer.get_text(finished, delta),
            token_ids=token_ids,
            cumulative_logprob=state.logprobs.cumulative_logprob,
            logprobs=state.logprobs.take_sample_logprobs(delta),
            finish_reason=None if finish_reason is None else str(finish_reason),
            stop_reason=stop_reason,
        )
