"""Worker layer: the encoder cache on the worker — runs the vision encoder, and hands each step its image rows.

The scheduler decides everything (`pagoda.core.encoder_scheduling`); this
module follows: it drops the outputs the scheduler evicted, loads what the
encoder-cache connector was asked to load, encodes the items scheduled for
encoding (and any whose load failed) in one batched call, saves fresh
outputs through the connector, and, for the step's flat batch, gathers the
encoder rows each image position takes plus each row's soft-token runs (the
blocks of bidirectional attention).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from pagoda.core.connector.ec import ECConnectorWorkerSide
from pagoda.core.multimodal import MultiModalFeature, PixelData
from pagoda.core.scheduler_output import SchedulerOutput
from pagoda.worker.input_batch import CachedRequestState


@dataclass
class StepImageRows:
    """What the model and the attention metadata need from the encoder cache for one step."""

    embeds: torch.Tensor | None  # [M, hidden] rows replacing token embeddings
    token_indices: torch.Tensor | None  # [M] their indices in the flat batch
    runs: list[list[tuple[int, int]]]  # per batch row: absolute soft-token runs this step computes (part of)

    @property
    def has_runs(self) -> bool:
        return any(self.runs)


def pixels_to_tensor(pixel_values: PixelData, device: torch.device) -> torch.Tensor:
    # A bytearray copy: torch only views writable buffers, and the bytes are shared with the request.
    array = torch.frombuffer(bytearray(pixel_values.data), dtype=getattr(torch, pixel_values.dtype))
    return array.view(pixel_values.shape).to(device)


class EncoderRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device,
                 ec_connector: ECConnectorWorkerSide | None = None) -> None:
        self.model = model
        self.device = device
        self.ec_connector = ec_connector
        # identifier -> encoder output [num_embeds, hidden] in the model's dtype.
        self.cache: dict[str, torch.Tensor] = {}
        self.num_encoded = 0
        self.num_loaded = 0
        self.failed_loads: list[str] = []

    def run(self, scheduler_output: SchedulerOutput, requests: Iterable[CachedRequestState]) -> None:
        for identifier in scheduler_output.free_encoder_mm_hashes:
            self.cache.pop(identifier, None)
        to_encode = [i for i in scheduler_output.scheduled_encoder_inputs if i not in self.cache]
        metadata = scheduler_output.ec_connector_metadata
        if self.ec_connector is not None and metadata is not None and metadata.loads:
            before = len(self.cache)
            self.ec_connector.start_load_caches(metadata, self.cache)
            failed = self.ec_connector.finish_step().failed_loads
            self.num_loaded += len(self.cache) - before
            self.failed_loads.extend(failed)
            to_encode += [i for i in failed if i not in self.cache]
        if to_encode:
            self._encode(to_encode, requests)

    def _encode(self, identifiers: list[str], requests: Iterable[CachedRequestState]) -> None:
        features = _features_by_identifier(requests, identifiers)
        pixels = torch.cat([pixels_to_tensor(features[i].pixel_values, self.device) for i in identifiers])
        outputs = self.model.embed_multimodal(pixels)  # [crops, tokens, hidden]
        start = 0
        for identifier in identifiers:
            num_crops = features[identifier].num_crops
            output = outputs[start : start + num_crops].reshape(-1, outputs.shape[-1])
            start += num_crops
            if output.shape[0] != features[identifier].num_embeds:
                raise RuntimeError(f"the encoder gave {output.shape[0]} rows for item {identifier}, "
                                   f"whose placeholders take {features[identifier].num_embeds}")
            self.cache[identifier] = output
            self.num_encoded += 1
            if self.ec_connector is not None:
                self.ec_connector.save_caches(self.cache, identifier)

    def metrics(self) -> dict[str, dict[str, float]]:
        """Counters of this worker's encoder, plus the EC connector's groups as "ec.<group>"."""
        groups = {"encoder": {"encoded_items": float(self.num_encoded), "loaded_items": float(self.num_loaded),
                              "failed_loads": float(len(self.failed_loads)), "cached_items": float(len(self.cache))}}
        if self.ec_connector is not None:
            for group, counters in self.ec_connector.metrics_snapshot().items():
                groups[f"ec.{group}"] = counters
        return groups

    def gather(self, states: list[CachedRequestState], num_computed: np.ndarray, num_scheduled: np.ndarray,
               query_start: np.ndarray) -> StepImageRows:
        """The encoder rows for every image position of the step, and each row's runs."""
        embeds: list[torch.Tensor] = []
        indices: list[np.ndarray] = []
        runs: list[list[tuple[int, int]]] = []
        for row, state in enumerate(states):
            row_runs: list[tuple[int, int]] = []
            begin, end = int(num_computed[row]), int(num_computed[row] + num_scheduled[row])
            for feature in state.mm_features:
                if feature.position.offset >= end:
                    break
                first_embed = 0
                for run_start, run_end in feature.position.absolute_embed_runs():
                    low, high = max(run_start, begin), min(run_end, end)
                    if low < high:
                        output = self.cache.get(feature.identifier)
                        if output is None:
                            raise RuntimeError(f"encoder cache miss for item {feature.identifier} "
                                               f"of request {state.req_id}")
                        embeds.append(output[first_embed + low - run_start : first_embed + high - run_start])
                        indices.append(np.arange(low, high) - begin + int(query_start[row]))
                        row_runs.append((run_start, run_end))
                    first_embed += run_end - run_start
            runs.append(row_runs)
        if not embeds:
            return StepImageRows(None, None, runs)
        return StepImageRows(torch.cat(embeds), torch.from_numpy(np.concatenate(indices)).to(self.device), runs)


def _features_by_identifier(requests: Iterable[CachedRequestState],
                            identifiers: list[str]) -> dict[str, MultiModalFeature]:
    wanted = set(identifiers)
    found: dict[str, MultiModalFeature] = {}
    for state in requests:
        for feature in state.mm_features:
            if feature.identifier in wanted and feature.pixel_values is not None:
                found.setdefault(feature.identifier, feature)
    missing = wanted - found.keys()
    if missing:
        raise RuntimeError(f"no pixels on the worker for items to encode: {sorted(missing)}")
    return found
