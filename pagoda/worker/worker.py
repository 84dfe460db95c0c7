"""Worker layer: one device's worker — sets up the device, sizes the KV cache, runs steps."""

from __future__ import annotations

import logging

import torch

from pagoda.config import PagodaConfig
from pagoda.core.connector.base import WorkerConnector
from pagoda.distributed.parallel_state import destroy_distributed, init_distributed
from pagoda.core.kv_cache_interface import KVCacheConfig, KVCacheSpec
from pagoda.core.model_runner_output import ModelRunnerOutput
from pagoda.core.scheduler_output import SchedulerOutput
from pagoda.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# Without an explicit budget, host-memory KV caches stay below this (as vLLM's CPU default).
_DEFAULT_MAX_HOST_KV_BYTES = 4 << 30


def select_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _available_host_memory() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


class Worker:
    """One rank: its device, its share of the cores, its model runner.

    `num_threads`: CPU threads for this rank (default: every core, for a
    lone in-process worker). `init_method`: where the ranks of a
    tensor-parallel world meet (needed when there is more than one).
    """

    def __init__(self, config: PagodaConfig, rank: int = 0, num_threads: int | None = None,
                 init_method: str | None = None, device: torch.device | None = None) -> None:
        self.config = config
        self.rank = rank
        self.device = device if device is not None else select_device()
        if self.device.type == "cpu":
            torch.set_num_threads(num_threads or config.parallel_config.threads_per_rank)
        parallel = config.parallel_config
        self.tp, self.pp = init_distributed(rank, parallel.tensor_parallel_size, parallel.pipeline_parallel_size,
                                            init_method, self.device)
        torch.manual_seed(config.model_config.seed)
        self.model_runner = ModelRunner(config, self.device, self.tp, self.pp)

    def load_model(self) -> None:
        self.model_runner.load_model()

    def get_kv_cache_spec(self) -> list[KVCacheSpec]:
        return self.model_runner.get_kv_cache_spec()

    def determine_available_memory(self) -> int:
        """Bytes this worker can give to KV blocks."""
        cache_config = self.config.cache_config
        if cache_config.kv_cache_memory is not None:
            return cache_config.kv_cache_memory
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * cache_config.kv_cache_memory_fraction)
        fraction = int(_available_host_memory() * cache_config.kv_cache_memory_fraction)
        return min(fraction, _DEFAULT_MAX_HOST_KV_BYTES)

    def initialize_kv_cache(self, kv_cache_config: KVCacheConfig) -> None:
        self.model_runner.initialize_kv_cache(kv_cache_config)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.model_runner.execute_model(scheduler_output)

    def kv_store_metrics(self) -> dict[str, dict[str, float]] | None:
        connector = self.model_runner.kv_connector
        return None if connector is None else connector.metrics_snapshot()

    def mm_metrics(self) -> dict[str, dict[str, float]] | None:
        runner = self.model_runner.encoder_runner
        return None if runner is None else runner.metrics()

    def flush_kv_store(self) -> bool:
        """Wait for every store's pending saves (KV store, encoder-output store); False when there is none."""
        connectors = self._connectors()
        for connector in connectors:
            connector.flush()
        return bool(connectors)

    def shutdown(self) -> None:
        for connector in self._connectors():
            connector.close()
        destroy_distributed(self.tp, self.pp)

    def _connectors(self) -> list[WorkerConnector]:
        runner = self.model_runner
        ec_connector = runner.encoder_runner.ec_connector if runner.encoder_runner is not None else None
        return [c for c in (runner.kv_connector, ec_connector) if c is not None]
