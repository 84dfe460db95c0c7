"""KV store layer: prefix lookup across processes, a ZMQ REQ/REP pair speaking msgspec.

The scheduler decides how many prompt tokens the store can supply, but the
store lives with the workers. `LookupServer` runs beside the worker's
StorageManager and answers "how many leading chunks are present?";
`LookupClient` asks from the scheduler without importing any worker state.
A request carries one key template (the key fields shared by every chunk)
and the chunk hashes, not whole keys, which keeps it small.

With tensor parallelism every rank runs a server on an address of its own
(`rank_lookup_address`) over its own store, and `TensorParallelLookup` asks
each about the keys that rank would load: a chunk is present only when
every rank holds it, because a rank that lacks its share cannot load it.

A lookup that times out or fails is answered 0: the request recomputes its
prompt, nothing waits on a dead worker. The client then replaces its socket,
because a REQ socket that sent without receiving accepts nothing else.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import msgspec
import zmq

from pagoda.kv_store_spec import KVStoreConfig
from pagoda.kvstore.build import SINGLE_PROCESS, RankStore, build_storage_manager
from pagoda.kvstore.keys import CacheEngineKey
from pagoda.kvstore.storage_manager import StorageManager

C = TypeVar("C")

logger = logging.getLogger(__name__)

# How often the server thread checks for close(): the longest close() waits.
_POLL_INTERVAL_MS = 100


def with_private_lookup(config: C, transfer_field: str, prefix: str) -> tuple[C, str | None]:
    """`config` with an ipc path of its own for the lookup pair of `config.<transfer_field>` (a frozen
    dataclass with a `lookup_address`) when it names none, and the private folder holding that path (the
    caller removes it at shutdown); `config` unchanged when that transfer config is None or has an address."""
    transfer = getattr(config, transfer_field)
    if transfer is None or transfer.lookup_address is not None:
        return config, None
    folder = tempfile.mkdtemp(prefix=prefix)
    transfer = dataclasses.replace(transfer, lookup_address=f"ipc://{folder}/lookup")
    return dataclasses.replace(config, **{transfer_field: transfer}), folder


class LookupRequest(msgspec.Struct, frozen=True, array_like=True):
    template: CacheEngineKey  # its chunk_hash is unused
    chunk_hashes: list[bytes]
    prefetch: bool
    # Further templates whose entries for the present chunks are prefetched too (e.g. every layer's).
    prefetch_templates: list[CacheEngineKey] = []


class LookupResponse(msgspec.Struct, frozen=True, array_like=True):
    num_present: int


_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(LookupRequest)
_response_decoder = msgspec.msgpack.Decoder(LookupResponse)


def _check_address(address: str) -> None:
    if not address.startswith(("ipc://", "tcp://")):
        raise ValueError(f"lookup address must be ipc://PATH or tcp://HOST:PORT, got {address!r}")


class LookupServer:
    """Answers lookups from a daemon thread until `close()`."""

    def __init__(self, manager: StorageManager, address: str) -> None:
        _check_address(address)
        self.manager = manager
        self.address = address
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        """Bind (errors such as an address in use raise here, in the caller) and start serving."""
        if self._thread is not None:
            raise RuntimeError(f"lookup server on {self.address} was already started")
        self._context = zmq.Context()
        socket = self._context.socket(zmq.REP)
        socket.linger = 0
        try:
            socket.bind(self.address)
        except zmq.ZMQError:
            socket.close()
            self._context.term()
            self._context = None
            raise
        self._thread = threading.Thread(
            target=self._serve, args=(socket,), name="pagoda-kv-lookup-server", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop within one poll interval; idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._context is not None:
            self._context.term()
            self._context = None
            if self.address.startswith("ipc://"):  # ZMQ leaves the socket file of a closed ipc endpoint behind
                Path(self.address.removeprefix("ipc://")).unlink(missing_ok=True)

    def _serve(self, socket: zmq.Socket[bytes]) -> None:
        try:
            while not self._stop.is_set():
                if socket.poll(_POLL_INTERVAL_MS, zmq.POLLIN):
                    # REP must answer every request, or that client's next send fails.
                    socket.send(_encoder.encode(self._answer(socket.recv())))
        finally:
            socket.close()

    def _answer(self, data: bytes) -> LookupResponse:
        try:
            request = _request_decoder.decode(data)
        except msgspec.DecodeError as exc:
            logger.warning("KV lookup server: undecodable request (%s); answering 0", exc)
            return LookupResponse(0)
        try:
            keys = [request.template.with_chunk_hash(chunk_hash) for chunk_hash in request.chunk_hashes]
            num_present = self.manager.lookup_prefix(keys)
            if request.prefetch and num_present:
                present = request.chunk_hashes[:num_present]
                self.manager.prefetch(keys[:num_present])
                for template in request.prefetch_templates:
                    self.manager.prefetch([template.with_chunk_hash(chunk_hash) for chunk_hash in present])
        except Exception:  # the thread must keep answering; this request is then recomputed
            logger.exception("KV lookup server: lookup failed; answering 0")
            return LookupResponse(0)
        return LookupResponse(num_present)


class LookupClient:
    """Asks a LookupServer; thread-safe, and never waits longer than `timeout_ms` per lookup."""

    def __init__(self, address: str, timeout_ms: int = 2000) -> None:
        _check_address(address)
        if timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be positive, got {timeout_ms}")
        self.address = address
        self.timeout_ms = timeout_ms
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._socket = self._connect()
        self._lock = threading.Lock()
        self._failing = False  # the last lookup failed: the warning for this outage was logged
        self._closed = False

    def lookup(
        self,
        keys: Sequence[CacheEngineKey],
        prefetch: bool = False,
        prefetch_templates: Sequence[CacheEngineKey] = (),
    ) -> int:
        """Number of leading `keys` present in the store; 0 on timeout or error.

        `keys` must differ only in their chunk hash. With `prefetch`, the
        server also starts promoting the present chunks to its fastest tier,
        under each key of `prefetch_templates` too.
        """
        if not keys:
            return 0
        template = keys[0].with_chunk_hash(b"")
        if any(key.with_chunk_hash(b"") != template for key in keys):
            raise ValueError("lookup keys must share model, dtype, layout and rank; only chunk hashes may differ")
        request = _encoder.encode(
            LookupRequest(template, [key.chunk_hash for key in keys], prefetch, list(prefetch_templates))
        )
        with self._lock:
            if self._closed:
                raise RuntimeError(f"lookup client for {self.address} is closed")
            try:
                self._socket.send(request)
                if not self._socket.poll(self.timeout_ms, zmq.POLLIN):
                    raise TimeoutError(f"no answer within {self.timeout_ms} ms")
                num_present = _response_decoder.decode(self._socket.recv()).num_present
                if not 0 <= num_present <= len(keys):
                    raise ValueError(f"answer {num_present} is outside 0..{len(keys)}")
            except (zmq.ZMQError, TimeoutError, msgspec.DecodeError, ValueError) as exc:
                self._socket.close()
                self._socket = self._connect()
                self._fail(exc)
                return 0
            if self._failing:
                self._failing = False
                logger.info("KV lookup client: %s answers again", self.address)
        return num_present

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._socket.close()
            self._context.term()

    def _connect(self) -> zmq.Socket[bytes]:
        socket = self._context.socket(zmq.REQ)
        socket.linger = 0  # a request nobody will answer must not hold up close()
        socket.sndtimeo = self.timeout_ms
        socket.connect(self.address)
        return socket

    def _fail(self, exc: Exception) -> None:
        if self._failing:
            logger.debug("KV lookup client: lookup on %s failed again (%s)", self.address, exc)
            return
        self._failing = True
        logger.warning(
            "KV lookup client: lookup on %s failed (%s); answering 0, so prompts are recomputed until it answers",
            self.address, exc,
        )  # fmt: skip


def rank_lookup_address(address: str, rank: int) -> str:
    """The address rank `rank`'s lookup server binds: `address` itself for rank 0, then a path suffix
    (ipc) or the next ports (tcp)."""
    _check_address(address)
    if rank == 0:
        return address
    if address.startswith("ipc://"):
        return f"{address}.rank{rank}"
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) + rank}"


class TensorParallelLookup:
    """Asks every rank's lookup server; a key counts only when every rank holds its own version of it.

    `worker_ids[r]` is the key's `worker_id` on rank r: the rank's KV-head
    shard, or 0 everywhere for entries every rank shares.
    """

    def __init__(self, address: str, worker_ids: Sequence[int], timeout_ms: int = 2000) -> None:
        self.worker_ids = list(worker_ids)
        self.clients = [LookupClient(rank_lookup_address(address, rank), timeout_ms)
                        for rank in range(len(self.worker_ids))]

    def lookup(
        self,
        keys: Sequence[CacheEngineKey],
        prefetch: bool = False,
        prefetch_templates: Sequence[CacheEngineKey] = (),
    ) -> int:
        """Number of leading `keys` every rank holds (see `LookupClient.lookup`); later ranks are asked
        only about the prefix the earlier ones hold."""
        num_present = len(keys)
        for client, worker_id in zip(self.clients, self.worker_ids):
            if not num_present:
                break
            own = [msgspec.structs.replace(key, worker_id=worker_id) for key in keys[:num_present]]
            templates = [msgspec.structs.replace(key, worker_id=worker_id) for key in prefetch_templates]
            num_present = client.lookup(own, prefetch, templates)
        return num_present

    def close(self) -> None:
        for client in self.clients:
            client.close()


def open_store_with_lookup(store: KVStoreConfig, address: str,
                           rank_store: RankStore = SINGLE_PROCESS) -> tuple[StorageManager, LookupServer]:
    """The store's tiers as `rank_store` says, and its lookup server started on `address`; nothing left
    running if either fails."""
    manager = build_storage_manager(store, rank_store)
    try:
        server = LookupServer(manager, address)
        server.start()
    except BaseException:
        manager.close()  # the disk tier runs threads: never leave them behind a failed start
        raise
    return manager, server
