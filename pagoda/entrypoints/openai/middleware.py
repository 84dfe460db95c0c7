"""Entrypoints layer: request guards in front of the app — the API key, a body bounded in size and in the
time it takes to arrive, and 503 for new requests while the server drains at shutdown (drain.py).

The key is asked on every route but `/health` (and `/metrics` when the
server is started with `--metrics-without-api-key`, for scrapers that send
none), and compared as SHA-256 digests with `secrets.compare_digest`: the
time taken says nothing about the key, its length included.

Written as plain ASGI middleware rather than Starlette's `BaseHTTPMiddleware`,
which wraps `receive` in a way that hides a client's disconnect from
streaming responses (and a disconnect must abort the request).
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from http import HTTPStatus

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagoda.entrypoints.openai.drain import Drain
from pagoda.entrypoints.openai.errors import OpenAIError

# Bodies larger than this are refused with 413 (a max-length prompt of token ids is ~1 MB of JSON).
DEFAULT_MAX_REQUEST_BODY_BYTES = 16 << 20
# A body not all received by then is refused with 408.
DEFAULT_REQUEST_BODY_TIMEOUT_SECONDS = 30.0


class RequestGuardMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int, drain: Drain | None = None,
                 open_paths: frozenset[str] = frozenset({"/health"}),
                 body_timeout_s: float = DEFAULT_REQUEST_BODY_TIMEOUT_SECONDS) -> None:
        self.app = app
        self.body_timeout_s = body_timeout_s
        self._key_digest = None if api_key is None else _digest(api_key.encode())
        self.max_body_bytes = max_body_bytes
        self.drain = drain
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.drain is not None and self.drain.active and scope["path"] != "/metrics":
            error = OpenAIError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down and takes no new "
                                "requests; send this one to another instance", code="shutting_down")
            await error.response()(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        if self._key_digest is not None and scope["path"] not in self.open_paths and not self._authorized(headers):
            error = OpenAIError(HTTPStatus.UNAUTHORIZED, "missing or wrong API key: send 'Authorization: Bearer "
                                "<key>' with the key this server was started with", code="invalid_api_key")
            await error.response()(scope, receive, send)
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large().response()(scope, receive, send)
            return
        await self.app(scope, self._bounded(receive), send)

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        matches = secrets.compare_digest(_digest(token.strip().encode()), self._key_digest or b"")
        return matches and scheme.lower() == "bearer"

    def _too_large(self) -> OpenAIError:
        return OpenAIError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"request body exceeds the limit of {self.max_body_bytes} bytes")

    def _bounded(self, receive: Receive) -> Receive:
        """`receive` that refuses a body once it grows past the limit (sent without a length), or when it
        has not all arrived within the body timeout (a client trickling a body in holds a connection, and
        many such clients would hold the server's): 413 or 408."""
        received = 0
        deadline = time.monotonic() + self.body_timeout_s
        body_done = False

        async def bounded_receive() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()  # after the body: waiting for a disconnect, however long
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise HTTPException(HTTPStatus.REQUEST_TIMEOUT, f"the request body did not arrive within "
                                    f"{self.body_timeout_s:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, self._too_large().message)
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        return bounded_receive


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()
