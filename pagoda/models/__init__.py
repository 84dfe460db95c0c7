"""Models layer: model code (Llama, Gemma 3 with and without vision), weight loading, and GGUF conversion.

Public entry points: `resolve_model` (alias / folder / .gguf -> folder),
`load_hf_config`, `load_model` (folder -> model on a device), `mm_info`
(an image model's token ids and sizes, from its config), and the
`AttentionContext` / `AttentionLayerSpec` contract the worker implements.
They load on first use, so resolving a converted model (as the HTTP front
end does) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MODEL_ALIASES": "pagoda.models.resolve",
    "resolve_model": "pagoda.models.resolve",
    "AttentionContext": "pagoda.models.interfaces",
    "AttentionLayerSpec": "pagoda.models.interfaces",
    "load_hf_config": "pagoda.models.loader",
    "load_model": "pagoda.models.loader",
    "MultiModalInfo": "pagoda.models.hf_config",
    "mm_info": "pagoda.models.hf_config",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pagoda.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
