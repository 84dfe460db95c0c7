"""Engine layer: `EngineCore` — the loop body that schedules, executes and updates.

It owns the scheduler and the executor. At start-up it asks the workers for
their KV layer specs and free memory, sizes the block pool, and logs how many
blocks that is and how many full-length requests fit at once.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time

from pagoda.config import PagodaConfig
from pagoda.core.kv_cache_interface import KVCacheConfig, SlidingWindowSpec, make_kv_cache_config
from pagoda.core.outputs import EngineCoreOutput, FinishReason
from pagoda.core.request import Request, RequestStatus
from pagoda.core.block_hash import get_hash_fn
from pagoda.core.scheduler import Scheduler
from pagoda.kv_connector.layout import StoreLayout
from pagoda.kv_connector.scheduler_side import KVConnectorScheduler
from pagoda.kvstore.lookup import LookupClient
from pagoda.engine.messages import EngineCoreOutputs, EngineCoreRequest, SchedulerStatsMessage
from pagoda.worker.executor import Executor, UniProcExecutor

logger = logging.getLogger(__name__)


def _blocks_per_request(kv_cache_config: KVCacheConfig, num_tokens: int, max_chunk_tokens: int) -> int:
    """Blocks one request of `num_tokens` holds at its peak, over all groups.

    A sliding-window group holds the window plus the chunk being computed.
    """
    total = 0
    for group in kv_cache_config.groups:
        spec = group.spec
        blocks = -(-num_tokens // spec.block_size)
        if isinstance(spec, SlidingWindowSpec):
            window = -(-(spec.sliding_window - 1) // spec.block_size) + 1
            blocks = min(blocks, window + -(-max_chunk_tokens // spec.block_size))
        total += blocks
    return total


class EngineCore:
    def __init__(self, config: PagodaConfig, executor_class: type[Executor] = UniProcExecutor) -> None:
        started = time.monotonic()
        self._lookup_dir: str | None = None
        if config.kv_transfer_config is not None and config.kv_transfer_config.lookup_address is None:
            self._lookup_dir = tempfile.mkdtemp(prefix="pagoda-kv-")
            config = dataclasses.replace(config, kv_transfer_config=dataclasses.replace(
                config.kv_transfer_config, lookup_address=f"ipc://{self._lookup_dir}/lookup"))
        self.config = config
        self.executor = executor_class(config)
        self.executor.load_model()
        kv_cache_config = make_kv_cache_config(
            self.executor.get_kv_cache_spec(), self.executor.determine_available_memory()
        )
        self.executor.initialize_kv_cache(kv_cache_config)
        self.kv_cache_config = kv_cache_config
        self.scheduler = Scheduler(config.scheduler_config, config.cache_config, kv_cache_config,
                                   connector=self._make_connector(kv_cache_config))
        max_len = config.scheduler_config.max_model_len
        blocks_needed = _blocks_per_request(kv_cache_config, max_len, config.scheduler_config.max_num_batched_tokens)
        if blocks_needed > kv_cache_config.num_blocks - 1:
            # Such a request could never be scheduled; refuse now rather than hang later.
            raise ValueError(
                f"the KV cache holds {kv_cache_config.num_blocks - 1} blocks but one request of "
                f"max_model_len={max_len} tokens needs {blocks_needed}: raise kv_cache_memory or lower max_model_len"
            )
        concurrency = (kv_cache_config.num_blocks - 1) / blocks_needed
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB), %d groups; max concurrency at %d tokens: %.2fx; "
            "engine ready in %.1f s",
            kv_cache_config.num_blocks, kv_cache_config.block_size,
            kv_cache_config.num_blocks * kv_cache_config.bytes_per_block / 2**20, len(kv_cache_config.groups),
            max_len, concurrency, time.monotonic() - started,
        )

    def _make_connector(self, kv_cache_config: KVCacheConfig) -> KVConnectorScheduler | None:
        transfer_config = self.config.kv_transfer_config
        if transfer_config is None:
            return None
        layout = StoreLayout(self.config.model_config.identity, self.config.model_config.dtype,
                             kv_cache_config, transfer_config.chunk_size)
        self._lookup_client = LookupClient(transfer_config.lookup_address)
        hash_fn = get_hash_fn(self.config.cache_config.prefix_caching_hash_algo)
        return KVConnectorScheduler(transfer_config, layout, self._lookup_client, hash_fn)

    def add_request(self, request: EngineCoreRequest) -> None:
        self.scheduler.add_request(
            Request(
                request_id=request.request_id,
                prompt_token_ids=request.prompt_token_ids,
                sampling_params=request.sampling_params,
                eos_token_id=request.eos_token_id,
                arrival_time=request.arrival_time,
                priority=request.priority,
                cache_salt=request.cache_salt,
            )
        )

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def step(self) -> EngineCoreOutputs:
        if not self.scheduler.has_unfinished_requests():
            return EngineCoreOutputs()
        scheduler_output = self.scheduler.schedule()
        model_output = self.executor.execute_model(scheduler_output)
        outputs: list[EngineCoreOutput] = self.scheduler.update_from_output(scheduler_output, model_output)
        return EngineCoreOutputs(outputs=outputs, scheduler_stats=self.make_stats())

    def fail_requests(self, error: str) -> EngineCoreOutputs:
        """Finish every unfinished request with `FinishReason.ERROR` (a step raised), freeing its blocks."""
        request_ids = list(self.scheduler.requests)
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
            num_waiting_reqs=stats.num_waiting_reqs,
            kv_cache_usage=stats.kv_cache_usage,
            prefix_cache_queries=stats.prefix_cache_queries,
            prefix_cache_hits=stats.prefix_cache_hits,
            num_preemptions=stats.num_preemptions,
            kv_store=self.executor.kv_store_metrics(),
        )

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.reset_prefix_cache()

    def flush_kv_store(self) -> bool:
        return self.executor.flush_kv_store()

    def shutdown(self) -> None:
        if self.config.kv_transfer_config is not None:
            self._lookup_client.close()
        self.executor.shutdown()
        if self._lookup_dir is not None:
            shutil.rmtree(self._lookup_dir, ignore_errors=True)

