"""Entrypoints layer: graceful shutdown of the HTTP server — SIGTERM (or a first Ctrl-C) drains it.

While draining, every new request but `/metrics` gets a 503 (`/health`
included, so a load balancer stops sending), requests already in the engine
run to their end, and once none is left, or the deadline passes, the server
exits with status 0. Requests still running at the deadline end with
finish_reason "abort": a streamed one gets its last chunk, a non-streamed one
its answer so far. A second signal stops at once, as uvicorn's does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from types import FrameType

import uvicorn

from pagoda.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

_POLL_SECONDS = 0.05
DEFAULT_SHUTDOWN_TIMEOUT_SECONDS = 30.0


class Drain:
    """The drain's state, shared by the server (which starts it) and the request guard (which reads it)."""

    def __init__(self, timeout_seconds: float) -> None:
        self.timeout_seconds = timeout_seconds
        self.active = False
        self.engine: AsyncLLM | None = None  # set once the app has built it

    async def run(self, stop_server: Callable[[], None]) -> None:
        self.active = True
        engine = self.engine
        if engine is not None:
            deadline = time.monotonic() + self.timeout_seconds
            logger.info("draining: %d request(s) in flight, up to %.0f s", len(engine.request_ids()),
                        self.timeout_seconds)
            while engine.request_ids() and time.monotonic() < deadline and not engine.errored:
                await asyncio.sleep(_POLL_SECONDS)
            left = engine.request_ids()
            if left:
                logger.warning("drain deadline: aborting %d request(s) still running", len(left))
            for request_id in left:
                await engine.abort(request_id)
        stop_server()


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM or SIGINT drains it (exit status 0) instead of stopping it."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.active or self._loop is None or not self.started:
            super().handle_exit(sig, frame)  # a second signal, or one during start-up: stop now
            self.force_exit = self.drain.active
            return
        self.drain.active = True  # new requests get 503 from now on, even before the loop runs the drain
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self.drain.run(self._stop))

    def _stop(self) -> None:
        self.should_exit = True
