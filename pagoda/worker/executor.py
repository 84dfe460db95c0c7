"""Worker layer: the executor — how the engine reaches its workers.

`collective_rpc` calls one method on every worker and returns their answers
in rank order; everything else is built on it, so a multi-process or
multi-node executor only has to provide that one call. `submit_step` sends
a step without waiting for it, for the engine's batch queue under pipeline
parallelism (several batches in flight, one per stage); here it simply runs
the step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from pagoda.config import PagodaConfig
from pagoda.core.kv_cache_interface import KVCacheConfig, KVCacheSpec
from pagoda.core.model_runner_output import ModelRunnerOutput
from pagoda.core.scheduler_output import SchedulerOutput
from pagoda.worker.worker import Worker


class PendingStep:
    """A step sent to the workers; `result()` waits for its output. `reader` reads answers, in the order the
    steps were sent, until this one's is in."""

    def __init__(self, output: ModelRunnerOutput | None = None,
                 reader: Callable[[PendingStep], None] | None = None) -> None:
        self._output = output
        self._reader = reader

    @property
    def done(self) -> bool:
        return self._output is not None

    def set_output(self, output: ModelRunnerOutput) -> None:
        self._output = output

    def result(self) -> ModelRunnerOutput:
        if self._output is None:
            assert self._reader is not None
            self._reader(self)
        assert self._output is not None
        return self._output


class Executor(ABC):
    def __init__(self, config: PagodaConfig) -> None:
        self.config = config

    @abstractmethod
    def collective_rpc(self, method: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> list[Any]:
        """Call `method` on every worker; answers in rank order."""

    def load_model(self) -> None:
        self.collective_rpc("load_model")

    def get_kv_cache_spec(self) -> list[KVCacheSpec]:
        return self.collective_rpc("get_kv_cache_spec")[0]

    def determine_available_memory(self) -> int:
        return min(self.collective_rpc("determine_available_memory"))

    def initialize_kv_cache(self, kv_cache_config: KVCacheConfig) -> None:
        self.collective_rpc("initialize_kv_cache", (kv_cache_config,))

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.collective_rpc("execute_model", (scheduler_output,))[0]

    def submit_step(self, scheduler_output: SchedulerOutput) -> PendingStep:
        return PendingStep(output=self.execute_model(scheduler_output))

    def kv_store_metrics(self) -> dict[str, dict[str, float]] | None:
        if self.config.kv_transfer_config is None:
            return None  # no store: no need to ask the workers (a round trip each step for worker processes)
        # Rank 0's counters: with tensor parallelism the ranks agree on every load's outcome, so its
        # connector counts are everyone's, but its tiers' counters are its own (other ranks' tiers go unseen).
        return self.collective_rpc("kv_store_metrics")[0]

    def mm_metrics(self) -> dict[str, dict[str, float]] | None:
        return self.collective_rpc("mm_metrics")[0]  # rank 0's, as for the KV store

    def flush_kv_store(self) -> bool:
        return all(self.collective_rpc("flush_kv_store"))

    def shutdown(self) -> None:
        """Release the workers' resources (the KV store's threads and files)."""
        self.collective_rpc("shutdown")


def executor_class_for(config: PagodaConfig) -> type[Executor]:
    """The executor `ParallelConfig` asks for: in this process ("uni"), one local process per rank ("mp"),
    or one Ray actor per rank ("ray")."""
    if config.parallel_config.executor_backend == "mp":
        from pagoda.worker.multiproc_executor import MultiprocExecutor

        return MultiprocExecutor
    if config.parallel_config.executor_backend == "ray":
        from pagoda.worker.ray_executor import RayExecutor

        return RayExecutor
    return UniProcExecutor


class UniProcExecutor(Executor):
    """One worker in the engine's own process."""

    def __init__(self, config: PagodaConfig) -> None:
        super().__init__(config)
        self.worker = Worker(config)

    def collective_rpc(self, method: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> list[Any]:
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]
