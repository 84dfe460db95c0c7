"""KV store layer: opens the tiers a parsed `--kv-store` config names and orders them in a StorageManager.

With tensor parallelism every rank opens its own StorageManager (its CPU
tier is its own memory). `RankStore` says which part of the store a rank
opens: the disk folder (ranks holding different KV heads keep their entries
in folders of their own, each tier owning its folder) and whether the rank
writes the shared tiers (disk, Redis). A rank that only reads them opens its
disk tiers as readers of a folder another rank writes, and all of them read-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pagoda.kv_store_spec import KVStoreConfig, TierSpec
from pagoda.kvstore.storage_manager import StorageManager
from pagoda.kvstore.tiers.base import StorageTier
from pagoda.kvstore.tiers.cpu import CPUTier
from pagoda.kvstore.tiers.disk import DiskTier
from pagoda.kvstore.tiers.redis import RedisTier


@dataclass(frozen=True, slots=True)
class RankStore:
    """The part of a store one rank opens: `subfolder` of every disk folder (None: the folder itself), and
    whether this rank writes the shared tiers or only reads what another rank of its world writes there."""

    subfolder: str | None = None
    writes_shared: bool = True


SINGLE_PROCESS = RankStore()


def shared_writeonly_skipped(spec: TierSpec, rank_store: RankStore) -> bool:
    """A write-only shared tier is never read, so a rank that does not write the shared tiers leaves it out."""
    return spec.writeonly and spec.kind != "cpu" and not rank_store.writes_shared


def build_storage_manager(config: KVStoreConfig, rank_store: RankStore = SINGLE_PROCESS) -> StorageManager:
    """Open every tier of `config` as `rank_store` says and order them in a StorageManager."""
    tiers: list[StorageTier] = []
    names = config.tier_names()
    try:
        for spec, name in zip(config.tiers, names):
            if shared_writeonly_skipped(spec, rank_store):
                continue
            if spec.kind == "cpu":
                tiers.append(CPUTier(spec.size_bytes or 0, spec.policy))
            elif spec.kind == "disk":
                folder = Path(spec.path or "").expanduser()
                if rank_store.subfolder is not None:
                    folder = folder / rank_store.subfolder
                tiers.append(DiskTier(folder, spec.size_bytes or 0, spec.policy,
                                      reader=not rank_store.writes_shared))
            else:
                tiers.append(RedisTier(spec.url or "", spec.namespace, name=name))
    except BaseException:
        for tier in tiers:  # the disk tier runs threads: never leave them behind a failed build
            tier.close()
        raise
    opened = [(spec, name) for spec, name in zip(config.tiers, names) if not shared_writeonly_skipped(spec, rank_store)]
    # A rank that does not write the shared tiers keeps only its CPU tier (its own memory) writable.
    readonly = [name for spec, name in opened if spec.readonly or (not rank_store.writes_shared and spec.kind != "cpu")]
    writeonly = [name for spec, name in opened if spec.writeonly]
    return StorageManager(tiers, readonly=readonly, writeonly=writeonly)
