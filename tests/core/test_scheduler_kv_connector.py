"""Scheduler with a KV connector: in-step and async loads, confirmation, rewind, delayed free, saves."""

from __future__ import annotations

import pytest
from core_helpers import make_kv_cache_config, make_request, make_scheduler

from pagoda.config import KVTransferConfig
from pagoda.kv_store_spec import parse_kv_store_spec
from pagoda.core.block_hash import get_hash_fn
from pagoda.core.connector.kv_metadata import KVConnectorOutput, LoadResult
from pagoda.core.model_runner_output import ModelRunnerOutput
from pagoda.core.request import RequestStatus
from pagoda.core.scheduler import Scheduler
from pagoda.kv_connector.layout import StoreLayout
from pagoda.kv_connector.scheduler_side import KVConnectorScheduler
from pagoda.kvstore.keys import CacheEngineKey

BLOCK, CHUNK = 4, 8
PROMPT = list(range(2, 32))  # 30 tokens: three full chunks and a tail


class FakeLookup:
    """Says the first `num_stored` chunks are in the store."""

    def __init__(self, num_stored: int) -> None:
        self.num_stored = num_stored
        self.calls = 0

    def lookup(self, keys: list[CacheEngineKey], prefetch: bool = False) -> int:
        self.calls += 1
        return min(self.num_stored, len(keys))


def connected_scheduler(num_stored: int, load_mode: str = "layerwise", **kwargs: object) -> tuple[Scheduler,
                                                                                                  FakeLookup]:
    lookup = FakeLookup(num_stored)
    config = KVTransferConfig(parse_kv_store_spec("cpu:64MiB"), chunk_size=CHUNK, load_mode=load_mode)
    layout = StoreLayout("model", "float32", make_kv_cache_config(100, BLOCK), CHUNK)
    connector = KVConnectorScheduler(config, layout, lookup, get_hash_fn("sha256"))
    scheduler = make_scheduler(block_size=BLOCK, kv_connector=connector, **kwargs)
    scheduler.add_request(make_request("a", PROMPT, block_size=None, max_tokens=4))
    return scheduler, lookup


def runner_output(req_ids: list[str], sampled: list[list[int]], loads: dict[str, LoadResult]) -> ModelRunnerOutput:
    return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled,
                             kv_connector_output=KVConnectorOutput(finished_loads=loads))


def num_cached_blocks(scheduler: Scheduler) -> int:
    return len(scheduler.kv_cache_manager.block_pool.cached_block_hash_to_block)


def test_in_step_load_computes_only_the_tail_and_caches_after_confirmation() -> None:
    scheduler, _ = connected_scheduler(num_stored=3)
    output = scheduler.schedule()
    assert output.num_scheduled_tokens == {"a": 6}
    (load,) = output.kv_connector_metadata.loads
    assert (load.start, load.end, load.first_chunk, len(load.chunk_hashes), load.is_async) == (0, 24, 0, 3, False)
    assert output.kv_connector_metadata.saves == []  # everything complete is in the store already
    assert num_cached_blocks(scheduler) == 0  # not before the load is confirmed

    outs = scheduler.update_from_output(output, runner_output(["a"], [[7]], {"a": LoadResult(
        num_computed_tokens=24, complete=True, tokens_by_tier={"cpu": 24})}))
    assert outs[0].new_token_ids == [7]
    assert outs[0].num_cached_tokens == 24 and outs[0].kv_store_tokens == {"cpu": 24}
    assert num_cached_blocks(scheduler) == 30 // BLOCK


def test_short_in_step_load_restarts_from_the_good_prefix_and_saves_the_rest_again() -> None:
    scheduler, lookup = connected_scheduler(num_stored=3)
    output = scheduler.schedule()
    outs = scheduler.update_from_output(output, runner_output(["a"], [[]], {"a": LoadResult(
        num_computed_tokens=8, complete=False, tokens_by_tier={"cpu": 8})}))
    request = scheduler.requests["a"]
    assert outs == [] and request.num_output_tokens == 0 and not scheduler.running
    assert request.status == RequestStatus.PREEMPTED  # the worker saw it: it comes back as resumed
    assert num_cached_blocks(scheduler) == 8 // BLOCK  # only the KV that arrived
    calls = lookup.calls
    output = scheduler.schedule()
    # The good prefix comes back from the prefix cache; the store is not asked again.
    assert output.num_scheduled_tokens == {"a": 22} and lookup.calls == calls
    assert output.scheduled_cached_reqs.resumed_from_preemption == [True]
    assert output.kv_connector_metadata.loads == []
    # Chunks past the good prefix were computed on missing KV in the failed step: saved again now.
    assert [(s.first_chunk, len(s.chunk_hashes)) for s in output.kv_connector_metadata.saves] == [(1, 2)]


def run_until_done(scheduler: Scheduler, max_steps: int = 60) -> bool:
    """Drive the scheduler with a worker whose loads all succeed."""
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return True
        output = scheduler.schedule()
        ids = list(output.num_scheduled_tokens)
        loads = {load.req_id: LoadResult(num_computed_tokens=load.end, complete=True) for load in output.kv_connector_metadata.loads}
        sampled = [[7] if scheduler.requests[r].num_computed_tokens >= scheduler.requests[r].num_tokens else []
                   for r in ids]
        scheduler.update_from_output(output, runner_output(ids, sampled, loads))
    return False


def test_parked_requests_never_hold_the_pool_hostage() -> None:
    # 12 usable blocks, 8 per request: a second request must not park on blocks the first needs.
    scheduler, _ = connected_scheduler(num_stored=3, load_mode="async", num_blocks=13)
    scheduler.add_request(make_request("b", PROMPT, block_size=None, max_tokens=4))
    assert run_until_done(scheduler)


def test_store_hit_takes_only_the_window_in_sliding_groups() -> None:
    # 14 usable blocks: the whole prompt in both groups (8 + 8) would never fit; window + tail does.
    scheduler, _ = connected_scheduler(num_stored=3, num_blocks=15, sliding_windows=(8,),
                                       max_num_batched_tokens=8)
    output = scheduler.schedule()
    assert output.num_scheduled_tokens == {"a": 6}
    sliding_blocks = output.kv_connector_metadata.loads[0].block_ids[1]
    assert sliding_blocks[:4] == [0, 0, 0, 0]  # positions before the window of 24 hold the null block
    scheduler.update_from_output(output, runner_output(["a"], [[7]], {"a": LoadResult(num_computed_tokens=24, complete=True)}))
    assert run_until_done(scheduler)


def test_async_load_parks_the_request_and_resumes_without_a_second_lookup() -> None:
    scheduler, lookup = connected_scheduler(num_stored=3, load_mode="async")
    output = scheduler.schedule()
    request = scheduler.requests["a"]
    assert output.num_scheduled_tokens == {} and request.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert output.kv_connector_metadata.loads[0].is_async
    assert scheduler.has_unfinished_requests()

    idle = scheduler.schedule()  # nothing to run while the load is in flight
    scheduler.update_from_output(idle, runner_output([], [], {}))
    assert request.status == RequestStatus.WAITING_FOR_REMOTE_KVS

    scheduler.update_from_output(idle, runner_output([], [], {"a": LoadResult(num_computed_tokens=24, complete=True,
                                                                              tokens_by_tier={"disk": 24})}))
    assert request.status == RequestStatus.WAITING and request.num_computed_tokens == 24
    calls = lookup.calls
    output = scheduler.schedule()
    assert output.num_scheduled_tokens == {"a": 6} and lookup.calls == calls
    assert output.scheduled_new_reqs[0].num_computed_tokens == 24
    outs = scheduler.update_from_output(output, runner_output(["a"], [[7]], {}))
    assert outs[0].num_cached_tokens == 24 and outs[0].kv_store_tokens == {"disk": 24}


def test_abort_during_async_load_frees_blocks_only_when_the_load_ends() -> None:
    scheduler, _ = connected_scheduler(num_stored=3, load_mode="async")
    free_before = scheduler.kv_cache_manager.get_num_free_blocks()
    output = scheduler.schedule()
    held = free_before - scheduler.kv_cache_manager.get_num_free_blocks()
    assert held == -(-30 // BLOCK)  # the whole prompt, taken when it parks
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert scheduler.kv_cache_manager.get_num_free_blocks() == free_before - held  # still being written
    assert scheduler.has_unfinished_requests() and scheduler.get_num_unfinished_requests() == 0
    scheduler.update_from_output(output, runner_output([], [], {"a": LoadResult(num_computed_tokens=24, complete=True)}))
    assert scheduler.kv_cache_manager.get_num_free_blocks() == free_before
    assert not scheduler.has_unfinished_requests()


@pytest.mark.parametrize("budget, expected", [(16, [(0, 2), (2, 1)]), (64, [(0, 3)])])
def test_each_completed_prompt_chunk_is_saved_once(budget: int, expected: list[tuple[int, int]]) -> None:
    scheduler, _ = connected_scheduler(num_stored=0, max_num_batched_tokens=budget)
    saves = []
    for _ in range(4):
        output = scheduler.schedule()
        saves += [(s.first_chunk, len(s.chunk_hashes)) for s in output.kv_connector_metadata.saves]
        ids = list(output.num_scheduled_tokens)
        scheduler.update_from_output(output, runner_output(ids, [[7]] * len(ids), {}))
    assert saves == expected  # generated tokens are never saved


def test_prompt_logprobs_requests_never_load() -> None:
    config = KVTransferConfig(parse_kv_store_spec("cpu:64MiB"), chunk_size=CHUNK)
    layout = StoreLayout("model", "float32", make_kv_cache_config(100, BLOCK), CHUNK)
    connector = KVConnectorScheduler(config, layout, FakeLookup(3), get_hash_fn("sha256"))
    scheduler = make_scheduler(block_size=BLOCK, kv_connector=connector)
    scheduler.add_request(make_request("p", PROMPT, block_size=None, prompt_logprobs=1))
    output = scheduler.schedule()
    assert output.num_scheduled_tokens == {"p": 30} and output.kv_connector_metadata.loads == []


def test_short_async_load_queues_the_request_again_as_it_was_parked() -> None:
    scheduler, lookup = connected_scheduler(num_stored=3, load_mode="async")
    idle = scheduler.schedule()
    request = scheduler.requests["a"]
    scheduler.update_from_output(idle, runner_output([], [], {"a": LoadResult(
        num_computed_tokens=8, complete=False, tokens_by_tier={"cpu": 8})}))
    assert request.status == RequestStatus.WAITING and request.num_computed_tokens == 0
    assert num_cached_blocks(scheduler) == 8 // BLOCK and scheduler.kv_loads.num_parked == 0
    calls = lookup.calls
    output = scheduler.schedule()
    # Never seen by the worker: sent as new, from the good prefix in the prefix cache, without a store load.
    assert output.num_scheduled_tokens == {"a": 22} and lookup.calls == calls
    assert output.scheduled_new_reqs[0].num_computed_tokens == 8
    assert output.kv_connector_metadata.loads == []
    assert [(s.first_chunk, len(s.chunk_hashes)) for s in output.kv_connector_metadata.saves] == [(1, 2)]
