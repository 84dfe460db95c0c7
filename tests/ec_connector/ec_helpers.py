"""Test helpers for the EC connector: engine configs around an EC store, both connector sides, encoder outputs.

The configs point at a throwaway model folder whose config.json has only
what the connector reads (the text model's hidden size); the model's
identity is a plain string, so two configs can name the same or different
models at will.
"""

from __future__ import annotations

import json
from pathlib import Path

import blake3
import torch

from pagoda.config import ECTransferConfig, ModelConfig, PagodaConfig
from pagoda.core.connector.ec import ECConnectorSchedulerSide, ECConnectorWorkerSide
from pagoda.core.connector.ec_metadata import ECConnectorMetadata, ECLoadSpec
from pagoda.core.request import Request
from pagoda.ec_connector.factory import make_ec_scheduler_connector, make_ec_worker_connector
from pagoda.kv_store_spec import parse_kv_store_spec
from pagoda.sampling_params import SamplingParams

NUM_EMBEDS = 256  # one Gemma 3 image crop's soft tokens
HIDDEN_SIZE = 64
MODEL_ID = "gemma3-mm-test@0123456789abcdef"


def model_folder(root: Path, hidden_size: int = HIDDEN_SIZE) -> Path:
    folder = root / f"model-{hidden_size}"
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
              "text_config": {"hidden_size": hidden_size}, "vision_config": {"hidden_size": 32}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def make_config(root: Path, ec_store: str, ec_role: str, lookup_address: str | None, *, identity: str = MODEL_ID,
                dtype: str = "float32", hidden_size: int = HIDDEN_SIZE) -> PagodaConfig:
    model = ModelConfig(model="test", path=str(model_folder(root, hidden_size)),
                        architecture="Gemma3ForConditionalGeneration", dtype=dtype, max_model_len=8192,
                        vocab_size=1000, eos_token_ids=(1,), identity=identity)
    ec = ECTransferConfig(parse_kv_store_spec(ec_store, flag="--ec-store"), ec_role, lookup_address)
    return PagodaConfig(model, ec_transfer_config=ec)


def worker_side(config: PagodaConfig) -> ECConnectorWorkerSide:
    connector = make_ec_worker_connector(config, torch.device("cpu"))
    assert connector is not None
    return connector


def scheduler_side(config: PagodaConfig) -> ECConnectorSchedulerSide:
    connector = make_ec_scheduler_connector(config)
    assert connector is not None
    return connector


def identifier(name: str) -> str:
    """An mm_hash-like identifier: the full hex blake3 of `name`."""
    return blake3.blake3(name.encode()).hexdigest()


def encoder_output(seed: int, dtype: torch.dtype = torch.float32, num_embeds: int = NUM_EMBEDS,
                   hidden_size: int = HIDDEN_SIZE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_embeds, hidden_size, generator=generator).to(dtype)


def load_metadata(*identifiers: str, num_embeds: int = NUM_EMBEDS) -> ECConnectorMetadata:
    return ECConnectorMetadata(loads=[ECLoadSpec(name, num_embeds) for name in identifiers])


def make_request(request_id: str = "r0") -> Request:
    return Request(request_id, [2, 3, 4], SamplingParams(max_tokens=4), 1, 0.0)


def save(connector: ECConnectorWorkerSide, items: dict[str, torch.Tensor]) -> None:
    """Save `items` as the encoder would have produced them, and wait until every tier holds them."""
    encoder_cache = dict(items)
    for name in items:
        connector.save_caches(encoder_cache, name)
    connector.flush()
