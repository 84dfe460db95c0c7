"""Seeds, n > 1, stops, min_tokens, logprobs and chat through the public LLM API."""

from __future__ import annotations

import pytest

from pagoda import SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time"


def texts(outputs) -> list[str]:
    return [c.text for o in outputs for c in o.outputs]


def test_same_seed_same_text_different_seeds_differ(smollm_llm):
    params = [SamplingParams(temperature=1.0, max_tokens=24, seed=s, ignore_eos=True) for s in (11, 11, 12)]
    first, again, other = texts(smollm_llm.generate([PROMPT] * 3, params, use_tqdm=False))
    assert first == again
    assert first != other


def test_seeded_request_is_independent_of_its_batch(smollm_llm):
    params = SamplingParams(temperature=0.9, max_tokens=16, seed=5, ignore_eos=True)
    alone = texts(smollm_llm.generate([PROMPT], params, use_tqdm=False))[0]
    noisy = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    batch = smollm_llm.generate(["Other text", PROMPT, "More"], [noisy, params, noisy], use_tqdm=False)
    assert batch[1].outputs[0].text == alone


def test_n_returns_n_completions_in_order(smollm_llm):
    out = smollm_llm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=3), use_tqdm=False)
    assert [c.index for c in out[0].outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out[0].outputs}) > 1


def test_max_tokens_and_min_tokens_and_finish_reasons(smollm_llm):
    out = smollm_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 5 and out[0].outputs[0].finish_reason == "length"
    greedy = smollm_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                                 use_tqdm=False)[0].outputs[0]
    stop_id = greedy.token_ids[3]
    stopped = smollm_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id]),
                                  use_tqdm=False)[0].outputs[0]
    first = greedy.token_ids.index(stop_id)
    assert stopped.token_ids == greedy.token_ids[: first + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_id
    held = smollm_llm.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id], min_tokens=first + 2),
        use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) > first + 1


def test_stop_string_truncates_text(smollm_llm):
    greedy = smollm_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                                 use_tqdm=False)[0].outputs[0]
    stop = greedy.text[10:14]
    assert stop.strip(), greedy.text
    out = smollm_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=30, stop=[stop]),
                              use_tqdm=False)[0].outputs[0]
    assert out.text == greedy.text[: greedy.text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = smollm_llm.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=30, stop=[stop], include_stop_str_in_output=True),
        use_tqdm=False)[0].outputs[0]
    assert kept.text == greedy.text[: greedy.text.index(stop) + len(stop)]


def test_detokenized_text_equals_full_decode_including_multibyte(gemma_llm):
    tokenizer = gemma_llm.get_tokenizer()
    out = gemma_llm.generate(["日本の首都は", "Emoji party: 🎉🎊", "Ünïcödé façade"],
                             SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    for o in out:
        completion = o.outputs[0]
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def test_logprobs_and_prompt_logprobs(smollm_llm):
    out = smollm_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2),
                              use_tqdm=False)[0]
    completion = out.outputs[0]
    assert len(completion.logprobs) == 4
    for token_id, position in zip(completion.token_ids, completion.logprobs):
        assert position[token_id].rank == 1  # greedy picks the most likely token
        assert len(position) <= 4
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for token_id, position in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert token_id in position and position[token_id].logprob <= 0.0
    assert completion.cumulative_logprob == pytest.approx(
        sum(p[t].logprob for t, p in zip(completion.token_ids, completion.logprobs)))


def test_chat_uses_the_template(smollm_llm):
    out = smollm_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                          SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    tokenizer = smollm_llm.get_tokenizer()
    assert "<|im_start|>assistant" in tokenizer.decode(out.prompt_token_ids)
    assert "Paris" in out.outputs[0].text


def test_chat_without_a_template_is_a_clear_error(gemma_llm):
    with pytest.raises(ValueError, match="chat template"):
        gemma_llm.chat([{"role": "user", "content": "hi"}], use_tqdm=False)
