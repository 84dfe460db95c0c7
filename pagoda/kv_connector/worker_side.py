"""KV connector layer, worker side: moves KV between the paged KV cache and the tiered store.

Implements `pagoda.core.connector.kv.KVConnectorWorkerSide`; the factory
(`pagoda.kv_connector.factory`) hands it the opened store and the lookup
server that answers the scheduler side, and it closes both.

Loads: in layerwise mode a transfer thread loads layer after layer while the
forward pass runs, and attention of layer i waits only for layer i
(`wait_for_layer_load`); in bulk mode every layer is loaded before the
forward pass; async loads run on their own thread between steps for requests
the scheduler parked. Every entry is checked by the store before a byte of it
reaches the cache; a missing or bad entry ends that layer's load there, and
the request is reported with the longest prefix whose KV arrived whole in
every layer that needs it (sliding-window layers only need their window).

Tensor parallelism: each rank loads its own share of the KV heads, so a
load can fall short on one rank only. Rank 0 alone answers the step, so
`finish_step` first agrees with the other ranks (`_agree`): a load ends at
the shortest prefix every rank holds, and an async load is reported only
once every rank finished it. Every rank then samples the same rows, drops
the same saves, and the scheduler recomputes whatever any rank lacks. The
metrics (`metrics_snapshot`) are this rank's own; the executor reports rank 0's.

Saves: after a layer's KV is written (`save_kv_layer`, layerwise) or after
the forward pass (bulk, in `wait_for_save`), the blocks of every prompt chunk
completed this step are copied out on the compute thread, one gather per
layer. That keeps the copies off the cores' other work (a side thread's
copies contend with the forward pass's OpenMP team) and means a step never
returns while a save still reads blocks the scheduler may hand to someone
else. Moving the copies to host memory (on an accelerator), encoding and
writing to the tiers happen later on a put thread at the lowest CPU priority.
"""

from __future__ import annotations

import logging
import threading
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import torch

from pagoda.config import KVTransferConfig
from pagoda.core.connector.kv_metadata import KVConnectorMetadata, KVConnectorOutput, LoadResult, LoadSpec, SaveSpec
from pagoda.distributed.parallel_state import SINGLE_RANK, TensorParallelGroup
from pagoda.kv_connector.layout import LayerLayout, StoreLayout
from pagoda.kvstore.background import lower_current_thread_priority
from pagoda.kvstore.keys import CacheEngineKey
from pagoda.kvstore.lookup import LookupServer
from pagoda.kvstore.storage_manager import StorageManager

logger = logging.getLogger(__name__)

# Loads read stored entries through read-only buffers and only copy out of them.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

# Saves queued beyond this many bytes are dropped (counted): a slow tier must never stall the engine.
MAX_PENDING_SAVE_BYTES = 1 << 30
# How long an idle step waits for an async load before returning (keeps the engine loop from spinning).
IDLE_LOAD_WAIT_S = 0.005


class _LoadJob:
    """One request's load: per layer and chunk, the first position whose KV arrived (through the chunk's end)."""

    def __init__(self, spec: LoadSpec, layout: StoreLayout) -> None:
        self.spec = spec
        self.layout = layout
        self.loaded_from: list[dict[int, int]] = [{} for _ in layout.layers]
        self.tier_of_chunk: dict[int, str] = {}
        self.num_failed_entries = 0

    def chunks_needed(self, layer: LayerLayout, end: int) -> range:
        """Chunks of layer `layer` whose KV a token at `end` needs, within the load's range."""
        first = layer.first_needed_position(self.spec.start, end)
        if first >= end:
            return range(0)
        return range(first // self.layout.chunk_size, -(-end // self.layout.chunk_size))

    def load_layer(self, manager: StorageManager, layer: LayerLayout, kv_cache: torch.Tensor) -> None:
        spec, layout = self.spec, self.layout
        chunk_size = layout.chunk_size
        first_position = layer.first_needed_position(spec.start, spec.end)
        block_ids = spec.block_ids[layer.group_index]
        for chunk in self.chunks_needed(layer, spec.end):
            chunk_start = chunk * chunk_size
            low = self._first_block_position(layer, chunk, first_position)
            high = min(chunk_start + chunk_size, spec.end)
            try:
                tier = self._copy_chunk(manager, layer, kv_cache, chunk, low, high, block_ids)
            except Exception:  # any fault in a tier or a copy: these tokens are recomputed instead
                logger.exception("KV store: loading layer %d of chunk %d failed", layer.layer_index, chunk)
                tier = None
            if tier is None:
                self.num_failed_entries += 1
                return  # later chunks are useless without this one
            self.loaded_from[layer.layer_index][chunk] = low
            self.tier_of_chunk.setdefault(chunk, tier)

    def _first_block_position(self, layer: LayerLayout, chunk: int, first_position: int) -> int:
        """Where copying chunk `chunk` starts: the block holding `first_position`, or the chunk's start."""
        return max(chunk * self.layout.chunk_size, first_position) // self.layout.block_size * self.layout.block_size

    def _copy_chunk(self, manager: StorageManager, layer: LayerLayout, kv_cache: torch.Tensor, chunk: int,
                    low: int, high: int, block_ids: list[int]) -> str | None:
        """Copy positions [low, high) of one stored chunk into the blocks; the supplying tier, None on a miss."""
        chunk_size, block_size = self.layout.chunk_size, self.layout.block_size
        hit = manager.get(layer.key(self.spec.chunk_hashes[chunk - self.spec.first_chunk]))
        expected_shape = (2, chunk_size, layer.num_kv_heads, layer.head_size)
        if hit is None or hit.entry.shape != expected_shape or hit.entry.dtype != _dtype_name(kv_cache.dtype):
            return None
        data = torch.frombuffer(hit.entry.payload, dtype=kv_cache.dtype).view(expected_shape)
        blocks = torch.tensor(block_ids[low // block_size : high // block_size], dtype=torch.long,
                              device=kv_cache.device)
        rows = data[:, low - chunk * chunk_size : high - chunk * chunk_size]
        kv_cache[:, blocks] = rows.reshape(2, -1, block_size, *expected_shape[2:]).to(kv_cache.device)
        return hit.tier

    def _complete_up_to(self, end: int) -> bool:
        """Whether every layer holds all the KV a token at `end` attends to within the load's range."""
        for layer in self.layout.layers:
            first_position = layer.first_needed_position(self.spec.start, end)
            loaded = self.loaded_from[layer.layer_index]
            for chunk in self.chunks_needed(layer, end):
                loaded_low = loaded.get(chunk)
                if loaded_low is None or loaded_low > self._first_block_position(layer, chunk, first_position):
                    return False
        return True

    def num_complete_tokens(self, limit: int) -> int:
        """The end of the longest prefix, at most `limit`, ending at a chunk boundary or the load's end and
        complete in every layer; the load's start when none is.

        The one place that decides whether a load came back short.
        """
        spec, chunk_size = self.spec, self.layout.chunk_size
        boundaries = [spec.end] + [c * chunk_size for c in range(-(-spec.end // chunk_size) - 1, 0, -1)
                                   if spec.start < c * chunk_size < spec.end]
        for end in boundaries:
            if end <= limit and self._complete_up_to(end):
                return end
        return spec.start

    def result(self, num_computed: int) -> LoadResult:
        """The load's outcome once the ranks agreed that [0, `num_computed`) is good on all of them."""
        spec, chunk_size = self.spec, self.layout.chunk_size
        tokens_by_tier: dict[str, int] = {}
        for chunk in range(spec.start // chunk_size, -(-num_computed // chunk_size)):
            tokens = min(num_computed, (chunk + 1) * chunk_size) - max(spec.start, chunk * chunk_size)
            tier = self.tier_of_chunk.get(chunk, "unknown")
            tokens_by_tier[tier] = tokens_by_tier.get(tier, 0) + tokens
        return LoadResult(num_computed_tokens=num_computed, complete=num_computed == spec.end,
                          tokens_by_tier=tokens_by_tier)


class KVConnectorWorker:
    def __init__(self, config: KVTransferConfig, layout: StoreLayout, layer_kv_caches: list[torch.Tensor],
                 manager: StorageManager, lookup_server: LookupServer, tp: TensorParallelGroup = SINGLE_RANK) -> None:
        self.config = config
        self.tp = tp
        # A rank that only reads shared tiers (it replicates KV another rank saves) and has no CPU tier saves nothing.
        self._saves_enabled = manager.writes_anything
        self.layout = layout
        self.kv_caches = layer_kv_caches
        self.dtype_name = _dtype_name(layer_kv_caches[0].dtype)
        self.manager = manager
        self.lookup_server = lookup_server
        self._transfer = ThreadPoolExecutor(1, "pagoda-kv-transfer", _single_threaded_torch)
        self._async_loader = ThreadPoolExecutor(1, "pagoda-kv-load", _single_threaded_torch)
        self._putter = ThreadPoolExecutor(1, "pagoda-kv-put", _background_writer)
        self._sync_jobs: list[_LoadJob] = []
        self._layer_loads: list[Future[None] | None] = [None] * len(layout.layers)
        self._async_loads: dict[str, tuple[_LoadJob, Future[None]]] = {}
        self._saves: list[SaveSpec] = []
        # Copied out this step, queued for the tiers once the step's loads are known good.
        self._step_puts: list[tuple[str, CacheEngineKey, torch.Tensor]] = []
        self._pending_save_bytes = 0
        self._pending_lock = threading.Lock()
        self.num_dropped_saves = 0
        self.num_failed_loads = 0

    # ---- loads ----

    def start_load_kv(self, metadata: KVConnectorMetadata) -> None:
        """Begin this step's loads: async ones in the background, in-step ones per the load mode."""
        self._saves = list(metadata.saves) if self._saves_enabled else []
        self._sync_jobs = []
        for spec in metadata.loads:
            job = _LoadJob(spec, self.layout)
            if spec.is_async:
                self._async_loads[spec.req_id] = (job, self._async_loader.submit(self._load_all_layers, job))
            else:
                self._sync_jobs.append(job)
        if not self._sync_jobs:
            return
        if self.config.load_mode == "bulk":
            for layer in self.layout.layers:
                self._load_layer(layer)
        else:
            self._layer_loads = [self._transfer.submit(self._load_layer, layer) for layer in self.layout.layers]

    def _load_layer(self, layer: LayerLayout) -> None:
        for job in self._sync_jobs:
            job.load_layer(self.manager, layer, self.kv_caches[layer.layer_index])

    def _load_all_layers(self, job: _LoadJob) -> None:
        for layer in self.layout.layers:  # load_layer never raises: every fault is a short load
            job.load_layer(self.manager, layer, self.kv_caches[layer.layer_index])

    def _agree(self, jobs: list[tuple[_LoadJob, bool]]) -> list[int]:
        """Per (job, finished here), the end of the prefix every rank holds complete; -1 for a job (an async
        load) that some rank has not finished.

        Each rank proposes its longest complete prefix within the last agreed
        limit and takes the minimum; a rank may hold a prefix up to a longer
        end but not up to the minimum (a sliding-window layer loaded only the
        window of its own end), so the ranks repeat until nobody lowers it.
        The limits start at the loads' ends on every rank and each round every
        rank sees the same minimum, so every rank runs the same rounds.
        """
        limits = [job.spec.end for job, _ in jobs]
        while True:
            proposals = [job.num_complete_tokens(limit) if finished and limit >= 0 else -1
                         for (job, finished), limit in zip(jobs, limits)]
            agreed = self.tp.min_over_ranks(proposals, self.kv_caches[0].device)
            if agreed == limits or self.tp.world_size == 1:
                return agreed
            limits = agreed

    def _finish_job(self, job: _LoadJob, num_computed: int) -> LoadResult:
        result = job.result(num_computed)
        if not result.complete:
            self.num_failed_loads += 1
            logger.warning("KV store: request %s loaded %d of %d tokens (%d entries missing or bad); "
                           "recomputing the rest", job.spec.req_id, result.num_computed_tokens - job.spec.start,
                           job.spec.end - job.spec.start, job.num_failed_entries)
        for tier, tokens in result.tokens_by_tier.items():
            tier_metrics = self.manager.metrics().get(tier)
            if tier_metrics is not None:
                tier_metrics.hit_tokens += tokens
        return result

    def wait_for_layer_load(self, layer_index: int) -> None:
        """Block until layer `layer_index` of this step's in-step loads is in the cache."""
        future = self._layer_loads[layer_index]
        if future is not None:
            future.result()

    # ---- saves ----

    def save_kv_layer(self, layer_index: int) -> None:
        """Layer `layer_index` is written for this step: copy out its newly completed chunks (layerwise)."""
        if self._saves and self.config.load_mode != "bulk":
            self._copy_out(self.layout.layers[layer_index], self._saves)

    def wait_for_save(self) -> None:
        """Return once this step's saves no longer read the KV cache (bulk mode copies them out now)."""
        if self._saves and self.config.load_mode == "bulk":
            for layer in self.layout.layers:
                self._copy_out(layer, self._saves)
        self._saves = []

    def _copy_out(self, layer: LayerLayout, saves: list[SaveSpec]) -> None:
        """Copy this layer's chunks of `saves` out of the cache with one gather, each chunk contiguous."""
        kv_cache = self.kv_caches[layer.layer_index]
        num_blocks = kv_cache.shape[1]
        blocks_per_chunk = self.layout.chunk_size // self.layout.block_size
        rows: list[int] = []  # per chunk: its K blocks, then its V blocks, in the cache viewed as [2 * blocks]
        chunks: list[tuple[str, CacheEngineKey]] = []
        for spec in saves:
            block_ids = spec.block_ids[layer.group_index]
            for offset, chunk_hash in enumerate(spec.chunk_hashes):
                chunk = spec.first_chunk + offset
                ids = block_ids[chunk * blocks_per_chunk : (chunk + 1) * blocks_per_chunk]
                # Block 0 is the null block: this layer's window dropped part of the chunk already.
                if len(ids) < blocks_per_chunk or 0 in ids:
                    continue
                rows += ids
                rows += [num_blocks + block_id for block_id in ids]
                chunks.append((spec.req_id, layer.key(chunk_hash)))
        if not chunks:
            return
        flat = kv_cache.view(2 * num_blocks, *kv_cache.shape[2:])  # a view: never a copy of the whole cache
        gathered = flat[torch.tensor(rows, dtype=torch.long, device=kv_cache.device)]
        shape = (2, self.layout.chunk_size, layer.num_kv_heads, layer.head_size)
        for index, (req_id, key) in enumerate(chunks):
            data = gathered[index * 2 * blocks_per_chunk : (index + 1) * 2 * blocks_per_chunk].view(shape)
            self._step_puts.append((req_id, key, data))

    def _queue_puts(self, rewound: set[str]) -> None:
        """Hand this step's copies to the put thread, all of a request's or none.

        A request whose in-step load fell short computed on missing KV: its
        copies are dropped. So are a request's copies when the queue is full
        (counted): a partial chunk set would make lookups promise KV that
        loads then miss.
        """
        by_request: dict[str, list[tuple[CacheEngineKey, torch.Tensor]]] = {}
        for req_id, key, data in self._step_puts:
            by_request.setdefault(req_id, []).append((key, data))
        self._step_puts = []
        for req_id, puts in by_request.items():
            if req_id in rewound:
                continue
            num_bytes = sum(data.numel() * data.element_size() for _, data in puts)
            with self._pending_lock:
                if self._pending_save_bytes + num_bytes > MAX_PENDING_SAVE_BYTES:
                    self.num_dropped_saves += 1
                    continue
                self._pending_save_bytes += num_bytes
            self._putter.submit(self._put, puts, num_bytes)

    def _put(self, puts: list[tuple[CacheEngineKey, torch.Tensor]], num_bytes: int) -> None:
        try:
            for key, data in puts:
                host = data.cpu()  # a no-op on CPU; on an accelerator the copy waits here, off the step
                self.manager.put(key, host.view(torch.uint8).numpy(), tuple(host.shape), self.dtype_name)
        finally:
            with self._pending_lock:
                self._pending_save_bytes -= num_bytes

    # ---- step results ----

    def finish_step(self, idle: bool) -> KVConnectorOutput:
        """Results of this step's in-step loads and of async loads that ended; waits briefly when `idle`."""
        finished = {}
        for future in self._layer_loads:
            if future is not None:
                future.result()
        if idle and self._async_loads:
            wait([future for _, future in self._async_loads.values()], timeout=IDLE_LOAD_WAIT_S,
                 return_when=FIRST_COMPLETED)
        # Every rank has the same in-step loads and the same async loads in flight (both come from the
        # scheduler's metadata), in the same order: the agreement's vectors line up.
        async_ids = sorted(self._async_loads)
        jobs = [(job, True) for job in self._sync_jobs]
        for req_id in async_ids:
            job, future = self._async_loads[req_id]
            jobs.append((job, future.done()))
        agreed = self._agree(jobs) if jobs else []
        for job, num_computed in zip(self._sync_jobs, agreed):
            finished[job.spec.req_id] = self._finish_job(job, num_computed)
        for req_id, num_computed in zip(async_ids, agreed[len(self._sync_jobs):]):
            if num_computed >= 0:
                job, _ = self._async_loads.pop(req_id)
                finished[req_id] = self._finish_job(job, num_computed)
        rewound = {job.spec.req_id for job in self._sync_jobs if not finished[job.spec.req_id].complete}
        self._queue_puts(rewound)
        self._sync_jobs = []
        self._layer_loads = [None] * len(self.layout.layers)
        return KVConnectorOutput(finished_loads=finished)

    def abort_step(self) -> None:
        """The forward pass raised: wait until this step's transfers stopped touching the KV cache, drop them."""
        for future in self._layer_loads:
            if future is not None:
                wait([future])
        self._sync_jobs, self._saves, self._step_puts = [], [], []
        self._layer_loads = [None] * len(self.layout.layers)

    def flush(self) -> None:
        """Wait for every queued put (tests and benchmarks use it to know the store holds what was saved)."""
        self._putter.submit(lambda: None).result()
        self.manager.flush()

    def metrics_snapshot(self) -> dict[str, dict[str, float]]:
        snapshot = self.manager.metrics_snapshot()
        snapshot["connector"] = {"dropped_saves": float(self.num_dropped_saves),
                                 "failed_loads": float(self.num_failed_loads)}
        return snapshot

    def close(self) -> None:
        for _, future in self._async_loads.values():
            future.cancel()
        self._async_loader.shutdown(wait=True)
        self._transfer.shutdown(wait=True)
        self._putter.shutdown(wait=True)
        self.lookup_server.close()
        self.manager.close()


def _single_threaded_torch() -> None:
    """Keep torch ops on this side thread off OpenMP: a second thread team makes libgomp stop spinning
    at barriers (more OpenMP threads than cores), and every parallel region of the forward pass then
    pays futex wake-ups — decode steps ran ~20% slower for the rest of the run after the first save."""
    torch.set_num_threads(1)


def _background_writer() -> None:
    _single_threaded_torch()
    lower_current_thread_priority()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
