"""Scheduler driven step by step with a fake model runner (block size 4 unless stated)."""

from __future__ import annotations

import time

import pytest
from core_helpers import FakeRunner, make_request, make_scheduler, next_token

from pagoda.core.model_runner_output import LogprobsLists, ModelRunnerOutput
from pagoda.core.outputs import FinishReason
from pagoda.core.request import RequestStatus
from pagoda.core.scheduler import Scheduler


def add(scheduler: Scheduler, request_id: str, prompt_len: int, offset: int = 0, **kwargs: object) -> None:
    """Add a request (the scheduler attaches the block hasher)."""
    prompt = [offset + i + 2 for i in range(prompt_len)]
    scheduler.add_request(make_request(request_id, prompt, block_size=None, **kwargs))


def test_token_budget_is_respected_and_filled() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=32)
    for i in range(5):
        add(scheduler, str(i), 30, offset=100 * i)
    runner = FakeRunner(scheduler)
    totals = []
    while scheduler.has_unfinished_requests():
        demand = sum(r.num_tokens - r.num_computed_tokens for r in scheduler.requests.values())
        output, _ = runner.step()
        assert output.total_num_scheduled_tokens == sum(output.num_scheduled_tokens.values())
        totals.append(output.total_num_scheduled_tokens)
        # The budget is used up whenever there is that much work.
        assert output.total_num_scheduled_tokens == min(32, demand)
    assert totals[:4] == [32, 32, 32, 32] and max(totals) == 32


def test_max_num_seqs_is_respected() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    for i in range(5):
        add(scheduler, str(i), 6, offset=10 * i)
    runner = FakeRunner(scheduler)
    while scheduler.has_unfinished_requests():
        output, _ = runner.step()
        assert len(output.num_scheduled_tokens) <= 2 and len(scheduler.running) <= 2


def test_long_prompt_is_chunked() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=16)
    add(scheduler, "long", 50, max_tokens=3)
    runner = FakeRunner(scheduler)
    steps = [runner.step() for _ in range(6)]
    assert [out.num_scheduled_tokens["long"] for out, _ in steps] == [16, 16, 16, 2, 1, 1]
    assert [[o.new_token_ids for o in outs] for _, outs in steps[:3]] == [[], [], []]
    assert len(steps[3][1][0].new_token_ids) == 1
    assert steps[5][1][0].finish_reason == FinishReason.LENGTH


def test_chunked_prefill_off_waits_for_room() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=256, enable_chunked_prefill=False)
    add(scheduler, "a", 200)
    add(scheduler, "b", 100, offset=1000)
    output = scheduler.schedule()
    assert output.num_scheduled_tokens == {"a": 200}  # b would need chunking: it waits
    scheduler.update_from_output(output, ModelRunnerOutput(req_ids=["a"], sampled_token_ids=[[7]]))
    assert scheduler.schedule().num_scheduled_tokens == {"a": 1, "b": 100}


def test_running_requests_come_before_waiting_ones() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=8)
    add(scheduler, "a", 4)
    runner = FakeRunner(scheduler)
    runner.step()
    add(scheduler, "b", 20, offset=50)
    output, _ = runner.step()
    assert list(output.num_scheduled_tokens.items()) == [("a", 1), ("b", 7)]
    assert output.scheduled_cached_reqs.req_ids == ["a"]
    assert [new.req_id for new in output.scheduled_new_reqs] == ["b"]


def run_all(
    scheduler: Scheduler, specs: list[tuple[str, int, int]], runner: FakeRunner | None = None
) -> dict[str, list[int]]:
    for request_id, prompt_len, max_tokens in specs:
        add(scheduler, request_id, prompt_len, offset=7 * len(request_id) + prompt_len, max_tokens=max_tokens)
    return (runner or FakeRunner(scheduler)).run()


SPECS = [(f"r{i}", 5 + 3 * i, 12 + i) for i in range(6)]


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_preemption_gives_the_same_tokens_as_a_big_pool(enable_prefix_caching: bool, policy: str) -> None:
    expected = run_all(make_scheduler(num_blocks=200), SPECS)
    tiny = make_scheduler(num_blocks=14, enable_prefix_caching=enable_prefix_caching, policy=policy)
    runner = FakeRunner(tiny)
    assert run_all(tiny, SPECS, runner) == expected
    assert tiny.make_stats().num_preemptions > 0
    assert any(any(out.scheduled_cached_reqs.resumed_from_preemption) for out in runner.scheduler_outputs)
    assert tiny.kv_cache_manager.get_num_free_blocks() == 13


def test_preempted_request_goes_to_the_front_of_waiting_and_resumes() -> None:
    scheduler = make_scheduler(num_blocks=7)  # 6 usable blocks
    add(scheduler, "a", 8, max_tokens=50)
    add(scheduler, "b", 8, offset=40, max_tokens=50)
    add(scheduler, "c", 4, offset=80, max_tokens=50)
    runner = FakeRunner(scheduler)
    runner.step()  # a: blocks 1-2, b: 3-4, c: 5; block 6 free
    add(scheduler, "d", 4, offset=120)
    output, _ = runner.step()
    # a takes block 6; b needs one more: c (the latest) is preempted, and nobody is admitted.
    assert output.num_scheduled_tokens == {"a": 1, "b": 1}
    request_c = scheduler.requests["c"]
    assert request_c.status == RequestStatus.PREEMPTED and request_c.num_computed_tokens == 0
    assert request_c.num_preemptions == 1 and scheduler.make_stats().num_preemptions == 1
    assert [r.request_id for r in scheduler.waiting] == ["c", "d"]
    assert scheduler.kv_cache_manager.get_block_ids("a") == ([1, 2, 6],)
    assert scheduler.kv_cache_manager.get_block_ids("b") == ([3, 4, 5],)

    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    output, _ = runner.step()
    cached = output.scheduled_cached_reqs
    assert cached.req_ids == ["b", "c"] and cached.resumed_from_preemption == [False, True]
    assert cached.new_block_ids[1] == scheduler.kv_cache_manager.get_block_ids("c")
    assert output.num_scheduled_tokens["c"] == 5  # prompt and its one output token, recomputed
    assert [new.req_id for new in output.scheduled_new_reqs] == ["d"]


def test_prefix_cache_hit_is_reported_in_tokens() -> None:
    scheduler = make_scheduler()
    shared = list(range(2, 14))  # three full blocks
    scheduler.add_request(make_request("a", shared + [50, 51], block_size=None))
    runner = FakeRunner(scheduler)
    _, outputs = runner.step()
    assert outputs[0].num_cached_tokens == 0
    scheduler.add_request(make_request("b", shared + [60, 61, 62], block_size=None))
    output, outputs = runner.step()
    assert output.scheduled_new_reqs[0].num_computed_tokens == 12
    assert output.num_scheduled_tokens["b"] == 3
    by_id = {o.request_id: o for o in outputs}
    assert by_id["b"].num_cached_tokens == 12
    stats = scheduler.make_stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (14 + 15, 12)
    assert scheduler.make_stats().prefix_cache_hits == 12  # cumulative


def test_prompt_logprobs_disable_the_prefix_hit() -> None:
    scheduler = make_scheduler()
    add(scheduler, "a", 14)
    runner = FakeRunner(scheduler)
    runner.step()
    add(scheduler, "b", 14, prompt_logprobs=0)
    output, _ = runner.step()
    assert output.num_scheduled_tokens["b"] == 14


def scripted(scheduler: Scheduler, script: list[int]) -> FakeRunner:
    return FakeRunner(scheduler, sample=lambda request: script[request.num_output_tokens])


def finish_of(scheduler: Scheduler, script: list[int], **kwargs: object) -> tuple[list[int], FinishReason, object]:
    add(scheduler, "r", 3, **kwargs)
    runner = scripted(scheduler, script)
    tokens: list[int] = []
    while True:
        _, outputs = runner.step()
        tokens += outputs[0].new_token_ids
        if outputs[0].finished:
            return tokens, outputs[0].finish_reason, outputs[0].stop_reason


EOS = 1


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, ([5, 6, EOS], FinishReason.STOP, None)),
        ({"ignore_eos": True, "max_tokens": 5}, ([5, 6, EOS, 7, 8], FinishReason.LENGTH, None)),
        ({"min_tokens": 4, "max_tokens": 6}, ([5, 6, EOS, 7, 8, 9], FinishReason.LENGTH, None)),
        ({"stop_token_ids": [6]}, ([5, 6], FinishReason.STOP, 6)),
        ({"stop_token_ids": [6], "min_tokens": 2}, ([5, 6], FinishReason.STOP, 6)),
        ({"stop_token_ids": [6], "min_tokens": 3}, ([5, 6, EOS], FinishReason.STOP, None)),
        ({"max_tokens": 2}, ([5, 6], FinishReason.LENGTH, None)),
        ({"max_tokens": 3, "stop_token_ids": [EOS]}, ([5, 6, EOS], FinishReason.LENGTH, None)),
    ],
)
def test_stop_conditions(kwargs: dict[str, object], expected: tuple[list[int], FinishReason, object]) -> None:
    assert finish_of(make_scheduler(), [5, 6, EOS, 7, 8, 9, 10], **kwargs) == expected


def test_max_model_len_caps_the_length() -> None:
    scheduler = make_scheduler(max_model_len=6)
    assert finish_of(scheduler, [5, 6, 7, 8, 9], max_tokens=None) == ([5, 6, 7], FinishReason.LENGTH, None)


def test_abort_frees_blocks_and_is_reported_once() -> None:
    scheduler = make_scheduler(num_blocks=50)
    add(scheduler, "a", 10)
    add(scheduler, "b", 10, offset=30)
    runner = FakeRunner(scheduler)
    first, _ = runner.step()
    add(scheduler, "c", 10, offset=60)
    scheduler.finish_requests(["a", "c", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert scheduler.get_num_unfinished_requests() == 1
    assert [r.request_id for r in scheduler.running] == ["b"] and not scheduler.waiting
    assert scheduler.kv_cache_manager.get_block_ids("a") == ([],)
    assert scheduler.kv_cache_manager.get_num_free_blocks() == 49 - 3
    # A runner output for the aborted request (the step was in flight) is ignored.
    outputs = scheduler.update_from_output(first, ModelRunnerOutput(req_ids=["a"], sampled_token_ids=[[5]]))
    assert outputs == []
    output, _ = runner.step()
    assert output.finished_req_ids == {"a", "c"}
    output, _ = runner.step()
    assert output.finished_req_ids == set()
    scheduler.finish_requests("b", RequestStatus.FINISHED_ABORTED)
    assert not scheduler.has_unfinished_requests()
    assert scheduler.kv_cache_manager.get_num_free_blocks() == 49
    with pytest.raises(ValueError, match="FINISHED_"):
        scheduler.finish_requests("b", RequestStatus.RUNNING)


def test_duplicate_request_id_is_rejected() -> None:
    scheduler = make_scheduler()
    add(scheduler, "dup", 4)
    with pytest.raises(ValueError, match="'dup'"):
        add(scheduler, "dup", 5)
    assert scheduler.get_num_unfinished_requests() == 1


@pytest.mark.parametrize("prompt_len", [0, 257])
def test_prompt_must_fit_max_model_len(prompt_len: int) -> None:
    scheduler = make_scheduler(max_model_len=256)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        add(scheduler, "r", prompt_len)
    add(scheduler, "ok", 256)  # a full-length prompt gets exactly one token
    assert FakeRunner(scheduler).run() == {"ok": [next_token(list(range(2, 258)))]}


def test_priority_policy_admits_by_priority_then_arrival() -> None:
    scheduler = make_scheduler(policy="priority", max_num_seqs=1)
    arrivals = [("late-low", 5, 1.0), ("high", 0, 3.0), ("early-low", 5, 0.5), ("mid", 2, 2.0)]
    for request_id, priority, arrival in arrivals:
        add(scheduler, request_id, 4, priority=priority, arrival_time=arrival, max_tokens=1)
    assert [r.request_id for r in scheduler.waiting] == ["high", "mid", "early-low", "late-low"]
    order = []
    runner = FakeRunner(scheduler)
    while scheduler.has_unfinished_requests():
        output, _ = runner.step()
        order += [new.req_id for new in output.scheduled_new_reqs]
    assert order == ["high", "mid", "early-low", "late-low"]


def test_priority_preemption_picks_the_least_important_request() -> None:
    scheduler = make_scheduler(policy="priority", num_blocks=6)  # 5 usable blocks
    add(scheduler, "low", 4, priority=9, arrival_time=0.0, max_tokens=30)
    add(scheduler, "high", 4, offset=20, priority=0, arrival_time=1.0, max_tokens=30)
    runner = FakeRunner(scheduler)
    runner.step()
    assert [r.request_id for r in scheduler.running] == ["high", "low"]
    while scheduler.requests["low"].status != RequestStatus.PREEMPTED:
        runner.step()
    assert scheduler.requests["high"].num_preemptions == 0


def test_priority_preemption_can_unschedule_an_earlier_request() -> None:
    scheduler = make_scheduler(policy="priority", num_blocks=5)  # 4 usable blocks
    add(scheduler, "low", 4, priority=9, max_tokens=30)
    runner = FakeRunner(scheduler)
    runner.step()
    add(scheduler, "high", 8, offset=20, priority=0, max_tokens=30)
    runner.step()  # low: blocks 1-2, high: blocks 3-4
    assert [r.request_id for r in scheduler.running] == ["low", "high"]
    output, _ = runner.step()
    # low was scheduled first, then high needed a block: low is preempted and unscheduled.
    assert output.num_scheduled_tokens == {"high": 1} and output.total_num_scheduled_tokens == 1
    assert output.scheduled_cached_reqs.req_ids == ["high"]
    assert scheduler.requests["low"].status == RequestStatus.PREEMPTED
    assert scheduler.kv_cache_manager.get_block_ids("high") == ([3, 4, 2],)


def test_scheduler_output_diffs() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=64)
    add(scheduler, "a", 6)
    runner = FakeRunner(scheduler)
    first, _ = runner.step()
    assert [new.req_id for new in first.scheduled_new_reqs] == ["a"]
    assert first.scheduled_new_reqs[0].block_ids == ([1, 2],)
    second, _ = runner.step()  # token 7 fits in block 2
    assert second.scheduled_new_reqs == []
    assert second.scheduled_cached_reqs.req_ids == ["a"]
    assert second.scheduled_cached_reqs.new_block_ids == [None]
    assert second.scheduled_cached_reqs.num_computed_tokens == [6]
    runner.step()
    fourth, _ = runner.step()  # token 9 needs block 3
    assert fourth.scheduled_cached_reqs.new_block_ids == [([3],)]
    assert fourth.scheduled_cached_reqs.resumed_from_preemption == [False]


def test_pipeline_stages_are_sent_the_tokens_they_did_not_sample() -> None:
    plain, staged = make_scheduler(), make_scheduler(pipeline_parallel=True)
    for scheduler in (plain, staged):
        add(scheduler, "a", 6, max_tokens=50)
    plain_runner, staged_runner = FakeRunner(plain), FakeRunner(staged)
    first, _ = staged_runner.step()
    assert first.scheduled_cached_reqs.new_token_ids == []  # a new request travels in full
    plain_runner.step()
    second, _ = staged_runner.step()
    # The step computes the one token sampled last step (position 6), which only the last stage has.
    assert second.scheduled_cached_reqs.new_token_ids == [staged.requests["a"].output_token_ids[:1]]
    assert plain_runner.step()[0].scheduled_cached_reqs.new_token_ids == []


def test_a_resumed_request_brings_every_stage_its_output_tokens() -> None:
    scheduler = make_scheduler(num_blocks=7, pipeline_parallel=True)  # 6 usable blocks, as above
    add(scheduler, "a", 8, max_tokens=50)
    add(scheduler, "b", 8, offset=40, max_tokens=50)
    add(scheduler, "c", 4, offset=80, max_tokens=50)
    runner = FakeRunner(scheduler)
    runner.step()
    runner.step()  # c is preempted with one output token
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    output, _ = runner.step()
    cached = output.scheduled_cached_reqs
    assert cached.req_ids == ["b", "c"] and cached.resumed_from_preemption == [False, True]
    # All the output tokens it had when it was preempted: one (it has sampled another since).
    assert cached.new_token_ids[1] == scheduler.requests["c"].output_token_ids[:1]
    assert len(cached.new_token_ids[1]) == 1


def test_worker_mirror_stays_in_sync() -> None:
    scheduler = make_scheduler(num_blocks=20, max_num_batched_tokens=16)
    for i in range(5):
        add(scheduler, str(i), 9 + i, offset=40 * i, max_tokens=10)
    runner = FakeRunner(scheduler)
    while scheduler.has_unfinished_requests():
        runner.step()
        for request in scheduler.running:
            scheduler_view = scheduler.kv_cache_manager.get_block_ids(request.request_id)
            assert runner.block_ids[request.request_id] == scheduler_view


def test_logprobs_are_passed_through() -> None:
    scheduler = make_scheduler()
    add(scheduler, "a", 4, logprobs=1, prompt_logprobs=1)
    output = scheduler.schedule()
    sample = LogprobsLists(token_ids=[[9, 3]], logprobs=[[-0.1, -2.0]], ranks=[1])
    prompt = LogprobsLists(token_ids=[[3], [4], [5]], logprobs=[[-1.0], [-1.5], [-0.5]], ranks=[1, 2, 1])
    runner_output = ModelRunnerOutput(
        req_ids=["a"], sampled_token_ids=[[9]], logprobs=[sample], prompt_logprobs={"a": prompt}
    )
    (out,) = scheduler.update_from_output(output, runner_output)
    assert out.new_token_ids == [9] and out.new_logprobs == sample and out.new_prompt_logprobs == prompt


def test_stats_and_reset_prefix_cache() -> None:
    scheduler = make_scheduler(num_blocks=30, max_num_seqs=1)
    add(scheduler, "a", 9, max_tokens=2)
    add(scheduler, "b", 9, offset=30, max_tokens=2)
    runner = FakeRunner(scheduler)
    runner.step()
    stats = scheduler.make_stats()
    assert (stats.num_running_reqs, stats.num_waiting_reqs, stats.num_blocks) == (1, 1, 30)
    assert stats.num_free_blocks == 29 - 3 and stats.kv_cache_usage == pytest.approx(3 / 29)
    assert scheduler.reset_prefix_cache() is False
    runner.run()
    assert scheduler.reset_prefix_cache() is True


def test_sliding_window_model_runs_to_completion() -> None:
    big = run_all(make_scheduler(num_blocks=200), SPECS)
    hybrid = make_scheduler(num_blocks=40, sliding_windows=(8, 8), max_num_batched_tokens=16)
    assert run_all(hybrid, SPECS) == big
    assert hybrid.kv_cache_manager.get_num_free_blocks() == 39


def test_xxhash_scheduler_hits() -> None:
    scheduler = make_scheduler(hash_algo="xxhash")
    add(scheduler, "a", 13)
    runner = FakeRunner(scheduler)
    runner.step()
    add(scheduler, "b", 13)
    output, _ = runner.step()
    assert output.scheduled_new_reqs[0].num_computed_tokens == 12
    assert next_token([1]) != EOS


def test_queue_time_is_reported_once_on_the_first_output() -> None:
    scheduler = make_scheduler(max_num_seqs=1)
    add(scheduler, "first", 6, max_tokens=3)
    add(scheduler, "second", 6, offset=50, max_tokens=3)
    runner = FakeRunner(scheduler)
    reported: dict[str, list[float]] = {}
    while scheduler.has_unfinished_requests():
        _, outputs = runner.step()
        for output in outputs:
            if output.queue_time is not None:
                reported.setdefault(output.request_id, []).append(output.queue_time)
        time.sleep(0.02)  # steps take time: the second request waits the first one's three
    (first,), (second,) = reported["first"], reported["second"]
    assert 0 <= first < 0.02 and second >= 0.05
