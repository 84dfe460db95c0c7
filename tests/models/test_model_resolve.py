"""Tests for the models layer: model name resolution, the conversion cache, and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tiny_gguf import write_tiny_gguf

from pagoda.models.resolve import MODEL_ALIASES, resolve_model


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(directory))
    return directory


@pytest.fixture
def tiny_llama(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-llama.gguf"
    write_tiny_gguf(path, "llama", num_layers=1)
    return path


def test_unknown_alias_lists_the_aliases() -> None:
    with pytest.raises(ValueError, match="gemma3-270m.*smollm2-135m"):
        resolve_model("gemma3-9000m")


def test_missing_path_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="known alias"):
        resolve_model(str(tmp_path / "nothing.gguf"))


def test_folder_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path))


def test_folder_with_config_is_returned_as_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()


def test_aliases_point_at_installed_gguf_files() -> None:
    # Locating the files is cheap; converting them is the slow tests' job.
    for alias, locate in MODEL_ALIASES.items():
        path = locate()
        assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000, alias


@pytest.mark.parametrize("cut", [1_000, 1_000_000, 50_000_000], ids=["header", "metadata", "tensor-data"])
def test_truncated_gguf_is_a_value_error_naming_the_file(tmp_path: Path, cache: Path, cut: int) -> None:
    source = MODEL_ALIASES["smollm2-135m"]()
    broken = tmp_path / "broken.gguf"
    with source.open("rb") as f:
        broken.write_bytes(f.read(cut))
    with pytest.raises(ValueError, match="broken.gguf"):
        resolve_model(str(broken))
    assert not any(cache.iterdir()), "a failed conversion must leave nothing in the cache"


def test_garbage_gguf_is_a_value_error_naming_the_file(tmp_path: Path, cache: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="garbage.gguf"):
        resolve_model(str(garbage))


def test_unsupported_gguf_architecture_is_named(tmp_path: Path, cache: Path) -> None:
    import gguf

    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(path, "mamba")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'mamba'.*gemma3, llama"):
        resolve_model(str(path))


def test_conversion_is_cached(tiny_llama: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = resolve_model(str(tiny_llama))
    assert first.parent == cache and (first / "config.json").is_file()

    def no_conversion(*_: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr("pagoda.models.gguf_convert.convert_gguf", no_conversion)
    assert resolve_model(str(tiny_llama)) == first
    assert [p.name for p in cache.iterdir()] == [first.name]


def test_changed_file_gets_a_new_folder(tiny_llama: Path, cache: Path) -> None:
    first = resolve_model(str(tiny_llama))
    stat = tiny_llama.stat()
    os.utime(tiny_llama, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = resolve_model(str(tiny_llama))
    assert second != first and second.name.startswith("tiny-llama-")


def test_crashed_conversion_leaves_no_folder(tiny_llama: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(_: Path, __: dict, out_dir: Path) -> None:
        assert any(out_dir.glob("*.safetensors")), "weights are written before the tokenizer"
        raise KeyboardInterrupt

    monkeypatch.setattr("pagoda.models.gguf_convert.write_tokenizer", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(str(tiny_llama))
    assert not any(cache.iterdir())
    monkeypatch.undo()
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(cache))
    assert (resolve_model(str(tiny_llama)) / "config.json").is_file()
