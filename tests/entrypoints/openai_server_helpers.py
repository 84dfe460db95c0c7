"""Entrypoints test helpers: a real `pagoda serve` subprocess on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

API_KEY = "test-key"
MODEL = "smollm2-135m"
# Float32 and the same limits as the `smollm_llm` fixture, so greedy outputs can be compared with it.
SERVER_ARGS = ("--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory", str(256 << 20))
STARTUP_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RemoteServer:
    """`pagoda serve` in a subprocess; its output goes to `log_path`."""

    def __init__(self, log_path: Path, *extra_args: str, model: str = MODEL) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", model, "--port", str(self.port),
                   *SERVER_ARGS, *extra_args]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())

    def wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.5)
        pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S} s:\n{self.log_path.read_text()[-3000:]}")

    def engine_process(self):
        """The engine core's process: the server's child started by multiprocessing's spawn."""
        import psutil

        children = psutil.Process(self.process.pid).children(recursive=True)
        engines = [p for p in children if any("spawn_main" in part for part in p.cmdline())]
        assert len(engines) == 1, [p.cmdline() for p in children]
        return engines[0]

    def stop(self) -> None:
        import psutil

        children = psutil.Process(self.process.pid).children(recursive=True) if self.process.poll() is None else []
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        # Whatever the server left behind (it should leave nothing).
        for child in children:
            if child.is_running():
                child.kill()


def start_server(tmp_path_factory: pytest.TempPathFactory, *extra_args: str, model: str = MODEL) -> RemoteServer:
    server = RemoteServer(tmp_path_factory.mktemp("openai-server") / "server.log", *extra_args, model=model)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server
