"""Models layer: builds a model from a Hugging Face-style folder (config.json + safetensors).

The model is built on the meta device, so nothing is allocated or initialised
twice. Each checkpoint tensor is then read as a view of the memory-mapped
file (`safetensors_mmap`), cast, and either adopted as the parameter (plain
weights: no copy at all when the file already holds the dtype) or copied into its
rows of a fused weight (`packed_modules_mapping`). Derived buffers (rotary
tables) are built last on the target device. Every parameter must be filled
by exactly the checkpoint's tensors: a missing or unexpected name is an error.
A model whose checkpoints come in several naming layouts (Gemma 3 vision)
defines `map_checkpoint_name(name) -> str | None`: the parameter name a
checkpoint name stands for, or None for a tensor the model does not use.
For a tensor-parallel rank (`tp`), modules that hold a slice of a tensor
define `checkpoint_slice(param_name, shard, tensor)`: the loader hands them
the full mmap view and casts only the rows or columns they return, so no
rank copies the whole checkpoint. A pipeline stage (`pp`) keeps only its
layers (`CausalLM.keep_stage`); the weights of what it dropped are skipped.
With `quantization="int8"`, the loaded weights then get their int8 copies;
last, projections that can take a faster CPU layout are packed
(`pack_weight()`, see `pagoda.models.layers.pack_for_cpu`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from pagoda.distributed.parallel_state import SINGLE_RANK, SINGLE_STAGE, PipelineStage, TensorParallelGroup
from pagoda.models.layers import MergedLinear
from pagoda.models.pipeline_stages import stage_layers
from pagoda.models.quantization import quantize_model
from pagoda.models.registry import architecture_of, get_model_class
from pagoda.models.safetensors_mmap import iter_tensors
from pagoda.models.weight_files import weight_files

# Buffers older checkpoints saved although they derive from the config.
_DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_hf_config(folder: Path) -> dict:
    """config.json of a model folder as a dict."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no config.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config


def load_model(folder: Path, dtype: torch.dtype, device: torch.device, quantization: str | None = None,
               tp: TensorParallelGroup = SINGLE_RANK, pp: PipelineStage = SINGLE_STAGE) -> nn.Module:
    """The model described by `folder`, weights cast to `dtype` on `device`, in eval mode.

    `quantization`: None, or "int8" for int8 weight copies used by small batches (`pagoda.models.quantization`).
    `tp`: the tensor-parallel group; with more than one rank, the model is this rank's share.
    `pp`: the pipeline stage; with more than one, the model holds this stage's layers only.
    """
    folder = Path(folder)
    config = load_hf_config(folder)
    model_class = get_model_class(architecture_of(config))
    with torch.device("meta"):
        model = model_class(config, tp=tp)
    if pp.num_stages > 1:
        if not hasattr(model, "keep_stage"):
            raise ValueError(f"{type(model).__name__} cannot be split into pipeline stages")
        num_layers = len(model.model.layers)
        model.keep_stage(stage_layers(num_layers, pp.stage, pp.num_stages), pp.is_first, pp.is_last)
    load_weights(model, weight_files(folder), dtype, torch.device(device))
    for module in model.modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers(torch.device(device), dtype)
    quantize_model(model, quantization)
    for module in model.modules():
        if hasattr(module, "pack_weight"):
            module.pack_weight()
    return model.eval()


def load_weights(model: nn.Module, files: Iterable[Path], dtype: torch.dtype, device: torch.device) -> None:
    """Fill every parameter of a meta-device `model` from `files`."""
    packed: dict[str, tuple[str, int]] = getattr(model, "packed_modules_mapping", {})
    ignored: frozenset[str] = getattr(model, "ignored_weights", frozenset())
    map_name: Callable[[str], str | None] = getattr(model, "map_checkpoint_name", lambda name: name)
    dropped: tuple[str, ...] = getattr(model, "dropped_prefixes", ())
    expected = _expected_pieces(model)
    loaded: set[tuple[str, int | None]] = set()
    for file in files:
        for checkpoint_name, stored in iter_tensors(file):
            name = map_name(checkpoint_name)
            if name is None or name in ignored or name.endswith(_DERIVED_SUFFIXES) or name.startswith(dropped):
                continue
            piece = _target(name, packed)
            if piece not in expected:
                raise ValueError(f"{file.name}: unexpected weight {checkpoint_name!r} for {type(model).__name__}")
            held = _rank_slice(model, *piece, stored, checkpoint_name)
            _place(model, *piece, held.to(device=device, dtype=dtype).contiguous(), checkpoint_name)
            loaded.add(piece)
    missing = sorted(f"{target}[{shard}]" if shard is not None else target for target, shard in expected - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"checkpoint is missing weights for {type(model).__name__}: {shown}")


def _expected_pieces(model: nn.Module) -> set[tuple[str, int | None]]:
    """(parameter name, shard index or None) for every piece the checkpoint must provide."""
    pieces: set[tuple[str, int | None]] = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, MergedLinear) and param_name in ("weight", "bias"):
                pieces.update((full_name, shard) for shard in range(len(module.output_sizes)))
            else:
                pieces.add((full_name, None))
    return pieces


def _target(name: str, packed: dict[str, tuple[str, int]]) -> tuple[str, int | None]:
    """Where a checkpoint tensor goes: `...q_proj.weight` -> (`...qkv_proj.weight`, 0)."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in packed:
        fused, shard = packed[parts[-2]]
        return ".".join([*parts[:-2], fused, parts[-1]]), shard
    return name, None


def _rank_slice(model: nn.Module, target: str, shard: int | None, tensor: torch.Tensor,
                source: str) -> torch.Tensor:
    """The part of a checkpoint tensor this tensor-parallel rank holds (all of it for unsplit modules)."""
    module_name, _, param_name = target.rpartition(".")
    module = model.get_submodule(module_name)
    if not hasattr(module, "checkpoint_slice"):
        return tensor
    try:
        return module.checkpoint_slice(param_name, shard, tensor)
    except ValueError as err:
        raise ValueError(f"weight {source!r} of shape {tuple(tensor.shape)}: {err}") from err


def _place(model: nn.Module, target: str, shard: int | None, tensor: torch.Tensor, source: str) -> None:
    module_name, _, param_name = target.rpartition(".")
    module = model.get_submodule(module_name)
    current: nn.Parameter = getattr(module, param_name)
    if shard is None:
        if tensor.shape != current.shape:
            raise ValueError(f"weight {source!r} has shape {tuple(tensor.shape)}, expected {tuple(current.shape)}")
        setattr(module, param_name, nn.Parameter(tensor, requires_grad=False))
        return
    rows = module.shard_rows(shard)
    expected_shape = (rows.stop - rows.start, *current.shape[1:])
    if tensor.shape != expected_shape:
        raise ValueError(f"weight {source!r} has shape {tuple(tensor.shape)}, expected {expected_shape}")
    if current.is_meta:
        storage = torch.empty(current.shape, dtype=tensor.dtype, device=tensor.device)
        current = nn.Parameter(storage, requires_grad=False)
        setattr(module, param_name, current)
    current.data[rows].copy_(tensor)
