"""Greedy tokens and logprobs equal transformers' on the same converted weights (float32), both models."""

from __future__ import annotations

import pytest
import torch

from pagoda import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "1, 2, 3, 4, 5,",
    "Photosynthesis is the process by which",
    "Translate to French: I like apples. ->",
    "The quick brown fox",
    "日本の首都は",
]
NUM_NEW_TOKENS = 32
# Logprobs of the top candidates at every generated position, compared to transformers.
LOGPROB_ATOL = 2e-3

pytestmark = pytest.mark.slow


def hf_greedy(model, token_ids: list[int], num_new: int) -> tuple[list[int], torch.Tensor]:
    with torch.inference_mode():
        # No eos: like ignore_eos, the end token may be chosen and generation goes on (min_new_tokens would
        # instead forbid it).
        out = model.generate(torch.tensor([token_ids]), max_new_tokens=num_new, eos_token_id=None, pad_token_id=0,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(token_ids):].tolist()
    logprobs = torch.log_softmax(torch.stack(out.logits)[:, 0].float(), dim=-1)
    return tokens, logprobs


@pytest.mark.parametrize("model_name", ["gemma3-270m", "smollm2-135m"])
def test_greedy_tokens_and_logprobs_match_transformers(model_name, llms, hf_models):
    llm, hf = llms[model_name], hf_models[model_name]
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, min_tokens=NUM_NEW_TOKENS,
                            ignore_eos=True, logprobs=5)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    worst = 0.0
    for prompt, output in zip(PROMPTS, outputs):
        expected_tokens, expected_logprobs = hf_greedy(hf, output.prompt_token_ids, NUM_NEW_TOKENS)
        completion = output.outputs[0]
        assert completion.token_ids == expected_tokens, prompt
        for step, position in enumerate(completion.logprobs):
            for token_id, logprob in position.items():
                worst = max(worst, abs(logprob.logprob - expected_logprobs[step, token_id].item()))
    assert worst < LOGPROB_ATOL, f"max logprob difference {worst}"


def test_gemma_prompt_starts_with_bos(gemma_llm):
    output = gemma_llm.generate("Hello", SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert output.prompt_token_ids[0] == 2
