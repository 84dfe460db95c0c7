"""KV connector layer: builds the KV connector's two sides, and the store behind the worker side.

The only place that names the connector classes, the store and its lookup
pair. The engine calls `make_scheduler_connector` (the scheduler side and
its `LookupClient`); each worker calls `make_worker_connector` (the store's
tiers, the `LookupServer` answering that client, the worker side). Both
sides derive the same `StoreLayout` from the config, so their keys agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagoda.config import KVTransferConfig, PagodaConfig
from pagoda.core.block_hash import get_hash_fn
from pagoda.core.connector.kv import KVConnectorSchedulerSide, KVConnectorWorkerSide
from pagoda.core.kv_cache_interface import KVCacheConfig
from pagoda.kv_connector.layout import StoreLayout
from pagoda.kv_connector.scheduler_side import KVConnectorScheduler
from pagoda.kvstore.lookup import LookupClient, open_store_with_lookup
from pagoda.kvstore.lookup import with_private_lookup

if TYPE_CHECKING:
    import torch

    from pagoda.kv_connector.worker_side import KVConnectorWorker


def with_private_lookup_address(config: PagodaConfig) -> tuple[PagodaConfig, str | None]:
    """The config with a private ipc path for the lookup pair, and its folder (removed by the caller at
    shutdown); unchanged without a KV store."""
    return with_private_lookup(config, "kv_transfer_config", "pagoda-kv-")


def store_layout(config: PagodaConfig, kv_cache_config: KVCacheConfig) -> StoreLayout:
    assert config.kv_transfer_config is not None
    model_id = config.model_config.identity
    return StoreLayout(model_id, config.model_config.dtype, kv_cache_config, config.kv_transfer_config.chunk_size)


def make_scheduler_connector(config: PagodaConfig, kv_cache_config: KVCacheConfig) -> KVConnectorSchedulerSide | None:
    """The scheduler side, asking the store through the lookup address; None without a KV store."""
    transfer = config.kv_transfer_config
    if transfer is None:
        return None
    assert transfer.lookup_address is not None, "the engine gives the lookup pair an address first"
    hash_fn = get_hash_fn(config.cache_config.prefix_caching_hash_algo)
    return KVConnectorScheduler(transfer, store_layout(config, kv_cache_config), LookupClient(transfer.lookup_address),
                                hash_fn)


def make_worker_connector(config: PagodaConfig, kv_cache_config: KVCacheConfig,
                          layer_kv_caches: list[torch.Tensor]) -> KVConnectorWorkerSide | None:
    """The worker side over this worker's per-layer KV caches; None without a KV store."""
    if config.kv_transfer_config is None:
        return None
    return build_worker_side(config.kv_transfer_config, store_layout(config, kv_cache_config), layer_kv_caches)


def build_worker_side(transfer: KVTransferConfig, layout: StoreLayout,
                      layer_kv_caches: list[torch.Tensor]) -> KVConnectorWorker:
    """Open the store, start its lookup server on `transfer.lookup_address`, and wrap both in the worker side."""
    # Imported here, not above: the worker side needs torch, the scheduler side must not pull it in.
    from pagoda.kv_connector.worker_side import KVConnectorWorker

    assert transfer.lookup_address is not None, "the engine gives the lookup pair an address first"
    manager, lookup_server = open_store_with_lookup(transfer.kv_store, transfer.lookup_address)
    return KVConnectorWorker(transfer, layout, layer_kv_caches, manager, lookup_server)
