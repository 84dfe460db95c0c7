"""EC connector layer, scheduler side: whether the store holds an item's encoder output, and which to load.

Implements `pagoda.core.connector.ec.ECConnectorSchedulerSide`. Runs inside
the scheduler, never imports torch, and reaches the store only through a
lookup client (`pagoda.kvstore.lookup`) answered by the worker that owns the
store, so the answer is right when the scheduler and the worker live in
different processes, even for the in-memory CPU tier. A lookup that fails or
times out answers False: the item is encoded, nothing waits on a dead worker.
Only consumers (`ec_consumer`, `ec_both`) ever answer True.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from pagoda.config import ECTransferConfig
from pagoda.core.connector.ec_metadata import ECConnectorMetadata, ECLoadSpec
from pagoda.core.request import Request
from pagoda.ec_connector.keys import EncoderOutputKeys
from pagoda.kvstore.keys import CacheEngineKey

logger = logging.getLogger(__name__)


class StoreLookup(Protocol):
    """How many leading keys the store holds (`pagoda.kvstore.lookup.LookupClient`)."""

    def lookup(self, keys: Sequence[CacheEngineKey], prefetch: bool = False) -> int: ...

    def close(self) -> None: ...


class ECConnectorScheduler:
    def __init__(self, config: ECTransferConfig, keys: EncoderOutputKeys, lookup: StoreLookup) -> None:
        self.config = config
        self.keys = keys
        self.lookup = lookup
        # This step's loads by identifier: an item shared by several requests is loaded once.
        self._loads: dict[str, ECLoadSpec] = {}

    def has_cache_item(self, identifier: str) -> bool:
        """Whether the store holds item `identifier`'s encoder output; a consumer only.

        A hit also asks the worker to promote the entry to its fastest tier,
        since the load follows within the step.
        """
        if not self.config.is_consumer:
            return False
        return self.lookup.lookup([self.keys.key(identifier)], prefetch=True) == 1

    def update_state_after_alloc(self, request: Request, identifier: str, num_embeds: int) -> None:
        """The scheduler took encoder-cache space for an item the store holds: load it this step."""
        assert self.config.is_consumer, "only a consumer answers has_cache_item True"
        if num_embeds <= 0:
            raise ValueError(f"num_embeds of item {identifier} must be positive, got {num_embeds}")
        logger.debug("EC store: request %s loads item %s (%d embeddings)", request.request_id, identifier,
                     num_embeds)
        self._loads.setdefault(identifier, ECLoadSpec(identifier, num_embeds))

    def build_connector_meta(self) -> ECConnectorMetadata:
        """This step's loads; the plan starts empty for the next step."""
        loads, self._loads = list(self._loads.values()), {}
        return ECConnectorMetadata(loads=loads)

    def request_finished(self, request: Request) -> None:
        """Nothing is kept per request: a planned load fills encoder-cache space the scheduler already
        took for the item, which other requests may share, so it stays planned."""

    def close(self) -> None:
        self.lookup.close()
