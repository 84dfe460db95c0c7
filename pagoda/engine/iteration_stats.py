"""Engine layer: what one engine step did for its requests, as the front end saw it, for metrics.

`OutputProcessor.process_outputs` fills an `IterationStats` per step: time to
first token, inter-token latencies, token counts and the requests that
finished. `AsyncLLM` hands it, with the scheduler's latest
`SchedulerStatsMessage`, to every `StatLogger` registered with
`add_stat_logger`. Times are `time.monotonic()` seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pagoda.engine.messages import SchedulerStatsMessage
from pagoda.outputs import RequestMetrics


@dataclass(frozen=True, slots=True)
class FinishedRequestStats:
    request_id: str
    finish_reason: str | None  # "stop", "length", "abort" or "error"
    e2e_latency: float
    num_prompt_tokens: int
    num_generation_tokens: int
    num_cached_tokens: int
    queue_time: float | None  # None: aborted before it ever ran


@dataclass(slots=True)
class IterationStats:
    num_prompt_tokens: int = 0  # prompts of the requests that got their first token in this step
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)

    def update_from_output(self, metrics: RequestMetrics, num_new_tokens: int, now: float) -> None:
        """Count one request's new tokens; call before `metrics` takes them in."""
        if num_new_tokens == 0:
            return
        self.num_generation_tokens += num_new_tokens
        if metrics.first_token_time is None:
            self.num_prompt_tokens += metrics.num_prompt_tokens
            self.time_to_first_tokens.append(now - metrics.arrival_time)
        elif metrics.last_token_time is not None:
            self.inter_token_latencies.append(now - metrics.last_token_time)

    def update_from_finished_request(self, request_id: str, finish_reason: str | None, metrics: RequestMetrics) -> None:
        """Record a request whose every sequence has finished; `metrics.finished_time` is set."""
        self.finished_requests.append(
            FinishedRequestStats(
                request_id=request_id,
                finish_reason=finish_reason,
                e2e_latency=metrics.e2e_latency or 0.0,
                num_prompt_tokens=metrics.num_prompt_tokens,
                num_generation_tokens=metrics.num_generation_tokens,
                num_cached_tokens=metrics.num_cached_tokens,
                queue_time=metrics.queue_time,
            )
        )


# Called once per engine step that produced outputs; must be quick (it runs in the output handler).
StatLogger = Callable[[IterationStats, SchedulerStatsMessage | None], None]
