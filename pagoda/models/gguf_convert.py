"""Models layer: converts a GGUF file into a Hugging Face-style folder of float32 safetensors.

Every tensor is dequantized to float32, renamed to transformers' names, and
undone from two llama.cpp storage conventions:

- Gemma's RMSNorm computes x * (1 + w) and llama.cpp stores 1 + w, so every
  Gemma norm weight (the four per layer, QK-norm, the final norm) gets 1
  subtracted, as transformers' own GGUF loader does.
- llama.cpp permutes the rows of Llama's q/k projections so that each head's
  rotary pairs are adjacent (i, i+1); Hugging Face pairs (i, i + head_dim/2).
  The permutation is inverted per head.

The output is config.json, model*.safetensors and the tokenizer files; the
caller (`resolve.py`) writes into a scratch folder and renames it when done.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from tqdm import tqdm

from pagoda.models.gguf_config import hf_config_from_gguf
from pagoda.models.gguf_tokenizer import write_tokenizer

_MAX_SHARD_BYTES = 1 << 30
# The tokenizer arrays are huge and read by the tokenizer conversion itself.
_BULKY_KEYS = frozenset(f"tokenizer.ggml.{name}" for name in ("tokens", "scores", "token_type", "merges"))

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama.cpp's "ffn_norm" is the norm before the MLP, whose Hugging Face name differs.
_ARCH_LAYER_NAMES = {
    "llama": {"ffn_norm": "post_attention_layernorm"},
    "gemma3": {
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}


def open_gguf(path: Path) -> GGUFReader:
    """A reader over `path`, or ValueError naming the file when it is not a readable GGUF file."""
    try:
        return GGUFReader(path)
    except Exception as err:  # gguf reports damage as assorted numpy/index/value errors
        raise ValueError(f"{path} is not a valid GGUF file ({type(err).__name__}: {err})") from err


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    return {key: field.contents() for key, field in reader.fields.items() if key not in _BULKY_KEYS}


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write the Hugging Face form of `gguf_path` into the existing, empty folder `out_dir`."""
    reader = open_gguf(gguf_path)
    metadata = read_metadata(reader)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    config = hf_config_from_gguf(metadata, shapes)
    writer = _ShardWriter(out_dir)
    for tensor in tqdm(reader.tensors, desc=f"Converting {gguf_path.name}", unit="tensor"):
        writer.add(hf_tensor_name(tensor.name, metadata["general.architecture"]), _convert_tensor(tensor, config))
    writer.close()
    write_tokenizer(gguf_path, metadata, out_dir)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def hf_tensor_name(gguf_name: str, architecture: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    base, _, kind = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{kind}"
    parts = base.split(".")
    layer_names = {**_LAYER_NAMES, **_ARCH_LAYER_NAMES[architecture]}
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{kind}"
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r} for architecture {architecture!r}")


def _convert_tensor(tensor: Any, config: dict[str, Any]) -> torch.Tensor:
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as err:
        raise ValueError(f"GGUF tensor {tensor.name!r} uses unsupported type {tensor.tensor_type.name}") from err
    shape = tuple(int(d) for d in reversed(tensor.shape))
    weight = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
    if config["model_type"] == "gemma3_text" and tensor.name.endswith("norm.weight"):
        return weight - 1.0
    if config["model_type"] == "llama" and tensor.name.endswith((".attn_q.weight", ".attn_k.weight")):
        is_query = tensor.name.endswith(".attn_q.weight")
        return unpermute_rotary_rows(weight, config["num_attention_heads" if is_query else "num_key_value_heads"])
    return weight


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Invert llama.cpp's q/k row order: within each head, row 2i+j goes back to j*half + i."""
    rows = weight.shape[0]
    head = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return head.transpose(1, 2).reshape(weight.shape).contiguous()


class _ShardWriter:
    """Writes tensors into safetensors files of about `_MAX_SHARD_BYTES`, plus an index when there are several."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.total_bytes = 0
        self.shards: list[list[str]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor
        self.pending_bytes += tensor.numel() * tensor.element_size()
        self.total_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= _MAX_SHARD_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            save_file(self.pending, self.out_dir / f"shard-{len(self.shards)}.tmp", metadata={"format": "pt"})
            self.shards.append(list(self.pending))
            self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self._flush()
        if len(self.shards) == 1:
            (self.out_dir / "shard-0.tmp").rename(self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            file_name = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            (self.out_dir / f"shard-{i}.tmp").rename(self.out_dir / file_name)
            weight_map.update(dict.fromkeys(names, file_name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
