"""Engine layer: data parallelism — N engine core processes behind one front end.

Each core is a whole engine (scheduler, KV cache, workers) in a process of
its own, reached through the usual multiprocess client; dense models need
no coordination between them. `DPRouter` picks the core for each new
request (load and prefix affinity) and remembers it, so aborts reach the
right core; outputs are taken from whichever core has some; scheduler
stats are kept per core and reported summed. Utility calls go to every
core. One dead core is the death of the whole front end, as in vLLM.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import zmq

from pagoda.config import PagodaConfig
from pagoda.engine.core_client import AsyncMPClient, EngineCoreClient, SyncMPClient
from pagoda.engine.dp_router import DPRouter
from pagoda.engine.exceptions import EngineDeadError
from pagoda.engine.messages import EngineCoreOutputs, EngineCoreRequest, SchedulerStatsMessage


class _DPClientBase:
    router: DPRouter
    clients: list[SyncMPClient] | list[AsyncMPClient]

    def _split_aborts(self, request_ids: list[str]) -> dict[int, list[str]]:
        by_engine: dict[int, list[str]] = defaultdict(list)
        for request_id in request_ids:
            engine = self.router.engine_of(request_id)
            if engine is not None:
                by_engine[engine].append(request_id)
                self.router.finished(request_id)
        return by_engine

    def _account(self, engine: int, outputs: EngineCoreOutputs) -> EngineCoreOutputs:
        for output in outputs.outputs:
            if output.finished:
                self.router.finished(output.request_id)
        if outputs.scheduler_stats is not None:
            self.router.stats[engine] = outputs.scheduler_stats
            outputs.scheduler_stats = self.router.summed_stats()
        return outputs

    def per_engine_stats(self) -> list[SchedulerStatsMessage | None]:
        return list(self.router.stats)

    def _summed(self, per_engine: list[SchedulerStatsMessage]) -> SchedulerStatsMessage:
        self.router.stats = list(per_engine)
        summed = self.router.summed_stats()
        assert summed is not None
        return summed

    def shutdown(self) -> None:
        for client in self.clients:
            client.shutdown()


class SyncDPClient(_DPClientBase, EngineCoreClient):
    def __init__(self, config: PagodaConfig) -> None:
        self.router = DPRouter(config.parallel_config.data_parallel_size)
        self.clients: list[SyncMPClient] = []
        try:
            for _ in range(self.router.num_engines):
                self.clients.append(SyncMPClient(config))
        except BaseException:
            self.shutdown()
            raise
        self._poller = zmq.Poller()
        for client in self.clients:
            self._poller.register(client.engine.output_socket, zmq.POLLIN)
            self._poller.register(client.engine.process.sentinel, zmq.POLLIN)

    @property
    def num_mm_resends(self) -> int:
        return sum(client.num_mm_resends for client in self.clients)

    def add_request(self, request: EngineCoreRequest) -> None:
        self.clients[self.router.route(request.request_id, request.prompt_token_ids)].add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        for engine, ids in self._split_aborts(request_ids).items():
            self.clients[engine].abort_requests(ids)

    def get_output(self) -> EngineCoreOutputs:
        for engine, client in enumerate(self.clients):
            if client.has_pending():
                return self._account(engine, client.get_output())
        while True:
            events = dict(self._poller.poll())
            for engine, client in enumerate(self.clients):
                if client.engine.output_socket in events:
                    outputs = client.receive()
                    if outputs.utility_output is None and (outputs.outputs or not outputs.mm_cache_misses):
                        return self._account(engine, outputs)
                elif client.engine.process.sentinel in events:
                    raise EngineDeadError(f"engine core {engine}: {client.engine.death_message()}")

    def reset_prefix_cache(self) -> bool:
        return all([client.reset_prefix_cache() for client in self.clients])

    def flush_kv_store(self) -> bool:
        return all([client.flush_kv_store() for client in self.clients])

    def reset_mm_cache(self) -> bool:
        return all([client.reset_mm_cache() for client in self.clients])

    def get_stats(self) -> SchedulerStatsMessage:
        return self._summed([client.get_stats() for client in self.clients])


class AsyncDPClient(_DPClientBase):
    """The asyncio twin, for `AsyncLLM` and the server: every core's reader feeds one queue."""

    def __init__(self, config: PagodaConfig) -> None:
        self.router = DPRouter(config.parallel_config.data_parallel_size)
        self.clients: list[AsyncMPClient] = []
        self._outputs: asyncio.Queue[tuple[int, EngineCoreOutputs | EngineDeadError]] = asyncio.Queue()
        try:
            for engine in range(self.router.num_engines):
                client = AsyncMPClient(config)
                client.deliver_to(lambda item, engine=engine: self._outputs.put_nowait((engine, item)))
                self.clients.append(client)
        except BaseException:
            self.shutdown()
            raise

    @property
    def engine(self) -> _AllEngines:
        """Every core's process, for `AsyncLLM`'s liveness checks."""
        return _AllEngines(self.clients)

    async def get_output_async(self) -> EngineCoreOutputs:
        for client in self.clients:
            client.start_reading()
        engine, outputs = await self._outputs.get()
        if isinstance(outputs, EngineDeadError):
            self._outputs.put_nowait((engine, outputs))
            raise EngineDeadError(f"engine core {engine}: {outputs}")
        return self._account(engine, outputs)

    async def add_request_async(self, request: EngineCoreRequest) -> None:
        engine = self.router.route(request.request_id, request.prompt_token_ids)
        await self.clients[engine].add_request_async(request)

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        for engine, ids in self._split_aborts(request_ids).items():
            await self.clients[engine].abort_requests_async(ids)

    async def reset_prefix_cache_async(self) -> bool:
        return all([await client.reset_prefix_cache_async() for client in self.clients])

    async def flush_kv_store_async(self) -> bool:
        return all([await client.flush_kv_store_async() for client in self.clients])

    async def reset_mm_cache_async(self) -> bool:
        return all([await client.reset_mm_cache_async() for client in self.clients])

    async def get_stats_async(self) -> SchedulerStatsMessage:
        return self._summed([await client.get_stats_async() for client in self.clients])


class _AllEngines:
    """Liveness of every core at once, shaped like one `EngineProcess` for `AsyncLLM`'s checks."""

    def __init__(self, clients: list[AsyncMPClient]) -> None:
        self._clients = clients

    def is_alive(self) -> bool:
        return all(client.engine.is_alive() for client in self._clients)

    def death_message(self) -> str:
        return "; ".join(f"engine core {index}: {client.engine.death_message()}"
                         for index, client in enumerate(self._clients) if not client.engine.is_alive())
