"""Pagoda: a readable LLM inference engine with vLLM v1's architecture.

The public names load lazily, so importing a pure-Python part (say
`pagoda.core`) never pulls in torch or the tokenizer stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "pagoda.entrypoints.llm",
    "AsyncLLM": "pagoda.engine.async_llm",
    "EngineArgs": "pagoda.engine.arg_utils",
    "SamplingParams": "pagoda.sampling_params",
    "StructuredOutputsParams": "pagoda.sampling_params",
    "RequestOutputKind": "pagoda.sampling_params",
    "RequestOutput": "pagoda.outputs",
    "CompletionOutput": "pagoda.outputs",
    "Logprob": "pagoda.outputs",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pagoda' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
