"""EC connector layer, worker side: moves encoder outputs between the worker's encoder cache and the store.

Implements `pagoda.core.connector.ec.ECConnectorWorkerSide`; the factory
(`pagoda.ec_connector.factory`) hands it the opened store and the lookup
server that answers the scheduler side, and it closes both.

Loads (consumers and `ec_both`) run on the caller's thread before the
merge: the store checks each entry (header, checksum, key) and this side
checks that it is the tensor the item needs ([num_embeds, hidden_size] in
the model's dtype). An entry that fails either check is dropped from the
store, counted and reported by `finish_step`; the worker then encodes the
item from its pixels, so the output is the same either way.

Tensor parallelism: every rank holds the whole output and loads it itself,
but rank 0 alone answers the step, and every rank must encode the same
items (the language model that follows runs the ranks in lockstep). So the
ranks agree on a step's failed loads: an item any rank failed to load is
encoded by all of them. A rank without a writable tier (it only reads what
rank 0 saves) saves nothing. Metrics are this rank's; the executor reports rank 0's.

Saves (producers and `ec_both`) return at once: copying to host memory,
encoding, checksums and tier writes happen on one put thread at the lowest
CPU priority, behind a byte bound beyond which saves are dropped and
counted. The encoder cache's tensors are never written in place once
produced, so the put thread reads them without a copy on the compute thread.
A save never raises for a storage fault: the item is encoded again next time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

import torch

from pagoda.config import ECTransferConfig
from pagoda.core.connector.ec_metadata import ECConnectorMetadata, ECConnectorOutput, ECLoadSpec
from pagoda.distributed.parallel_state import SINGLE_RANK, TensorParallelGroup
from pagoda.ec_connector.keys import EncoderOutputKeys
from pagoda.kvstore.background import lower_current_thread_priority
from pagoda.kvstore.lookup import LookupServer
from pagoda.kvstore.storage_manager import StorageManager

logger = logging.getLogger(__name__)

# Saves queued beyond this many bytes are dropped (counted): a slow tier must never stall the engine.
MAX_PENDING_SAVE_BYTES = 256 << 20


@dataclass(slots=True)
class ECConnectorMetrics:
    """The connector's own counters; the tiers count theirs (hits, bytes, corrupt entries) by tier."""

    loads: int = 0  # items asked to load
    load_hits: int = 0  # of those, loaded whole into the encoder cache
    failed_loads: int = 0  # missing, corrupt or mismatched: encoded instead
    mismatched_loads: int = 0  # of the failed, checked entries of the wrong shape or dtype (dropped)
    load_bytes: int = 0  # tensor bytes loaded
    load_seconds: float = 0.0
    saves: int = 0  # items some tier accepted
    save_bytes: int = 0  # tensor bytes of those
    save_seconds: float = 0.0  # time on the put thread, host copy and tier writes included
    failed_saves: int = 0  # no tier accepted the item, or its tensor was not the item's
    dropped_saves: int = 0  # refused because the put queue was over its byte bound

    def as_dict(self) -> dict[str, float]:
        return {field.name: float(getattr(self, field.name)) for field in fields(self)}


class ECConnectorWorker:
    def __init__(self, config: ECTransferConfig, keys: EncoderOutputKeys, manager: StorageManager,
                 lookup_server: LookupServer, *, dtype: torch.dtype, hidden_size: int,
                 device: torch.device, tp: TensorParallelGroup = SINGLE_RANK) -> None:
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}")
        self.config = config
        self.keys = keys
        self.manager = manager
        self.lookup_server = lookup_server
        self.dtype = dtype
        self.dtype_name = _dtype_name(dtype)
        if self.dtype_name != keys.template.kv_dtype:
            raise ValueError(f"the store keys name dtype {keys.template.kv_dtype!r}, the tensors are {self.dtype_name}")
        self.hidden_size = hidden_size
        self.device = device
        self.tp = tp
        self._putter = ThreadPoolExecutor(1, "pagoda-ec-put", _background_writer)
        self._pending_save_bytes = 0
        self._lock = threading.Lock()  # the counters and the pending bytes: the put thread updates them too
        self._metrics = ECConnectorMetrics()
        self._failed_loads: list[str] = []

    # ---- loads ----

    def start_load_caches(self, metadata: ECConnectorMetadata, encoder_cache: MutableMapping[str, Any]) -> None:
        """Put each listed item's stored output into `encoder_cache`, skipping items already there.

        Synchronous: when it returns, every load of the step is in the cache
        or listed for `finish_step`. A producer loads nothing.
        """
        if not self.config.is_consumer:
            return
        for spec in metadata.loads:
            if spec.identifier in encoder_cache:
                continue
            started = time.perf_counter()
            try:
                tensor = self._load(spec)
            except Exception:  # e.g. no device memory for the copy: the item is encoded instead, like any miss
                logger.exception("EC store: loading item %s failed; encoding it", spec.identifier)
                tensor = None
            with self._lock:
                self._metrics.loads += 1
                self._metrics.load_seconds += time.perf_counter() - started
                if tensor is None:
                    self._metrics.failed_loads += 1
                else:
                    self._metrics.load_hits += 1
                    self._metrics.load_bytes += tensor.numel() * tensor.element_size()
            if tensor is None:
                self._failed_loads.append(spec.identifier)
            else:
                encoder_cache[spec.identifier] = tensor
        self._agree_failed_loads(metadata, encoder_cache)

    def _agree_failed_loads(self, metadata: ECConnectorMetadata, encoder_cache: MutableMapping[str, Any]) -> None:
        """Make an item any rank failed to load a failed load on every rank (dropped, then encoded).

        Every rank has the same loads in the same order (the step's metadata),
        so one vector lines up across ranks: 0 for a failed load, 1 otherwise.
        """
        if self.tp.world_size == 1 or not metadata.loads:
            return
        failed = set(self._failed_loads)
        loaded = self.tp.min_over_ranks([0 if spec.identifier in failed else 1 for spec in metadata.loads],
                                        self.device)
        for spec, ok in zip(metadata.loads, loaded):
            if not ok and spec.identifier not in failed:
                encoder_cache.pop(spec.identifier, None)
                self._failed_loads.append(spec.identifier)

    def _load(self, spec: ECLoadSpec) -> torch.Tensor | None:
        key = self.keys.key(spec.identifier)
        hit = self.manager.get(key)  # None on a miss, a failed tier or an entry failing its checks
        if hit is None:
            logger.warning("EC store: item %s is not in the store any more (or was corrupt); encoding it",
                           spec.identifier)
            return None
        expected = (spec.num_embeds, self.hidden_size)
        if hit.entry.shape != expected or hit.entry.dtype != self.dtype_name:
            logger.warning("EC store: item %s from tier %s holds %s of %s, not the %s of %s it needs; dropping it "
                           "and encoding the item", spec.identifier, hit.tier, hit.entry.shape, hit.entry.dtype,
                           expected, self.dtype_name)
            with self._lock:
                self._metrics.mismatched_loads += 1
            self.manager.remove(key)
            return None
        # One copy out of the stored bytes, which stay the tier's (and are read-only).
        host = torch.frombuffer(bytearray(hit.entry.payload), dtype=self.dtype).view(expected)
        return host.to(self.device)

    # ---- saves ----

    def save_caches(self, encoder_cache: MutableMapping[str, Any], identifier: str) -> None:
        """The encoder just produced `encoder_cache[identifier]`: queue it for the store (producers only)."""
        if not self.config.is_producer or not self.manager.writes_anything:
            return
        tensor = encoder_cache.get(identifier)
        if not self._is_savable(identifier, tensor):
            with self._lock:
                self._metrics.failed_saves += 1
            return
        num_bytes = tensor.numel() * tensor.element_size()
        with self._lock:
            if self._pending_save_bytes + num_bytes > MAX_PENDING_SAVE_BYTES:
                self._metrics.dropped_saves += 1
                return
            self._pending_save_bytes += num_bytes
        try:
            self._putter.submit(self._put, identifier, tensor, num_bytes)
        except RuntimeError:  # closed: the save is dropped like any other fault
            with self._lock:
                self._pending_save_bytes -= num_bytes
                self._metrics.failed_saves += 1

    def _is_savable(self, identifier: str, tensor: object) -> bool:
        """Whether `tensor` is an encoder output this store may hold for the item; logs why not."""
        if not isinstance(tensor, torch.Tensor):
            logger.warning("EC store: item %s is not in the encoder cache (%s); not saved", identifier,
                           type(tensor).__name__)
            return False
        shape_ok = tensor.dim() == 2 and tensor.shape[0] > 0 and tensor.shape[1] == self.hidden_size
        if not shape_ok or tensor.dtype != self.dtype:
            logger.warning("EC store: item %s is %s of %s, not [num_embeds > 0, %d] of %s; not saved", identifier,
                           tuple(tensor.shape), tensor.dtype, self.hidden_size, self.dtype)
            return False
        return True

    def _put(self, identifier: str, tensor: torch.Tensor, num_bytes: int) -> None:
        started = time.perf_counter()
        accepted = 0
        try:
            host = tensor.detach().cpu().contiguous()  # on an accelerator the copy waits here, off the step
            accepted = self.manager.put(self.keys.key(identifier), host.view(torch.uint8).numpy(),
                                        tuple(host.shape), self.dtype_name)
        except Exception:  # a save must never take the engine down; the item is encoded again next time
            logger.exception("EC store: saving item %s failed", identifier)
        finally:
            with self._lock:
                self._pending_save_bytes -= num_bytes
                self._metrics.save_seconds += time.perf_counter() - started
                if accepted:
                    self._metrics.saves += 1
                    self._metrics.save_bytes += num_bytes
                else:
                    self._metrics.failed_saves += 1

    # ---- step results, shutdown ----

    def finish_step(self) -> ECConnectorOutput:
        """Loads that failed since the last call (the worker encoded those items)."""
        failed, self._failed_loads = self._failed_loads, []
        return ECConnectorOutput(failed_loads=failed)

    def flush(self) -> None:
        """Return once every save queued so far is in every tier (tests and benchmarks wait on it)."""
        self._putter.submit(lambda: None).result()
        self.manager.flush()

    def metrics_snapshot(self) -> dict[str, dict[str, float]]:
        """Each tier's counters by tier name, and the connector's under "connector"."""
        snapshot = self.manager.metrics_snapshot()
        with self._lock:
            snapshot["connector"] = self._metrics.as_dict()
        return snapshot

    def close(self) -> None:
        self._putter.shutdown(wait=True)
        self.lookup_server.close()
        self.manager.close()


def _background_writer() -> None:
    # One torch thread: a second OpenMP team on this side thread would slow every parallel region of the
    # forward pass (see pagoda.kv_connector.worker_side); and run only when a core would otherwise idle.
    torch.set_num_threads(1)
    lower_current_thread_priority()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
