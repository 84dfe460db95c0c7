"""KV connector fixtures: the greedy tokens of every store test prompt from an engine without a store."""

from __future__ import annotations

from pathlib import Path

import pytest
from store_helpers import KV_BYTES, OTHER_PROMPT, PARAMS, PARTIAL_PROMPT, PROMPT

from pagoda import LLM


@pytest.fixture(scope="session")
def cold(gemma_path: Path) -> dict[str, list[int]]:
    llm = LLM(str(gemma_path), dtype="float32", kv_cache_memory=KV_BYTES, max_model_len=2048)
    outputs = llm.generate([PROMPT, PARTIAL_PROMPT, OTHER_PROMPT], PARAMS, use_tqdm=False)
    llm.shutdown()
    return {name: output.outputs[0].token_ids for name, output in zip(("full", "partial", "other"), outputs)}
