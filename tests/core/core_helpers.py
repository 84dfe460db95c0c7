"""Shared factories for the core tests: requests, KV cache configs, schedulers and a fake model runner."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pagoda.config import CacheConfig, SchedulerConfig
from pagoda.core.block_hash import get_hash_fn, get_request_block_hasher
from pagoda.core.block_pool import BlockPool, KVCacheBlock
from pagoda.core.connector.kv import KVConnectorSchedulerSide
from pagoda.core.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec
from pagoda.core.model_runner_output import ModelRunnerOutput
from pagoda.core.outputs import EngineCoreOutput
from pagoda.core.request import Request
from pagoda.core.scheduler import Scheduler
from pagoda.core.scheduler_output import SchedulerOutput
from pagoda.sampling_params import SamplingParams

EOS_TOKEN_ID = 1
TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parents[1]


def make_request(
    request_id: str,
    prompt_token_ids: list[int],
    block_size: int | None = 4,
    hash_algo: str = "sha256",
    cache_salt: str | None = None,
    arrival_time: float = 0.0,
    priority: int = 0,
    eos_token_id: int | None = EOS_TOKEN_ID,
    **sampling: object,
) -> Request:
    """A request; with a block hasher unless `block_size` is None (the scheduler then attaches one)."""
    sampling.setdefault("max_tokens", 16)
    hasher = None if block_size is None else get_request_block_hasher(block_size, get_hash_fn(hash_algo))
    return Request(
        request_id,
        list(prompt_token_ids),
        SamplingParams(**sampling),
        eos_token_id,
        arrival_time,
        priority=priority,
        cache_salt=cache_salt,
        block_hasher=hasher,
    )


def full_spec(block_size: int = 4) -> FullAttentionSpec:
    return FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=8, dtype_size=2)


def sliding_spec(block_size: int = 4, sliding_window: int = 8) -> SlidingWindowSpec:
    return SlidingWindowSpec(
        block_size=block_size, num_kv_heads=1, head_size=8, dtype_size=2, sliding_window=sliding_window
    )


def make_kv_cache_config(
    num_blocks: int, block_size: int = 4, sliding_windows: tuple[int, ...] = ()
) -> KVCacheConfig:
    """One full-attention group, then one sliding-window group per entry of `sliding_windows`."""
    groups = [KVCacheGroupSpec((0,), full_spec(block_size))]
    for index, window in enumerate(sliding_windows, start=1):
        groups.append(KVCacheGroupSpec((index,), sliding_spec(block_size, window)))
    return KVCacheConfig(num_blocks=num_blocks, groups=tuple(groups))


def make_scheduler(
    num_blocks: int = 100,
    block_size: int = 4,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 256,
    enable_prefix_caching: bool = True,
    policy: str = "fcfs",
    enable_chunked_prefill: bool = True,
    sliding_windows: tuple[int, ...] = (),
    hash_algo: str = "sha256",
    kv_connector: KVConnectorSchedulerSide | None = None,
    pipeline_parallel: bool = False,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            enable_chunked_prefill=enable_chunked_prefill,
            policy=policy,
        ),
        CacheConfig(
            block_size=block_size, enable_prefix_caching=enable_prefix_caching, prefix_caching_hash_algo=hash_algo
        ),
        make_kv_cache_config(num_blocks, block_size, sliding_windows),
        kv_connector=kv_connector,
        pipeline_parallel=pipeline_parallel,
    )


def next_token(token_ids: list[int]) -> int:
    """A deterministic stand-in for a model: never EOS, depends on the whole history."""
    return 100 + (sum(token_ids) * 31 + len(token_ids)) % 97


SampleFn = Callable[[Request], int]


class FakeRunner:
    """Plays the worker: mirrors block tables from the diffs and samples once a prompt is computed."""

    def __init__(self, scheduler: Scheduler, sample: SampleFn = lambda request: next_token(request.all_token_ids)):
        self.scheduler = scheduler
        self.sample = sample
        self.block_ids: dict[str, tuple[list[int], ...]] = {}
        self.num_computed_tokens: dict[str, int] = {}
        self.scheduler_outputs: list[SchedulerOutput] = []

    def step(self) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
        output = self.scheduler.schedule()
        self.scheduler_outputs.append(output)
        self.apply(output)
        req_ids, sampled = [], []
        for req_id in output.num_scheduled_tokens:
            request = self.scheduler.requests[req_id]
            req_ids.append(req_id)
            # The scheduler advanced num_computed_tokens already: sample once the prompt is in.
            done = request.num_computed_tokens >= request.num_tokens
            sampled.append([self.sample(request)] if done else [])
        runner_output = ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled)
        return output, self.scheduler.update_from_output(output, runner_output)

    def apply(self, output: SchedulerOutput) -> None:
        for req_id in output.finished_req_ids:
            self.block_ids.pop(req_id, None)
            self.num_computed_tokens.pop(req_id, None)
        for new in output.scheduled_new_reqs:
            assert new.req_id not in self.block_ids, "a request was sent as new twice"
            self.block_ids[new.req_id] = tuple(list(ids) for ids in new.block_ids)
            self.num_computed_tokens[new.req_id] = new.num_computed_tokens
        cached = output.scheduled_cached_reqs
        for req_id, resumed, new_ids, num_computed in zip(
            cached.req_ids, cached.resumed_from_preemption, cached.new_block_ids, cached.num_computed_tokens
        ):
            if resumed:
                assert new_ids is not None
                self.block_ids[req_id] = tuple(list(ids) for ids in new_ids)
            else:
                assert num_computed == self.num_computed_tokens[req_id], "diff lost track of progress"
                if new_ids is not None:
                    for table, ids in zip(self.block_ids[req_id], new_ids):
                        table.extend(ids)
            self.num_computed_tokens[req_id] = num_computed
        for req_id, num_tokens in output.num_scheduled_tokens.items():
            self.num_computed_tokens[req_id] += num_tokens

    def run(self, max_steps: int = 10_000) -> dict[str, list[int]]:
        """Step until every request is done; return each request's output tokens."""
        tokens: dict[str, list[int]] = {}
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_requests():
                return tokens
            _, outputs = self.step()
            for out in outputs:
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        raise AssertionError("requests did not finish")


def cache_block(pool: BlockPool, block: KVCacheBlock, key: bytes) -> None:
    """Put a block into the prefix cache by hand (for lookup tests)."""
    block.block_hash = key
    pool.cached_block_hash_to_block[key] = block


def free_queue_ids(pool: BlockPool) -> list[int]:
    return [block.block_id for block in pool.free_block_queue.get_all_free_blocks()]
