"""Core layer: the KV connector's two sides, as the scheduler and the model runner call them.

The scheduler side answers how many more prompt tokens the store holds past
the local prefix-cache hit, plans their load into the blocks the scheduler
allocated, and names each step's loads and saves (`KVConnectorMetadata`).
The worker side carries them out around the forward pass and reports each
load's end (`KVConnectorOutput`). Which requests wait for a load, and what
happens when one comes back short, is the scheduler's business
(`kv_loads`), not the connector's.
"""

from __future__ import annotations

from typing import Protocol

from pagoda.core.connector.base import SchedulerConnector, WorkerConnector
from pagoda.core.connector.kv_metadata import KVConnectorMetadata, KVConnectorOutput
from pagoda.core.kv_cache_interface import BlockIds
from pagoda.core.request import Request


class BlockIdsFn(Protocol):
    def __call__(self, req_id: str) -> BlockIds: ...


class KVConnectorSchedulerSide(SchedulerConnector, Protocol):
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        """Prompt tokens past `num_computed_tokens` the store can supply, and whether the load is asynchronous."""

    def update_state_after_alloc(self, request: Request, block_ids: BlockIds, num_computed_tokens: int,
                                 num_external_tokens: int, is_async: bool) -> None:
        """Plan the load of [num_computed_tokens, + num_external_tokens) into the blocks just allocated."""

    def build_connector_meta(self, num_scheduled_tokens: dict[str, int], requests: dict[str, Request],
                             block_ids_of: BlockIdsFn) -> KVConnectorMetadata:
        """This step's loads and saves; called before the scheduler advances `num_computed_tokens`."""

    def load_failed(self, request: Request, num_good_tokens: int) -> None:
        """A load of the request came back short: it recomputes past `num_good_tokens`, never loading again."""


class KVConnectorWorkerSide(WorkerConnector, Protocol):
    def start_load_kv(self, metadata: KVConnectorMetadata) -> None:
        """Begin this step's loads and note its saves."""

    def wait_for_layer_load(self, layer_index: int) -> None:
        """Block until layer `layer_index` of this step's in-step loads is in the KV cache."""

    def save_kv_layer(self, layer_index: int) -> None:
        """Layer `layer_index` has written this step's KV: save what this step completes."""

    def wait_for_save(self) -> None:
        """Return once this step's saves no longer read the KV cache."""

    def finish_step(self, idle: bool) -> KVConnectorOutput:
        """Loads that ended: this step's in-step ones and any async ones; waits briefly when `idle`."""

    def abort_step(self) -> None:
        """The forward pass raised: stop this step's transfers touching the KV cache and drop them."""
