"""`/v1/completions` through the official `openai` client against a real `pagoda serve` subprocess."""

from __future__ import annotations

import pytest

from pagoda import SamplingParams

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"  # what the `openai_server` fixture serves
PROMPTS = ["The capital of France is", "def fibonacci(n):", "My favourite colour is"]


def complete(client, prompt, **kwargs):
    kwargs.setdefault("max_tokens", 8)
    kwargs.setdefault("temperature", 0.0)
    return client.completions.create(model=MODEL, prompt=prompt, **kwargs)


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_greedy_output_equals_llm_generate(client, smollm_llm):
    params = SamplingParams(temperature=0.0, max_tokens=8)
    for prompt in PROMPTS[:2]:
        expected = smollm_llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        choice = complete(client, prompt).choices[0]
        assert choice.text == expected.text
        assert choice.finish_reason == expected.finish_reason


def test_token_id_prompt_equals_text_prompt(client, http):
    token_ids = http.post("/tokenize", json={"prompt": PROMPTS[0]}).json()["tokens"]
    assert complete(client, token_ids).choices[0].text == complete(client, PROMPTS[0]).choices[0].text


def test_stream_adds_up_to_the_full_response_and_reports_usage(client):
    full = complete(client, PROMPTS[1])
    chunks = list(complete(client, PROMPTS[1], stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == full.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_usage_reports_cached_prompt_tokens(client):
    # A long prompt nobody sent before: nothing cached the first time, its full blocks the second time.
    prompt = "Notes on a lighthouse keeper's log, entry " + " ".join(str(i) for i in range(60))
    first = complete(client, prompt, max_tokens=1).usage
    second = complete(client, prompt, max_tokens=1).usage
    assert first.prompt_tokens_details.cached_tokens == 0
    assert second.prompt_tokens == first.prompt_tokens > 32
    assert second.prompt_tokens_details.cached_tokens == (first.prompt_tokens - 1) // 16 * 16
    assert first.total_tokens == first.prompt_tokens + first.completion_tokens


def test_logprobs_list_each_token_and_its_top_alternatives(client):
    choice = complete(client, PROMPTS[0], max_tokens=6, logprobs=3).choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset[0] == 0
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert 3 <= len(top) <= 4 and logprob <= 0.0
        # Greedy: the chosen token is the most likely one.
        assert logprob == pytest.approx(max(top.values()), abs=1e-5)
        assert top[token] == pytest.approx(logprob, abs=1e-5)


def test_n_choices_and_seed_reproducibility(client):
    kwargs = {"max_tokens": 6, "temperature": 1.0, "n": 2, "seed": 1234, "extra_body": {"ignore_eos": True}}
    first = complete(client, PROMPTS[2], **kwargs)
    second = complete(client, PROMPTS[2], **kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert first.usage.completion_tokens == 12


def test_batch_of_prompts_numbers_choices_by_prompt(client):
    response = complete(client, PROMPTS[:2], max_tokens=4, n=2)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    alone = complete(client, PROMPTS[0], max_tokens=4).choices[0].text
    assert response.choices[0].text == response.choices[1].text == alone


def test_stop_string_ends_the_text_before_it(client):
    full = complete(client, PROMPTS[1], max_tokens=10).choices[0].text
    stop = full.strip().split()[1]
    choice = complete(client, PROMPTS[1], max_tokens=10, stop=[stop]).choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == full[: full.index(stop)]
    kept = complete(client, PROMPTS[1], max_tokens=10, stop=[stop],
                    extra_body={"include_stop_str_in_output": True}).choices[0]
    assert kept.text == full[: full.index(stop) + len(stop)]


def test_logit_bias_forces_a_token(client, http):
    token_id = http.post("/tokenize", json={"prompt": " banana", "add_special_tokens": False}).json()["tokens"][0]
    choice = complete(client, PROMPTS[0], max_tokens=3, logit_bias={str(token_id): 100}).choices[0]
    banana = http.post("/detokenize", json={"tokens": [token_id]}).json()["prompt"]
    assert choice.text == banana * 3


def test_vllm_extra_sampling_fields(client, http):
    extra = {"ignore_eos": True, "min_tokens": 8, "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2}
    response = complete(client, PROMPTS[0], max_tokens=8, temperature=0.8, seed=1, extra_body=extra)
    assert response.usage.completion_tokens == 8 and response.choices[0].finish_reason == "length"
    # stop_token_ids: stop at the second greedy token.
    tokens = complete(client, PROMPTS[0], max_tokens=4, logprobs=0).choices[0].logprobs.tokens
    stop_id = http.post("/tokenize", json={"prompt": tokens[1], "add_special_tokens": False}).json()["tokens"]
    assert len(stop_id) == 1
    choice = complete(client, PROMPTS[0], max_tokens=4, extra_body={"stop_token_ids": stop_id}).choices[0]
    assert choice.text == tokens[0] and choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == stop_id[0]


def test_tokenize_and_detokenize_round_trip(http):
    tokens = http.post("/tokenize", json={"prompt": "Hello, world!"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 2048
    text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text.endswith("Hello, world!")
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > tokens["count"]


def test_metrics_expose_vllm_style_names(client, http):
    complete(client, PROMPTS[0], max_tokens=2)
    text = http.get("/metrics").text
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries",
                 "prefix_cache_hits", "num_preemptions", "prompt_tokens", "generation_tokens"):
        assert f"pagoda:{name}" in text, name


def test_many_stop_strings_stop_at_the_first_that_appears(client, smollm_llm):
    full = smollm_llm.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
    text = full[0].outputs[0].text
    cut = text.index(" ", 8) if " " in text[8:] else len(text) // 2
    target = text[cut:cut + 3]
    stops = [f"never-{i}-seen" for i in range(63)] + [target]
    choice = complete(client, PROMPTS[1], max_tokens=24, stop=stops).choices[0]
    assert choice.finish_reason == "stop" and choice.text == text[:text.index(target)]
