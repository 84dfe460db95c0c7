"""Engine layer: the front end's handle on `EngineCore`, whatever process it lives in.

`InprocClient` runs the core in the caller's process (tests and the offline
`LLM` by default). `SyncMPClient` and `AsyncMPClient` run it in its own
process (`core_proc`), so tokenizing, detokenizing and HTTP never stall the
model; the async one offers the same methods with an `_async` suffix. If the
engine process dies, waiting and new calls raise `EngineDeadError`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import zmq
import zmq.asyncio

from pagoda.config import PagodaConfig
from pagoda.engine.arg_utils import ENGINE_MODES
from pagoda.engine.core_proc import EngineProcess
from pagoda.engine.exceptions import EngineDeadError
from pagoda.engine.messages import (
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineCoreRequestType,
    SchedulerStatsMessage,
    UtilityOutput,
    UtilityRequest,
)

if TYPE_CHECKING:
    from pagoda.multimodal.processor_cache import SenderCache

logger = logging.getLogger(__name__)

# Loading the model and sizing the KV cache; a GGUF was already converted by the caller.
STARTUP_TIMEOUT_S = 300.0

T = TypeVar("T")


class EngineCoreClient(ABC):
    @abstractmethod
    def add_request(self, request: EngineCoreRequest) -> None: ...

    @abstractmethod
    def abort_requests(self, request_ids: list[str]) -> None: ...

    @abstractmethod
    def get_output(self) -> EngineCoreOutputs:
        """Outputs of the next engine step."""

    @abstractmethod
    def reset_prefix_cache(self) -> bool:
        """Drop every cached block; False while some block is still in use."""

    @abstractmethod
    def flush_kv_store(self) -> bool:
        """Wait until every KV save queued so far reached the store's tiers; False without a store."""

    @abstractmethod
    def get_stats(self) -> SchedulerStatsMessage:
        """The scheduler's gauges and counters right now."""

    def reset_mm_cache(self) -> bool:
        """Forget the engine side's preprocessed pixels (in its own process only; in-process there are none)."""
        return True

    @abstractmethod
    def shutdown(self) -> None: ...


class InprocClient(EngineCoreClient):
    """`get_output` runs one `EngineCore.step()` in this process."""

    def __init__(self, config: PagodaConfig) -> None:
        # Imported here: EngineCore brings torch and the model code, which a front end never needs.
        from pagoda.engine.core import EngineCore

        self.engine_core = EngineCore(config)

    def add_request(self, request: EngineCoreRequest) -> None:
        self.engine_core.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self.engine_core.abort_requests(request_ids)

    def get_output(self) -> EngineCoreOutputs:
        return self.engine_core.step()

    def reset_prefix_cache(self) -> bool:
        return self.engine_core.reset_prefix_cache()

    def flush_kv_store(self) -> bool:
        return self.engine_core.flush_kv_store()

    def get_stats(self) -> SchedulerStatsMessage:
        return self.engine_core.make_stats()

    def shutdown(self) -> None:
        self.engine_core.shutdown()


def make_client(config: PagodaConfig, engine_mode: str) -> EngineCoreClient:
    """The synchronous client for `engine_mode` ("inproc" or "mp")."""
    if config.parallel_config.data_parallel_size > 1:
        from pagoda.engine.dp_client import SyncDPClient

        return SyncDPClient(config)
    if engine_mode == "inproc":
        return InprocClient(config)
    if engine_mode == "mp":
        return SyncMPClient(config)
    raise ValueError(f"engine_mode must be one of {ENGINE_MODES}, got {engine_mode!r}")


def _utility_result(output: UtilityOutput, method: str, result_type: type[T]) -> T:
    if output.error is not None:
        raise RuntimeError(f"engine utility {method} failed: {output.error}")
    return msgspec.convert(output.result, result_type)


class MPClient:
    """What both multiprocess clients share: the engine process, the wire format, liveness."""

    def __init__(self, config: PagodaConfig, context: zmq.Context) -> None:
        self.engine = EngineProcess(config, context, STARTUP_TIMEOUT_S)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        self._call_ids = itertools.count()
        # Image models: the front end's mirror of the engine's pixel cache, so a known image's pixels do not
        # cross the socket again. Requests sent without some pixels stay here whole until the engine answers
        # for them: if its cache drifted from the mirror, it asks, and they are resent with their pixels.
        self._pixel_mirror: SenderCache | None = None
        if config.model_config.mm_tokens_per_image is not None:
            from pagoda.multimodal.processor_cache import SenderCache

            self._pixel_mirror = SenderCache(config.mm_config.processor_cache_bytes)
        self._unconfirmed: dict[str, EngineCoreRequest] = {}
        self.num_mm_resends = 0

    def _for_wire(self, request: EngineCoreRequest) -> EngineCoreRequest:
        """The request as sent: without the pixels the engine's cache holds (by the mirror)."""
        if self._pixel_mirror is None or not request.mm_features:
            return request
        self._unconfirmed[request.request_id] = request
        return msgspec.structs.replace(request, mm_features=self._pixel_mirror.strip(request.mm_features))

    def _take_resends(self, outputs: EngineCoreOutputs) -> list[EngineCoreRequest]:
        """Requests the engine could not add for want of pixels, to send again (whole)."""
        for output in outputs.outputs:
            self._unconfirmed.pop(output.request_id, None)
        resends = []
        for request_id, missing in (outputs.mm_cache_misses or {}).items():
            assert self._pixel_mirror is not None
            self._pixel_mirror.forget(missing)
            request = self._unconfirmed.pop(request_id, None)
            if request is not None:  # None: aborted meanwhile
                resends.append(request)
                self.num_mm_resends += 1
        return resends

    def reset_pixel_mirror(self) -> None:
        if self._pixel_mirror is not None:
            self._pixel_mirror.clear()

    def _frames(self, request_type: EngineCoreRequestType, payload: Any) -> list[bytes]:
        return [self.engine.engine_identity, bytes((request_type,)), self._encoder.encode(payload)]

    def ensure_alive(self) -> None:
        if not self.engine.is_alive():
            raise EngineDeadError(self.engine.death_message())

    def shutdown(self) -> None:
        self.engine.shutdown()


class SyncMPClient(MPClient, EngineCoreClient):
    """Blocking calls; `get_output` waits for the engine's next step (or its death)."""

    def __init__(self, config: PagodaConfig) -> None:
        super().__init__(config, zmq.Context())
        self._poller = zmq.Poller()
        self._poller.register(self.engine.output_socket, zmq.POLLIN)
        self._poller.register(self.engine.process.sentinel, zmq.POLLIN)
        # Step outputs that arrived while a utility call waited for its answer.
        self._pending: deque[EngineCoreOutputs] = deque()

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send(EngineCoreRequestType.ADD, self._for_wire(request))

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            for request_id in request_ids:
                self._unconfirmed.pop(request_id, None)
            self._send(EngineCoreRequestType.ABORT, request_ids)

    def has_pending(self) -> bool:
        """Whether step outputs are buffered (they arrived while a utility call waited)."""
        return bool(self._pending)

    def receive(self) -> EngineCoreOutputs:
        """The next message from the engine, whatever it is (resends already handled)."""
        return self._recv()

    def get_output(self) -> EngineCoreOutputs:
        if self._pending:
            return self._pending.popleft()
        while True:
            outputs = self._recv()
            if outputs.utility_output is None and (outputs.outputs or not outputs.mm_cache_misses):
                return outputs

    def reset_prefix_cache(self) -> bool:
        return self._call_utility("reset_prefix_cache", bool)

    def reset_mm_cache(self) -> bool:
        self.reset_pixel_mirror()
        return self._call_utility("reset_mm_cache", bool)

    def flush_kv_store(self) -> bool:
        return self._call_utility("flush_kv_store", bool)

    def get_stats(self) -> SchedulerStatsMessage:
        return self._call_utility("get_stats", SchedulerStatsMessage)

    def _send(self, request_type: EngineCoreRequestType, payload: Any) -> None:
        self.ensure_alive()
        self.engine.input_socket.send_multipart(self._frames(request_type, payload))

    def _recv(self) -> EngineCoreOutputs:
        events = dict(self._poller.poll())
        if self.engine.output_socket not in events:
            raise EngineDeadError(self.engine.death_message())
        outputs = self._decoder.decode(self.engine.output_socket.recv())
        for request in self._take_resends(outputs):
            self._send(EngineCoreRequestType.ADD, self._for_wire(request))
        return outputs

    def _call_utility(self, method: str, result_type: type[T]) -> T:
        call_id = next(self._call_ids)
        self._send(EngineCoreRequestType.UTILITY, UtilityRequest(call_id=call_id, method=method))
        while True:
            outputs = self._recv()
            if outputs.utility_output is None:
                self._pending.append(outputs)
            elif outputs.utility_output.call_id == call_id:
                return _utility_result(outputs.utility_output, method, result_type)


class AsyncMPClient(MPClient):
    """asyncio calls. It belongs to the event loop it is first used in.

    A reader task takes every message off the output socket: step outputs go
    to a queue for `get_output_async`, utility answers to their waiting call.
    The engine process's sentinel is watched by the loop, so its death fails
    the queue and every waiting call at once.
    """

    def __init__(self, config: PagodaConfig) -> None:
        super().__init__(config, zmq.asyncio.Context())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outputs: asyncio.Queue[EngineCoreOutputs | EngineDeadError] = asyncio.Queue()
        self._utility_calls: dict[int, asyncio.Future[UtilityOutput]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._dead_error: EngineDeadError | None = None
        # Where step outputs (and, once, the engine's death) go; a data-parallel client merges several cores.
        self._deliver: Callable[[EngineCoreOutputs | EngineDeadError], None] = self._outputs.put_nowait

    def deliver_to(self, deliver: Callable[[EngineCoreOutputs | EngineDeadError], None]) -> None:
        self._deliver = deliver

    def start_reading(self) -> None:
        self._start_reader()

    def _start_reader(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._reader = self._loop.create_task(self._read_outputs())
        self._loop.add_reader(self.engine.process.sentinel, self._on_engine_death)

    async def _read_outputs(self) -> None:
        try:
            while True:
                outputs = self._decoder.decode(await self.engine.output_socket.recv())
                for request in self._take_resends(outputs):
                    await self._send(EngineCoreRequestType.ADD, self._for_wire(request))
                answer = outputs.utility_output
                if answer is None:
                    if outputs.outputs or not outputs.mm_cache_misses:
                        self._deliver(outputs)
                    continue
                future = self._utility_calls.pop(answer.call_id, None)
                if future is not None and not future.done():
                    future.set_result(answer)
        except Exception as e:
            # Without the reader nothing would ever arrive again: treat it as the engine's death.
            logger.exception("reading the engine's outputs failed")
            self._fail(EngineDeadError(f"reading the engine's outputs failed: {e!r}"))

    def _on_engine_death(self) -> None:
        assert self._reader is not None
        self._reader.cancel()
        self._fail(EngineDeadError(self.engine.death_message()))

    def _fail(self, error: EngineDeadError) -> None:
        assert self._loop is not None
        self._loop.remove_reader(self.engine.process.sentinel)
        self._dead_error = error
        self._deliver(error)
        for future in self._utility_calls.values():
            if not future.done():
                future.set_exception(error)
        self._utility_calls.clear()

    def ensure_alive(self) -> None:
        if self._dead_error is not None:
            raise self._dead_error
        super().ensure_alive()

    async def get_output_async(self) -> EngineCoreOutputs:
        self._start_reader()
        outputs = await self._outputs.get()
        if isinstance(outputs, EngineDeadError):
            self._outputs.put_nowait(outputs)  # so every later call fails the same way
            raise outputs
        return outputs

    async def add_request_async(self, request: EngineCoreRequest) -> None:
        await self._send(EngineCoreRequestType.ADD, self._for_wire(request))

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        if request_ids:
            for request_id in request_ids:
                self._unconfirmed.pop(request_id, None)
            await self._send(EngineCoreRequestType.ABORT, request_ids)

    async def reset_mm_cache_async(self) -> bool:
        self.reset_pixel_mirror()
        return await self._call_utility("reset_mm_cache", bool)

    async def reset_prefix_cache_async(self) -> bool:
        return await self._call_utility("reset_prefix_cache", bool)

    async def flush_kv_store_async(self) -> bool:
        return await self._call_utility("flush_kv_store", bool)

    async def get_stats_async(self) -> SchedulerStatsMessage:
        return await self._call_utility("get_stats", SchedulerStatsMessage)

    async def _send(self, request_type: EngineCoreRequestType, payload: Any) -> None:
        self._start_reader()
        self.ensure_alive()
        await self.engine.input_socket.send_multipart(self._frames(request_type, payload))

    async def _call_utility(self, method: str, result_type: type[T]) -> T:
        self._start_reader()
        call_id = next(self._call_ids)
        answer = asyncio.get_running_loop().create_future()
        self._utility_calls[call_id] = answer
        try:
            await self._send(EngineCoreRequestType.UTILITY, UtilityRequest(call_id=call_id, method=method))
        except BaseException:
            self._utility_calls.pop(call_id, None)
            raise
        return _utility_result(await answer, method, result_type)

    def shutdown(self) -> None:
        # Callable from outside the loop, even after it closed (a test's or the server's teardown).
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.engine.process.sentinel)
            if self._reader is not None:
                self._reader.cancel()
        super().shutdown()
