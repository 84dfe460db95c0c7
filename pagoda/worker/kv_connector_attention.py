"""Worker layer: the attention context that lets the KV connector work layer by layer.

It wraps the step's `PagedAttention`: before a layer reads its KV it waits
for that layer's in-step load, and once the layer has written this step's
keys and values it hands the layer to the connector's saver.
"""

from __future__ import annotations

import torch

from pagoda.core.connector.kv import KVConnectorWorkerSide
from pagoda.worker.attention.paged_attention import PagedAttention


class ConnectorAttention:
    def __init__(self, inner: PagedAttention, connector: KVConnectorWorkerSide) -> None:
        self.inner = inner
        self.connector = connector

    def forward(self, layer_index: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        self.connector.wait_for_layer_load(layer_index)
        output = self.inner.forward(layer_index, query, key, value)
        self.connector.save_kv_layer(layer_index)
        return output
