"""Models layer: model code (Llama, Gemma 3), weight loading, and GGUF conversion into Hugging Face folders.

Public entry points: `resolve_model` (alias / folder / .gguf -> folder),
`load_hf_config`, `load_model` (folder -> model on a device), and the
`AttentionContext` / `AttentionLayerSpec` contract the worker implements.
"""

from pagoda.models.interfaces import AttentionContext, AttentionLayerSpec
from pagoda.models.loader import load_hf_config, load_model
from pagoda.models.resolve import MODEL_ALIASES, resolve_model

__all__ = [
    "MODEL_ALIASES",
    "AttentionContext",
    "AttentionLayerSpec",
    "load_hf_config",
    "load_model",
    "resolve_model",
]
