"""Tensor parallelism through the engine: `LLM(..., tensor_parallel_size=N)` runs N worker processes (gloo on
CPU) whose greedy tokens equal one rank's in float32 on the default models' real weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagoda import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
GREEDY = SamplingParams(temperature=0, max_tokens=16)


@pytest.mark.parametrize(("model", "tp"), [("gemma3-270m", 2), ("smollm2-135m", 3)])
def test_tensor_parallel_greedy_tokens_equal_one_rank(model: str, tp: int, model_paths: dict[str, Path]) -> None:
    settings = dict(dtype="float32", kv_cache_memory=64 << 20, max_model_len=512)
    one = LLM(str(model_paths[model]), **settings)
    want = [o.outputs[0].token_ids for o in one.generate(PROMPTS, GREEDY, use_tqdm=False)]
    one.shutdown()
    many = LLM(str(model_paths[model]), tensor_parallel_size=tp, **settings)
    try:
        assert many.config.parallel_config.executor_backend == "mp"
        got = [o.outputs[0].token_ids for o in many.generate(PROMPTS, GREEDY, use_tqdm=False)]
    finally:
        many.shutdown()
    assert got == want


def test_a_tensor_parallel_size_that_does_not_split_the_model_is_refused_up_front(smollm_path: Path) -> None:
    with pytest.raises(ValueError, match="sizes that work: 1, 3"):
        LLM(str(smollm_path), tensor_parallel_size=2)


def test_one_rank_cannot_run_several(smollm_path: Path) -> None:
    with pytest.raises(ValueError, match="'uni' runs one rank"):
        LLM(str(smollm_path), tensor_parallel_size=3, distributed_executor_backend="uni")
