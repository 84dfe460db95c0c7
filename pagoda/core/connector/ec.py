"""Core layer: the encoder-cache (EC) connector's two sides, as the scheduler and the model runner call them.

Encoder outputs outlive the engine through it: the scheduler side answers
whether the store holds an item's encoder output (then the item costs
encoder-cache space but no encoder compute) and names each step's loads
(`ECConnectorMetadata`); the worker side loads those into the worker's
encoder cache before the embeddings are merged, and saves what the encoder
just produced. Roles (`ec_producer`, `ec_consumer`, `ec_both`) decide which
of the two directions an instance uses. A load that fails is not the
scheduler's problem: the worker encodes the item from its pixels instead.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any, Protocol

from pagoda.core.connector.base import SchedulerConnector, WorkerConnector
from pagoda.core.connector.ec_metadata import ECConnectorMetadata, ECConnectorOutput
from pagoda.core.request import Request


class ECConnectorSchedulerSide(SchedulerConnector, Protocol):
    def has_cache_item(self, identifier: str) -> bool:
        """Whether the store holds the encoder output of item `identifier` (False unless a consumer)."""

    def update_state_after_alloc(self, request: Request, identifier: str, num_embeds: int) -> None:
        """The scheduler took encoder-cache space for an item the store holds: load it this step."""

    def build_connector_meta(self) -> ECConnectorMetadata:
        """This step's loads; resets the plan for the next step."""


class ECConnectorWorkerSide(WorkerConnector, Protocol):
    def start_load_caches(self, metadata: ECConnectorMetadata, encoder_cache: MutableMapping[str, Any]) -> None:
        """Put each listed item's stored output into `encoder_cache` (identifier -> tensor), skipping items
        already there; an item that cannot be loaded whole is left out and reported by `finish_step`."""

    def save_caches(self, encoder_cache: MutableMapping[str, Any], identifier: str) -> None:
        """The encoder just produced `encoder_cache[identifier]`: store it (producers only; never raises)."""

    def finish_step(self) -> ECConnectorOutput:
        """Loads of this step that failed, since the last call."""
