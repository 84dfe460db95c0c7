"""EC connector layer: builds the encoder-cache connector's two sides, and the store behind the worker side.

The only place that names the connector classes, the store and its lookup
pair. The engine calls `with_private_ec_lookup_address` once, then
`make_ec_scheduler_connector` (the scheduler side and its `LookupClient`);
each worker calls `make_ec_worker_connector` (the store's tiers, the
`LookupServer` answering that client, the worker side). Both sides derive
their keys from the same config (the model's identity and dtype), so they
agree.

Tensor parallelism: the vision encoder is not split, so an encoder output is
whole and the same on every rank. Keys keep world size 1 and rank 0 (an
output is shareable with engines of any TP size); rank 0 alone writes the
shared tiers, every rank opens the same folders and loads from them (each
rank's CPU tier is its own), and a hit needs every rank to find the entry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from pagoda.config import PagodaConfig
from pagoda.core.connector.ec import ECConnectorSchedulerSide, ECConnectorWorkerSide
from pagoda.ec_connector.keys import EncoderOutputKeys
from pagoda.ec_connector.scheduler_side import ECConnectorScheduler
from pagoda.kvstore.build import RankStore
from pagoda.kvstore.lookup import LookupClient, TensorParallelLookup, open_store_with_lookup, rank_lookup_address
from pagoda.kvstore.lookup import with_private_lookup

if TYPE_CHECKING:
    import torch

    from pagoda.distributed.parallel_state import TensorParallelGroup


def with_private_ec_lookup_address(config: PagodaConfig) -> tuple[PagodaConfig, str | None]:
    """The config with a private ipc path for the EC lookup pair, and its folder (removed by the caller at
    shutdown); unchanged without an EC store."""
    return with_private_lookup(config, "ec_transfer_config", "pagoda-ec-")


def encoder_output_keys(config: PagodaConfig) -> EncoderOutputKeys:
    """Outputs are stored in the model's dtype, the one the merge into the text embeddings takes."""
    return EncoderOutputKeys(config.model_config.identity, config.model_config.dtype)


def make_ec_scheduler_connector(config: PagodaConfig) -> ECConnectorSchedulerSide | None:
    """The scheduler side, asking the store through the lookup address; None without an EC store."""
    transfer = config.ec_transfer_config
    if transfer is None:
        return None
    assert transfer.lookup_address is not None, "the engine gives the EC lookup pair an address first"
    world_size = config.parallel_config.world_size
    lookup: LookupClient | TensorParallelLookup = LookupClient(transfer.lookup_address)
    if world_size > 1:
        lookup = TensorParallelLookup(transfer.lookup_address, [0] * world_size)
    return ECConnectorScheduler(transfer, encoder_output_keys(config), lookup)


def make_ec_worker_connector(config: PagodaConfig, device: torch.device,
                             tp: TensorParallelGroup | None = None) -> ECConnectorWorkerSide | None:
    """The worker side: opens the store, starts its lookup server; None without an EC store.

    Loaded outputs land on `device`; their width is the text model's hidden
    size (read from the model folder's config.json), the rows the merge writes.
    """
    transfer = config.ec_transfer_config
    if transfer is None:
        return None
    # Imported here, not above: the worker side needs torch, the scheduler side must not pull it in.
    import torch

    from pagoda.distributed.parallel_state import SINGLE_RANK
    from pagoda.ec_connector.worker_side import ECConnectorWorker

    assert transfer.lookup_address is not None, "the engine gives the EC lookup pair an address first"
    tp = SINGLE_RANK if tp is None else tp
    hidden_size = text_hidden_size(Path(config.model_config.path))
    keys = encoder_output_keys(config)
    manager, lookup_server = open_store_with_lookup(transfer.ec_store, rank_lookup_address(transfer.lookup_address,
                                                                                           tp.rank),
                                                    RankStore(writes_shared=tp.rank == 0))
    return ECConnectorWorker(transfer, keys, manager, lookup_server, dtype=getattr(torch, config.model_config.dtype),
                             hidden_size=hidden_size, device=device, tp=tp)


def text_hidden_size(model_path: Path) -> int:
    """The language model's hidden size from a model folder's config.json (`text_config` for image models)."""
    hf_config = json.loads((model_path / "config.json").read_text())
    text_config = hf_config.get("text_config", hf_config)
    if "hidden_size" not in text_config:
        raise ValueError(f"{model_path / 'config.json'} names no hidden_size: an EC store needs the width "
                         f"of the encoder outputs")
    return int(text_config["hidden_size"])
