"""Test helper: a throwaway redis-server on a free loopback port, which tests can stop and restart.

Nothing is persisted (`--save ""`, no append-only file), so a restart comes
back empty, like a Redis that lost its data. Test modules import it as
`from redis_server import RedisServer`: pytest puts tests/ on sys.path
because tests/conftest.py lives there, whatever the working directory
(`from tests.redis_server import ...` works only with `python -m pytest` run
from the repository root). tests/kvstore/conftest.py wraps it in the
`redis_server` fixture.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

START_TIMEOUT_S = 10.0


def redis_server_available() -> bool:
    return shutil.which("redis-server") is not None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """One redis-server process; `stop()` and `restart()` keep its port, so clients can find it again."""

    def __init__(self, port: int | None = None) -> None:
        if not redis_server_available():
            raise RuntimeError("redis-server is not installed (`make install` installs it)")
        self.port = port if port is not None else free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="pagoda-redis-"))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> RedisServer:
        if self.running:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        log = (self.directory / "redis.log").open("ab")
        self._process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        log.close()  # the child holds its own descriptor
        self._wait_until_ready()
        return self

    def command(self) -> list[str]:
        """The server's command line; a later `--port` or other setting given after these overrides them."""
        return ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.directory)]

    def stop(self) -> None:
        """Kill the server at once (no shutdown save), like a crash or a lost host."""
        if self._process is None:
            return
        self._process.kill()
        self._process.wait(timeout=10)
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.running:
                log = (self.directory / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server on port {self.port} exited at start:\n{log}")
            if self._answers_ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING within {START_TIMEOUT_S} s")

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith(b"+PONG")
        except OSError:
            return False
