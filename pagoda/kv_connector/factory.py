"""KV connector layer: builds the KV connector's two sides, and the store behind the worker side.

The only place that names the connector classes, the store and its lookup
pair. The engine calls `make_scheduler_connector` (the scheduler side and
its `LookupClient`); each worker calls `make_worker_connector` (the store's
tiers, the `LookupServer` answering that client, the worker side). Both
sides derive the same `StoreLayout` from the config, so their keys agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from pagoda.config import KVTransferConfig, PagodaConfig
from pagoda.core.block_hash import get_hash_fn
from pagoda.core.connector.kv import KVConnectorSchedulerSide, KVConnectorWorkerSide
from pagoda.core.kv_cache_interface import KVCacheConfig
from pagoda.kv_connector.layout import StoreLayout
from pagoda.kv_connector.scheduler_side import KVConnectorScheduler
from pagoda.kvstore.build import RankStore
from pagoda.kvstore.lookup import LookupClient, TensorParallelLookup, open_store_with_lookup, rank_lookup_address
from pagoda.kvstore.lookup import with_private_lookup
from pagoda.models.hf_config import text_config

if TYPE_CHECKING:
    import torch

    from pagoda.distributed.parallel_state import TensorParallelGroup
    from pagoda.kv_connector.worker_side import KVConnectorWorker


def with_private_lookup_address(config: PagodaConfig) -> tuple[PagodaConfig, str | None]:
    """The config with a private ipc path for the lookup pair, and its folder (removed by the caller at
    shutdown); unchanged without a KV store."""
    return with_private_lookup(config, "kv_transfer_config", "pagoda-kv-")


def kv_head_shard(config: PagodaConfig, rank: int) -> tuple[int, bool]:
    """Rank `rank`'s shard of the KV heads (its keys' `worker_id`), and whether it saves that shard.

    With at least as many KV heads as ranks every rank is a shard of its own
    and saves it. With fewer, `world_size // num_kv_heads` consecutive ranks
    replicate one head (`pagoda.models.parallel_linear.kv_head_piece`): they
    share one key, and only the first of them saves.
    """
    world_size = config.parallel_config.world_size
    hf_config = json.loads((Path(config.model_config.path) / "config.json").read_text())
    text = text_config(hf_config)
    num_kv_heads = int(text.get("num_key_value_heads") or text["num_attention_heads"])
    ranks_per_shard = max(1, world_size // num_kv_heads)
    return rank // ranks_per_shard, rank % ranks_per_shard == 0


def store_layout(config: PagodaConfig, kv_cache_config: KVCacheConfig, rank: int = 0) -> StoreLayout:
    """Keys carry the world size even when heads are replicated: KV computed by another number of ranks
    sums its partial products in another order, so it is close to but not the bits this world computes."""
    assert config.kv_transfer_config is not None
    model_id = config.model_config.identity
    world_size = config.parallel_config.world_size
    shard = kv_head_shard(config, rank)[0] if world_size > 1 else 0
    return StoreLayout(model_id, config.model_config.dtype, kv_cache_config, config.kv_transfer_config.chunk_size,
                       world_size, shard)


def rank_store(config: PagodaConfig, rank: int) -> RankStore:
    """Which part of the store rank `rank` opens: its shard's disk folders (TP > 1), written by the shard's
    first rank only."""
    world_size = config.parallel_config.world_size
    if world_size == 1:
        return RankStore()
    shard, saves = kv_head_shard(config, rank)
    return RankStore(subfolder=f"tp{world_size}-shard{shard}", writes_shared=saves)


def make_scheduler_connector(config: PagodaConfig, kv_cache_config: KVCacheConfig) -> KVConnectorSchedulerSide | None:
    """The scheduler side, asking the store through the lookup address; None without a KV store."""
    transfer = config.kv_transfer_config
    if transfer is None:
        return None
    assert transfer.lookup_address is not None, "the engine gives the lookup pair an address first"
    hash_fn = get_hash_fn(config.cache_config.prefix_caching_hash_algo)
    world_size = config.parallel_config.world_size
    lookup: LookupClient | TensorParallelLookup = LookupClient(transfer.lookup_address)
    if world_size > 1:
        lookup = TensorParallelLookup(transfer.lookup_address,
                                      [kv_head_shard(config, rank)[0] for rank in range(world_size)])
    return KVConnectorScheduler(transfer, store_layout(config, kv_cache_config), lookup, hash_fn)


def make_worker_connector(config: PagodaConfig, kv_cache_config: KVCacheConfig,
                          layer_kv_caches: list[torch.Tensor],
                          tp: TensorParallelGroup | None = None) -> KVConnectorWorkerSide | None:
    """The worker side over this rank's per-layer KV caches; None without a KV store."""
    if config.kv_transfer_config is None:
        return None
    rank = 0 if tp is None else tp.rank
    return build_worker_side(config.kv_transfer_config, store_layout(config, kv_cache_config, rank),
                             layer_kv_caches, rank_store(config, rank), tp)


def build_worker_side(transfer: KVTransferConfig, layout: StoreLayout, layer_kv_caches: list[torch.Tensor],
                      rank_part: RankStore | None = None, tp: TensorParallelGroup | None = None) -> KVConnectorWorker:
    """Open this rank's part of the store, start its lookup server (on this rank's address), and wrap both
    in the worker side."""
    # Imported here, not above: the worker side needs torch, the scheduler side must not pull it in.
    from pagoda.distributed.parallel_state import SINGLE_RANK
    from pagoda.kv_connector.worker_side import KVConnectorWorker

    assert transfer.lookup_address is not None, "the engine gives the lookup pair an address first"
    tp = SINGLE_RANK if tp is None else tp
    address = rank_lookup_address(transfer.lookup_address, tp.rank)
    manager, lookup_server = open_store_with_lookup(transfer.kv_store, address, rank_part or RankStore())
    return KVConnectorWorker(transfer, layout, layer_kv_caches, manager, lookup_server, tp)
