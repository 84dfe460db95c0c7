"""Models layer: maps a config's architecture name to the model class, importing it only when asked."""

from __future__ import annotations

import importlib

from torch import nn

# Architecture name in config.json -> (module, class). Modules load lazily so
# that naming one model does not import every other.
_MODELS: dict[str, tuple[str, str]] = {
    "Gemma3ForCausalLM": ("pagoda.models.gemma3", "Gemma3ForCausalLM"),
    "Gemma3ForConditionalGeneration": ("pagoda.models.gemma3_mm", "Gemma3ForConditionalGeneration"),
    "LlamaForCausalLM": ("pagoda.models.llama", "LlamaForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _MODELS:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(supported_architectures())}"
        )
    module_name, class_name = _MODELS[architecture]
    return getattr(importlib.import_module(module_name), class_name)


def architecture_of(config: dict) -> str:
    """The single architecture a config.json names."""
    architectures = config.get("architectures") or []
    if len(architectures) != 1:
        raise ValueError(f"config.json must name exactly one architecture, got {architectures!r}")
    return architectures[0]
