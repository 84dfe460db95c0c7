"""Test helper for the executor failure tests: a scheduler step that makes a worker raise."""

from __future__ import annotations

from pagoda.core.scheduler_output import CachedRequestData, SchedulerOutput


def ghost_step() -> SchedulerOutput:
    """A step that continues a request no worker has seen, so the worker's state update raises naming it."""
    return SchedulerOutput(scheduled_new_reqs=[],
                           scheduled_cached_reqs=CachedRequestData(req_ids=["ghost"], resumed_from_preemption=[False],
                                                                   new_block_ids=[None], num_computed_tokens=[0]),
                           num_scheduled_tokens={"ghost": 1}, total_num_scheduled_tokens=1)
