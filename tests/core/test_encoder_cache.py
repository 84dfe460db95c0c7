"""The encoder cache's book (LRU, pinned while needed) and the scheduler's image-aware chunking.

A fake worker mirrors the encoder cache from each `SchedulerOutput` (encode,
load, free) and checks, every step, that every image run the step computes
has its encoder output there and that no run is split across steps.
"""

from __future__ import annotations

import pytest
from core_helpers import FakeRunner, make_kv_cache_config, make_request, make_scheduler
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pagoda.config import CacheConfig, SchedulerConfig
from pagoda.core.encoder_cache_manager import EncoderCacheManager
from pagoda.core.multimodal import MultiModalFeature, PlaceholderRange
from pagoda.core.request import Request
from pagoda.core.scheduler import Scheduler
from pagoda.core.scheduler_output import SchedulerOutput


def feature(identifier: str, offset: int, run_lengths: list[int], gap: int = 2) -> MultiModalFeature:
    """An item at `offset`: one break token, then runs of soft tokens separated by `gap` break tokens."""
    runs, cursor = [], 1
    for length in run_lengths:
        runs.append((cursor, cursor + length))
        cursor += length + gap
    return MultiModalFeature(identifier=identifier, position=PlaceholderRange(offset, cursor - gap + 1, tuple(runs)),
                             num_crops=len(run_lengths))


def mm_request(request_id: str, prompt: list[int], features: list[MultiModalFeature], **kwargs: object) -> Request:
    request = make_request(request_id, prompt, block_size=None, **kwargs)
    request.mm_features = sorted(features, key=lambda f: f.position.offset)
    return request


def mm_scheduler(encoder_cache_size: int = 64, encoder_budget: int | None = None, max_num_batched_tokens: int = 64,
                 num_blocks: int = 100, enable_prefix_caching: bool = True, max_num_seqs: int = 16) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=256,
                        encoder_cache_size=encoder_cache_size, max_num_encoder_input_tokens=encoder_budget),
        CacheConfig(block_size=4, enable_prefix_caching=enable_prefix_caching),
        make_kv_cache_config(num_blocks, 4),
        enable_multimodal=True,
    )


class EncoderMirror(FakeRunner):
    """The fake runner plus the worker's encoder cache, checked against what each step computes."""

    def __init__(self, scheduler: Scheduler) -> None:
        super().__init__(scheduler)
        self.cache: set[str] = set()
        self.encoded: list[str] = []
        self.features: dict[str, MultiModalFeature] = {}

    def apply(self, output: SchedulerOutput) -> None:
        for identifier in output.free_encoder_mm_hashes:
            assert identifier in self.cache, "freed an entry the worker never had"
            self.cache.discard(identifier)
        for identifier in output.scheduled_encoder_inputs:
            # An entry evicted and allocated again in one pass is not reported freed: the worker, still
            # holding it, skips the encode (as EncoderRunner does).
            if identifier not in self.cache:
                self.cache.add(identifier)
                self.encoded.append(identifier)
        for req_id, num_tokens in output.num_scheduled_tokens.items():
            request = self.scheduler.requests[req_id]
            start = request.num_computed_tokens - num_tokens  # the scheduler already advanced it
            end = request.num_computed_tokens
            for item in request.mm_features:
                for run_start, run_end in item.position.absolute_embed_runs():
                    assert not run_start < end < run_end, f"{req_id}: step [{start}, {end}) splits run {run_start}"
                    if run_end > start and run_start < end:
                        assert item.identifier in self.cache, f"{req_id}: no encoder output for {item.identifier}"
        super().apply(output)


def test_manager_evicts_least_recently_used_unreferenced_entry_only_when_space_is_needed() -> None:
    manager = EncoderCacheManager(cache_size=12)
    for identifier in "abc":
        assert manager.can_allocate(4)
        manager.allocate("r", identifier, 4)
    assert manager.num_free_slots == 0
    manager.free("r", ["a", "b", "c"])  # released in the order a, b, c
    assert manager.check_and_update_cache("s", "a")  # a hit revives a: now b is the least recently used
    manager.free_encoder_input("s", "a")
    assert manager.num_cached == 3, "nothing is evicted before space is needed"
    assert manager.can_allocate(4)
    manager.allocate("t", "d", 4)
    assert "b" not in manager and {"a", "c", "d"} <= {i for i in "acd" if i in manager}
    assert manager.get_freed_mm_hashes() == ["b"]
    assert manager.get_freed_mm_hashes() == []


def test_manager_counts_referenced_entries_until_every_request_lets_go() -> None:
    manager = EncoderCacheManager(cache_size=12)
    manager.allocate("r", "a", 4)
    manager.allocate("r", "b", 4)
    assert manager.check_and_update_cache("s", "a")
    assert manager.metrics()["referenced"] == 2
    manager.free("r", ["a", "b"])
    assert manager.metrics()["referenced"] == 1, "s still needs a"
    manager.free("s", ["a"])
    assert manager.metrics() == {"hits": 1.0, "evictions": 0.0, "entries": 2.0, "referenced": 0.0, "free_rows": 4.0}


def test_manager_never_evicts_a_referenced_entry() -> None:
    manager = EncoderCacheManager(cache_size=8)
    manager.allocate("r", "a", 4)
    manager.allocate("s", "b", 4)
    manager.free_encoder_input("s", "b")
    assert not manager.can_allocate(8), "a is referenced: only b's 4 slots can be freed"
    assert manager.can_allocate(4)
    assert "a" in manager and "b" not in manager


def test_manager_does_not_report_an_entry_evicted_and_allocated_again_in_one_pass() -> None:
    manager = EncoderCacheManager(cache_size=4)
    manager.allocate("r", "a", 4)
    manager.free("r", ["a"])
    assert manager.can_allocate(4)  # evicts a
    manager.allocate("s", "a", 4)
    assert manager.get_freed_mm_hashes() == []


def test_a_chunk_never_ends_inside_an_image_run() -> None:
    scheduler = mm_scheduler(max_num_batched_tokens=10, encoder_budget=16)
    # Runs at absolute [6, 14) and [16, 24): a 10-token budget would end inside the first.
    scheduler.add_request(mm_request("r", list(range(10, 40)), [feature("img", 5, [8, 8])]))
    runner = EncoderMirror(scheduler)
    first, _ = runner.step()
    assert first.num_scheduled_tokens["r"] == 6
    assert first.scheduled_encoder_inputs == [], "the step holds only text: the image is encoded when needed"
    second, _ = runner.step()
    assert second.num_scheduled_tokens["r"] == 10 and second.scheduled_encoder_inputs == ["img"]
    runner.run()


def test_a_second_request_with_the_same_image_skips_the_encoder() -> None:
    scheduler = mm_scheduler(enable_prefix_caching=False)
    runner = EncoderMirror(scheduler)
    scheduler.add_request(mm_request("a", list(range(10, 30)), [feature("img", 3, [4])]))
    runner.run()
    scheduler.add_request(mm_request("b", list(range(50, 70)), [feature("img", 5, [4])]))
    runner.run()
    assert runner.encoded == ["img"]
    assert scheduler.encoder_cache_manager.num_hits == 1


def test_one_image_shown_to_two_requests_in_one_step_is_encoded_once() -> None:
    scheduler = mm_scheduler(enable_prefix_caching=False)
    runner = EncoderMirror(scheduler)
    scheduler.add_request(mm_request("a", list(range(10, 30)), [feature("img", 3, [4])]))
    scheduler.add_request(mm_request("b", list(range(50, 70)), [feature("img", 5, [4]), feature("img", 12, [4])]))
    runner.run()
    assert runner.encoded == ["img"]


def test_the_same_text_with_another_image_shares_no_blocks_from_the_image_on() -> None:
    scheduler = mm_scheduler()
    prompt = list(range(10, 42))
    first = mm_request("a", prompt, [feature("cat", 9, [4])])
    second = mm_request("b", prompt, [feature("dog", 9, [4])])
    same = mm_request("c", prompt, [feature("cat", 9, [4])])
    for request in (first, second, same):
        scheduler.add_request(request)
    # Blocks of 4: blocks 0 and 1 ([0, 8)) precede the item at [9, 16); block 2 holds its first token.
    assert first.block_hashes[:2] == second.block_hashes[:2]
    assert not set(first.block_hashes[2:]) & set(second.block_hashes)
    assert first.block_hashes == same.block_hashes


def test_an_image_waits_for_encoder_budget_and_the_rest_runs() -> None:
    scheduler = mm_scheduler(encoder_budget=8, encoder_cache_size=64)
    runner = EncoderMirror(scheduler)
    scheduler.add_request(mm_request("a", list(range(10, 30)), [feature("x", 2, [8])]))
    scheduler.add_request(mm_request("b", list(range(40, 60)), [feature("y", 2, [8])]))
    output, _ = runner.step()
    assert output.scheduled_encoder_inputs == ["x"]
    assert output.num_scheduled_tokens == {"a": 20, "b": 2}, "b computes up to its image"
    output, _ = runner.step()
    assert output.scheduled_encoder_inputs == ["y"]
    runner.run()


def test_a_full_encoder_cache_makes_new_images_wait_without_evicting_needed_entries() -> None:
    scheduler = mm_scheduler(encoder_cache_size=8, max_num_batched_tokens=16)
    runner = EncoderMirror(scheduler)
    # "a" holds its image across steps: a budget of 16 splits its prompt after the image's first run.
    scheduler.add_request(mm_request("a", list(range(10, 50)), [feature("x", 1, [4, 4], gap=6)]))
    scheduler.add_request(mm_request("b", list(range(60, 80)), [feature("y", 1, [4])]))
    runner.run()
    assert runner.encoded.index("x") < runner.encoded.index("y")
    # y only fitted once a had computed its whole image and released x.
    assert scheduler.encoder_cache_manager.num_evictions == 1


def test_preemption_releases_the_requests_encoder_references() -> None:
    scheduler = mm_scheduler(num_blocks=12, max_num_batched_tokens=64, encoder_cache_size=8)
    runner = EncoderMirror(scheduler)
    scheduler.add_request(mm_request("a", list(range(10, 26)), [feature("x", 2, [4])], max_tokens=20))
    scheduler.add_request(mm_request("b", list(range(40, 56)), [feature("y", 2, [4])], max_tokens=20))
    runner.run()
    assert scheduler.num_preemptions > 0
    manager = scheduler.encoder_cache_manager
    assert not manager.is_referenced("x") and not manager.is_referenced("y")


@settings(max_examples=60, deadline=None)
@given(
    budget=st.integers(6, 40),
    cache_rows=st.integers(8, 24),
    prompts=st.lists(
        st.tuples(st.integers(0, 6), st.lists(st.tuples(st.sampled_from("pqrs"), st.lists(st.integers(2, 8),
                                                                                          min_size=1, max_size=3)),
                                               max_size=3)),
        min_size=1, max_size=5),
    num_blocks=st.integers(40, 120),
)
def test_every_step_has_the_encoder_outputs_it_needs_and_splits_no_run(budget: int, cache_rows: int, prompts: list,
                                                                        num_blocks: int) -> None:
    largest_run = max((max(runs) for _, items in prompts for _, runs in items), default=0)
    largest_item = max((sum(runs) for _, items in prompts for _, runs in items), default=0)
    if largest_run > budget or largest_item > cache_rows:
        assume(False)  # the engine refuses such requests (and budgets) up front
    scheduler = mm_scheduler(encoder_cache_size=cache_rows, max_num_batched_tokens=budget, num_blocks=num_blocks,
                             encoder_budget=max(largest_item, 1))
    runner = EncoderMirror(scheduler)
    for index, (lead, items) in enumerate(prompts):
        features, cursor = [], lead
        for name, runs in items:
            item = feature(f"{name}{sum(runs)}-{len(runs)}", cursor, runs)
            features.append(item)
            cursor = item.position.end + 1
        prompt = [10 + (index * 7 + i) % 50 for i in range(cursor + 3)]
        scheduler.add_request(mm_request(f"r{index}", prompt, features, max_tokens=3))
    runner.run()
    manager = scheduler.encoder_cache_manager
    assert all(not manager.is_referenced(identifier) for identifier in runner.cache)


def test_without_images_the_scheduler_plans_no_encoder_work() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("r", list(range(10, 30))))
    output = scheduler.schedule()
    assert scheduler.encoder_cache_manager is None
    assert output.scheduled_encoder_inputs == [] and output.free_encoder_mm_hashes == []


@pytest.mark.parametrize("size", [0, -1])
def test_encoder_cache_size_must_be_positive(size: int) -> None:
    with pytest.raises(ValueError, match="encoder_cache_size"):
        SchedulerConfig(encoder_cache_size=size)


def test_an_item_larger_than_the_encoder_budget_is_encoded_alone_in_its_step() -> None:
    scheduler = mm_scheduler(encoder_budget=8, encoder_cache_size=64)
    runner = EncoderMirror(scheduler)
    scheduler.add_request(mm_request("a", list(range(10, 40)), [feature("big", 2, [8, 8])]))
    scheduler.add_request(mm_request("b", list(range(40, 60)), [feature("small", 2, [4])]))
    output, _ = runner.step()
    assert output.scheduled_encoder_inputs == ["big"], "items are never split: the budget cannot hold it back"
    assert output.num_scheduled_tokens["b"] == 2, "nothing more is encoded in that step"
    runner.run()
