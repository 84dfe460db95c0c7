"""Property test: whatever the pool size, budget or policy, every request gets the same tokens."""

from __future__ import annotations

from core_helpers import FakeRunner, make_request, make_scheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.core.scheduler import Scheduler
from pagoda.core.single_type_managers import cdiv

workloads = st.lists(
    st.tuples(st.integers(0, 2), st.integers(1, 20), st.integers(1, 12), st.integers(0, 3)),
    min_size=1,
    max_size=8,
)


def run(scheduler: Scheduler, workload: list[tuple[int, int, int, int]]) -> dict[str, list[int]]:
    for index, (prefix, length, max_tokens, priority) in enumerate(workload):
        # Three shared prefixes of two blocks make prefix-cache hits common.
        prompt = [prefix + 2] * 8 + [(index * 7 + i) % 50 + 2 for i in range(length)]
        request = make_request(
            str(index), prompt, block_size=None, max_tokens=max_tokens, priority=priority, arrival_time=float(index)
        )
        scheduler.add_request(request)
    runner = FakeRunner(scheduler)
    tokens = runner.run()
    for output in runner.scheduler_outputs:
        assert output.total_num_scheduled_tokens <= scheduler.scheduler_config.max_num_batched_tokens
        assert len(output.num_scheduled_tokens) <= scheduler.scheduler_config.max_num_seqs
    return tokens


@settings(max_examples=80, deadline=None)
@given(
    workload=workloads,
    extra_blocks=st.integers(0, 6),
    budget=st.integers(4, 40),
    max_num_seqs=st.integers(1, 5),
    policy=st.sampled_from(["fcfs", "priority"]),
    caching=st.booleans(),
    windows=st.sampled_from([(), (5,), (3, 9)]),
)
def test_tokens_do_not_depend_on_resources(
    workload: list[tuple[int, int, int, int]],
    extra_blocks: int,
    budget: int,
    max_num_seqs: int,
    policy: str,
    caching: bool,
    windows: tuple[int, ...],
) -> None:
    # Enough blocks for the longest request alone in every group, or it could never run.
    longest = max(8 + length + max_tokens for _, length, max_tokens, _ in workload)
    num_blocks = 1 + (1 + len(windows)) * cdiv(longest, 4) + extra_blocks
    expected = run(make_scheduler(num_blocks=400, max_num_batched_tokens=256), workload)
    scheduler = make_scheduler(
        num_blocks=num_blocks,
        max_num_batched_tokens=budget,
        max_num_seqs=max_num_seqs,
        policy=policy,
        enable_prefix_caching=caching,
        sliding_windows=windows,
    )
    assert run(scheduler, workload) == expected
    assert scheduler.kv_cache_manager.get_num_free_blocks() == num_blocks - 1
    assert scheduler.requests == {} and not scheduler.running and not scheduler.waiting
