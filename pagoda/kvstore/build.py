"""KV store layer: opens the tiers a parsed `--kv-store` config names and orders them in a StorageManager."""

from __future__ import annotations

from pathlib import Path

from pagoda.kv_store_spec import KVStoreConfig
from pagoda.kvstore.storage_manager import StorageManager
from pagoda.kvstore.tiers.base import StorageTier
from pagoda.kvstore.tiers.cpu import CPUTier
from pagoda.kvstore.tiers.disk import DiskTier
from pagoda.kvstore.tiers.redis import RedisTier


def build_storage_manager(config: KVStoreConfig) -> StorageManager:
    """Open every tier of `config` and order them in a StorageManager."""
    tiers: list[StorageTier] = []
    names = config.tier_names()
    try:
        for spec, name in zip(config.tiers, names):
            if spec.kind == "cpu":
                tiers.append(CPUTier(spec.size_bytes or 0, spec.policy))
            elif spec.kind == "disk":
                tiers.append(DiskTier(Path(spec.path or "").expanduser(), spec.size_bytes or 0, spec.policy))
            else:
                tiers.append(RedisTier(spec.url or "", spec.namespace, name=name))
    except BaseException:
        for tier in tiers:  # the disk tier runs threads: never leave them behind a failed build
            tier.close()
        raise
    readonly = [name for spec, name in zip(config.tiers, names) if spec.readonly]
    writeonly = [name for spec, name in zip(config.tiers, names) if spec.writeonly]
    return StorageManager(tiers, readonly=readonly, writeonly=writeonly)
