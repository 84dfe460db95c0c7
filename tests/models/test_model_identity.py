"""Tests for the models layer: the content identity that names a model in KV store keys."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from pagoda.models.identity import model_identity

CONFIG = {"model_type": "llama", "hidden_size": 8, "vocab_size": 16}


def make_folder(folder: Path, shards: dict[str, dict[str, np.ndarray]], config: dict = CONFIG) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    for file_name, tensors in shards.items():
        save_file(tensors, str(folder / file_name))
    if len(shards) > 1:
        weight_map = {name: file_name for file_name, tensors in shards.items() for name in tensors}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def weights(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        "model-00001-of-00002.safetensors": {"embed.weight": rng.standard_normal((16, 8), dtype=np.float32)},
        "model-00002-of-00002.safetensors": {"layer.0.weight": rng.standard_normal((8, 8), dtype=np.float32),
                                             "norm.weight": np.ones(8, dtype=np.float32)},
    }


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "a" / "model", weights())


def safetensors_header(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: 8 + int.from_bytes(data[:8], "little")]


def test_stable_across_calls_and_independent_of_the_folder_path(base: Path, tmp_path: Path) -> None:
    identity = model_identity(base)
    assert identity == model_identity(base)
    assert identity.startswith("llama-") and len(identity) == len("llama-") + 16
    renamed = tmp_path / "elsewhere" / "another-name"
    shutil.copytree(base, renamed)
    assert model_identity(renamed) == identity


def test_changes_with_config_json(base: Path, tmp_path: Path) -> None:
    other = make_folder(tmp_path / "b" / "model", weights(), config={**CONFIG, "rms_norm_eps": 1e-5})
    assert model_identity(other) != model_identity(base)


@pytest.mark.parametrize("shard", [0, 1])
def test_changes_with_any_weight_files_header(base: Path, tmp_path: Path, shard: int) -> None:
    shards = weights()
    file_name = list(shards)[shard]
    # The same bytes under another shape: only the header differs (safetensors pads it, so the size stays).
    shards[file_name] = {name: tensor.reshape(4, -1) if tensor.ndim == 2 else tensor
                         for name, tensor in shards[file_name].items()}
    other = make_folder(tmp_path / "b" / "model", shards)
    assert safetensors_header(other / file_name) != safetensors_header(base / file_name)
    assert (other / file_name).stat().st_size == (base / file_name).stat().st_size
    assert model_identity(other) != model_identity(base)


def test_changes_with_weights_whose_headers_are_equal(base: Path, tmp_path: Path) -> None:
    # A fine-tune: same names, dtypes and shapes, so byte-identical headers and sizes.
    shards = weights()
    shards["model-00002-of-00002.safetensors"]["norm.weight"] = np.full(8, 1.01, dtype=np.float32)
    other = make_folder(tmp_path / "b" / "model", shards)
    for file_name in shards:
        assert safetensors_header(other / file_name) == safetensors_header(base / file_name)
        assert (other / file_name).stat().st_size == (base / file_name).stat().st_size
    assert model_identity(other) != model_identity(base)


def test_changes_with_quantization(base: Path) -> None:
    assert model_identity(base, "int8") != model_identity(base)


def test_a_file_that_is_not_safetensors_is_named(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "m", weights())
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="model-00001-of-00002.safetensors is not a safetensors file"):
        model_identity(folder)
