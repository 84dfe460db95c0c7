"""Batch invariance, chunked prefill, preemption and prefix caching: same greedy tokens every way (fp32)."""

from __future__ import annotations

import random

import pytest

from pagoda import LLM, SamplingParams

pytestmark = pytest.mark.slow

NUM_NEW_TOKENS = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, min_tokens=NUM_NEW_TOKENS, ignore_eos=True)


def mixed_prompts(num: int, vocab_hi: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [rng.choice([3, 17, 40, 97, 160, 255]) for _ in range(num)]
    return [[1] + [rng.randrange(100, vocab_hi) for _ in range(n)] for n in lengths]


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return mixed_prompts(32, 40000)


@pytest.fixture(scope="module")
def alone(smollm_path, prompts) -> list[list[int]]:
    """Each prompt on its own, on an engine of its own without prefix caching: nothing comes from a cache."""
    llm = LLM(str(smollm_path), dtype="float32", kv_cache_memory=256 << 20, max_model_len=1024,
              enable_prefix_caching=False)
    outputs = [llm.generate([p], GREEDY, use_tqdm=False)[0] for p in prompts]
    assert llm.get_metrics()["prefix_cache_hits"] == 0
    llm.shutdown()
    return [output.outputs[0].token_ids for output in outputs]


def test_batch_of_32_equals_each_prompt_alone(smollm_llm, prompts, alone):
    assert smollm_llm.reset_prefix_cache()  # the session's engine may have seen these prompts: compute them all again
    outputs = smollm_llm.generate(prompts, GREEDY, use_tqdm=False)
    assert sum(output.num_cached_tokens for output in outputs) == 0
    assert tokens(outputs) == alone


def test_chunked_prefill_with_a_small_token_budget(smollm_path, prompts, alone):
    llm = LLM(str(smollm_path), dtype="float32", kv_cache_memory=256 << 20, max_num_batched_tokens=64,
              max_model_len=1024)
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == alone


def test_preemption_with_too_few_blocks_gives_identical_tokens(smollm_llm, smollm_path, prompts, alone):
    bytes_per_block = smollm_llm.llm_engine.engine_core.engine_core.kv_cache_config.bytes_per_block
    # Enough for the longest request, far too few for the batch.
    llm = LLM(str(smollm_path), dtype="float32", kv_cache_memory=40 * bytes_per_block, max_model_len=320)
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == alone
    assert llm.get_metrics()["num_preemptions"] > 0


def test_prefix_cache_hit_computes_only_new_tokens(smollm_path):
    llm = LLM(str(smollm_path), dtype="float32", kv_cache_memory=64 << 20, block_size=16, max_model_len=1024)
    shared = [1] + [random.Random(7).randrange(100, 40000) for _ in range(199)]
    first = llm.generate([shared + [500, 501, 502]], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    second = llm.generate([shared + [600, 601]], GREEDY, use_tqdm=False)[0]
    # Every full block of the shared prefix comes from the cache: 200 // 16 * 16 tokens.
    assert second.num_cached_tokens == 192
    metrics = llm.get_metrics()
    assert metrics["prefix_cache_hits"] == 192
    cold = LLM(str(smollm_path), dtype="float32", kv_cache_memory=64 << 20, enable_prefix_caching=False,
              max_model_len=1024)
    assert cold.generate([shared + [600, 601]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == \
        second.outputs[0].token_ids


def test_prompt_logprobs_are_reported_once_across_preemption(smollm_llm, smollm_path, prompts):
    bytes_per_block = smollm_llm.llm_engine.engine_core.engine_core.kv_cache_config.bytes_per_block
    llm = LLM(str(smollm_path), dtype="float32", kv_cache_memory=40 * bytes_per_block, max_model_len=320)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, prompt_logprobs=1)
    chosen = prompts[:12]
    expected = smollm_llm.generate(chosen, params, use_tqdm=False)
    outputs = llm.generate(chosen, params, use_tqdm=False)
    assert llm.get_metrics()["num_preemptions"] > 0
    for output, reference in zip(outputs, expected):
        assert len(output.prompt_logprobs) == len(output.prompt_token_ids)
        for position, (got, want) in enumerate(zip(output.prompt_logprobs[1:], reference.prompt_logprobs[1:]), 1):
            token_id = output.prompt_token_ids[position]
            assert got[token_id].logprob == pytest.approx(want[token_id].logprob, abs=1e-4)
