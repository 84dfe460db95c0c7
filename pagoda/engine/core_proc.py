"""Engine layer: the engine process — `EngineCore` in a process of its own, fed over ZMQ.

Two halves live here. `EngineProcess` is the parent's handle: it makes a
fresh temp dir for the IPC endpoints, binds them, spawns the child, waits for
its handshake and, at shutdown, stops it and removes the endpoints.
`EngineCoreProc` is what runs in the child: a busy loop that applies incoming
requests between steps and pushes every step's outputs back.

    client ROUTER  <-- ipc://.../input  -->  engine DEALER   (requests; the handshake goes up)
    client PULL    <-- ipc://.../output <--  engine PUSH     (EngineCoreOutputs)

Everything on the sockets is msgpack through msgspec; the config reaches the
child the same way, as msgpack bytes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
import weakref
from collections.abc import Callable
from typing import Any, NoReturn

import msgspec
import zmq

from pagoda import envs
from pagoda.child_allocator import preloaded_allocator
from pagoda.config import PagodaConfig
from pagoda.core.outputs import EngineCoreOutput, FinishReason
from pagoda.engine.exceptions import EngineDeadError
from pagoda.engine.messages import (
    EngineCoreHandshake,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineCoreRequestType,
    UtilityOutput,
    UtilityRequest,
)
from pagoda.worker.executor_errors import ExecutorFailedError

logger = logging.getLogger(__name__)

# After a start-up failure the child waits this long for its error message to leave.
_HANDSHAKE_LINGER_MS = 5000
# How long the parent waits for that message once it has seen the child exit.
_LAST_WORDS_MS = 1000


class EngineCoreProc:
    """Runs `EngineCore` in this process, fed by the input socket, reporting on the output socket."""

    def __init__(self, config: PagodaConfig, input_socket: zmq.Socket, output_socket: zmq.Socket) -> None:
        # Imported here: EngineCore brings torch and the model code, which a front end never needs.
        from pagoda.engine.core import EngineCore

        self.engine_core = EngineCore(config)
        self.input_socket = input_socket
        self.output_socket = output_socket
        self._encoder = msgspec.msgpack.Encoder()
        self._decoders: dict[EngineCoreRequestType, msgspec.msgpack.Decoder] = {
            EngineCoreRequestType.ADD: msgspec.msgpack.Decoder(EngineCoreRequest),
            EngineCoreRequestType.ABORT: msgspec.msgpack.Decoder(list[str]),
            EngineCoreRequestType.UTILITY: msgspec.msgpack.Decoder(UtilityRequest),
        }
        self._utilities: dict[str, Callable[[], Any]] = {
            "reset_prefix_cache": self.engine_core.reset_prefix_cache,
            "flush_kv_store": self.engine_core.flush_kv_store,
            "get_stats": self.engine_core.make_stats,
            "reset_mm_cache": self._reset_mm_cache,
        }
        # The engine's half of the front end's pixel mirror (`pagoda.multimodal.processor_cache`).
        self._pixel_cache = None
        if config.model_config.mm_tokens_per_image is not None:
            from pagoda.multimodal.processor_cache import ReceiverCache

            self._pixel_cache = ReceiverCache(config.mm_config.processor_cache_bytes)
        self._poller = zmq.Poller()
        self._poller.register(self.input_socket, zmq.POLLIN)
        # The pipe from the parent reads as closed once the parent is gone: then this process ends too.
        parent = multiprocessing.parent_process()
        self._parent_sentinel = None if parent is None else parent.sentinel
        if self._parent_sentinel is not None:
            self._poller.register(self._parent_sentinel, zmq.POLLIN)

    def run_busy_loop(self) -> None:
        while True:
            # Block while idle; while requests run, only take what has already arrived.
            timeout = 0 if self.engine_core.has_unfinished_requests() else None
            events = dict(self._poller.poll(timeout))
            if self._parent_sentinel in events:
                logger.info("the parent process is gone; the engine process exits")
                return
            self._drain_input()
            if self.engine_core.has_unfinished_requests():
                self._send(self._step())

    def _drain_input(self) -> None:
        while True:
            try:
                request_type, payload = self.input_socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._handle(EngineCoreRequestType(request_type[0]), payload)
            except Exception:
                # Nothing names the request a malformed message belongs to; drop it and serve on.
                logger.exception("dropping a malformed engine request")

    def _handle(self, request_type: EngineCoreRequestType, payload: bytes) -> None:
        message = self._decoders[request_type].decode(payload)
        if request_type == EngineCoreRequestType.ADD:
            self._add_request(message)
        elif request_type == EngineCoreRequestType.ABORT:
            self.engine_core.abort_requests(message)
        else:
            self._send(EngineCoreOutputs(utility_output=self._run_utility(message)))

    def _add_request(self, request: EngineCoreRequest) -> None:
        if request.mm_features and self._pixel_cache is not None:
            features, missing = self._pixel_cache.fill(request.mm_features)
            if missing:
                logger.info("request %s: %d image(s) not in the pixel cache; asking the front end to resend",
                            request.request_id, len(missing))
                self._send(EngineCoreOutputs(mm_cache_misses={request.request_id: missing}))
                return
            request = msgspec.structs.replace(request, mm_features=features)
        try:
            self.engine_core.add_request(request)
        except Exception as e:
            logger.warning("request %s rejected: %s", request.request_id, e)
            error = EngineCoreOutput(
                request_id=request.request_id, new_token_ids=[], finish_reason=FinishReason.ERROR, error=str(e)
            )
            self._send(EngineCoreOutputs(outputs=[error]))

    def _reset_mm_cache(self) -> bool:
        if self._pixel_cache is not None:
            self._pixel_cache.clear()
        return True

    def _run_utility(self, call: UtilityRequest) -> UtilityOutput:
        method = self._utilities.get(call.method)
        if method is None:
            return UtilityOutput(call_id=call.call_id, error=f"unknown utility method {call.method!r}")
        try:
            return UtilityOutput(call_id=call.call_id, result=method())
        except Exception as e:
            logger.exception("utility method %s failed", call.method)
            return UtilityOutput(call_id=call.call_id, error=f"{type(e).__name__}: {e}")

    def _step(self) -> EngineCoreOutputs:
        try:
            return self.engine_core.step()
        except ExecutorFailedError:
            raise  # the workers are gone: this process ends, and the front end reports the engine dead
        except Exception as e:
            # The batch's requests cannot be trusted any more; fail them and keep serving new ones.
            logger.exception("engine step failed; failing its requests")
            return self.engine_core.fail_requests(f"engine step failed: {type(e).__name__}: {e}")

    def _send(self, outputs: EngineCoreOutputs) -> None:
        self.output_socket.send(self._encoder.encode(outputs))


def _raise_system_exit(signum: int, frame: object) -> NoReturn:
    raise SystemExit(0)


def run_engine_core(config_bytes: bytes, input_address: str, output_address: str) -> None:
    """The child's entry point: build the engine, shake hands, serve until told to stop."""
    # The parent owns shutdown: Ctrl-C reaches it, and it terminates this process (SIGTERM).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_system_exit)
    logging.basicConfig(level=envs.log_level(), format="%(levelname)s %(name)s: %(message)s")
    context = zmq.Context()
    input_socket = context.socket(zmq.DEALER)
    input_socket.connect(input_address)
    output_socket = context.socket(zmq.PUSH)
    output_socket.connect(output_address)
    encoder = msgspec.msgpack.Encoder()
    proc: EngineCoreProc | None = None
    try:
        try:
            config = msgspec.msgpack.decode(config_bytes, type=PagodaConfig)
            proc = EngineCoreProc(config, input_socket, output_socket)
        except Exception as e:
            logger.exception("the engine failed to start")
            input_socket.send(encoder.encode(EngineCoreHandshake(error=f"{type(e).__name__}: {e}")))
            input_socket.close(linger=_HANDSHAKE_LINGER_MS)
            raise SystemExit(1) from e
        num_blocks = proc.engine_core.kv_cache_config.num_blocks
        input_socket.send(encoder.encode(EngineCoreHandshake(num_kv_blocks=num_blocks)))
        proc.run_busy_loop()
        # The loop only returns once the parent is gone, and a dead parent cannot remove its endpoints.
        shutil.rmtree(os.path.dirname(input_address.removeprefix("ipc://")), ignore_errors=True)
    finally:
        if proc is not None:
            proc.engine_core.shutdown()
        context.destroy(linger=0)


class EngineProcess:
    """The parent's handle on the engine process and the two sockets that reach it."""

    def __init__(self, config: PagodaConfig, context: zmq.Context, startup_timeout_s: float) -> None:
        self.ipc_dir = tempfile.mkdtemp(prefix="pagoda-engine-")
        input_address = f"ipc://{self.ipc_dir}/input"
        output_address = f"ipc://{self.ipc_dir}/output"
        self.context = context
        # ROUTER, not PUSH: a message for a dead engine is dropped instead of blocking the sender.
        self.input_socket = context.socket(zmq.ROUTER)
        self.input_socket.bind(input_address)
        self.output_socket = context.socket(zmq.PULL)
        self.output_socket.bind(output_address)
        # Daemonic, so the interpreter's exit terminates it even when shutdown() was never called; but a
        # daemonic process may not start processes, so with worker processes it is not (the finalizer below
        # and its watch of this parent still stop it).
        self.process = multiprocessing.get_context("spawn").Process(
            target=run_engine_core,
            args=(msgspec.msgpack.encode(config), input_address, output_address),
            name="PagodaEngineCore",
            daemon=config.parallel_config.executor_backend != "mp",
        )
        with preloaded_allocator():
            self.process.start()
        self._finalizer = weakref.finalize(self, _stop, self.process, context, self.ipc_dir)
        try:
            self.engine_identity, self.num_kv_blocks = self._wait_for_handshake(startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _wait_for_handshake(self, timeout_s: float) -> tuple[bytes, int]:
        # A blocking view of the input socket, which may belong to an asyncio context.
        socket = zmq.Socket.shadow(self.input_socket.underlying)
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(self.process.sentinel, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        while True:
            remaining_ms = (deadline - time.monotonic()) * 1000
            if remaining_ms <= 0:
                raise TimeoutError(f"the engine process did not report ready within {timeout_s:.0f} s")
            events = dict(poller.poll(remaining_ms))
            if socket in events or (self.process.sentinel in events and socket.poll(_LAST_WORDS_MS)):
                identity, payload = socket.recv_multipart()
                handshake = msgspec.msgpack.decode(payload, type=EngineCoreHandshake)
                if handshake.error is not None:
                    raise RuntimeError(f"the engine process failed to start: {handshake.error}")
                return identity, handshake.num_kv_blocks
            if self.process.sentinel in events:
                raise EngineDeadError(f"{self.death_message()} during start-up")

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def death_message(self) -> str:
        """Why the engine is gone; call once it has exited (reaps it to learn the exit code)."""
        self.process.join(_LAST_WORDS_MS / 1000)
        code = self.process.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
        return f"the engine process (pid {self.process.pid}) died ({how})"

    def shutdown(self) -> None:
        self._finalizer()


def _stop(process: multiprocessing.process.BaseProcess, context: zmq.Context, ipc_dir: str) -> None:
    if process.is_alive():
        process.terminate()
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
    context.destroy(linger=0)
    shutil.rmtree(ipc_dir, ignore_errors=True)
