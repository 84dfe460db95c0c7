"""`/v1/chat/completions` through the official `openai` client against a real `pagoda serve` subprocess."""

from __future__ import annotations

import pytest

from pagoda import SamplingParams

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"  # what the `openai_server` fixture serves
CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name one planet."},
]


def chat(client, messages=CONVERSATION, **kwargs):
    kwargs.setdefault("max_tokens", 8)
    kwargs.setdefault("temperature", 0.0)
    return client.chat.completions.create(model=MODEL, messages=messages, **kwargs)


def test_greedy_reply_equals_llm_chat(client, smollm_llm):
    expected = smollm_llm.chat(CONVERSATION, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)[0]
    response = chat(client)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.outputs[0].text
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert response.usage.prompt_tokens_details.cached_tokens is not None


def test_stream_opens_with_the_role_and_adds_up_to_the_reply(client):
    full = chat(client).choices[0].message.content
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == full
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > chunks[-1].usage.completion_tokens > 0


def test_text_content_parts_equal_plain_content(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name one "}, {"type": "text", "text": "planet."}]}]
    plain = [{"role": "user", "content": "Name one planet."}]
    assert chat(client, parts).choices[0].message.content == chat(client, plain).choices[0].message.content


def test_logprobs_with_top_alternatives(client):
    choice = chat(client, max_tokens=5, logprobs=True, top_logprobs=2).choices[0]
    content = choice.logprobs.content
    assert len(content) == 5
    assert "".join(entry.token for entry in content) == choice.message.content
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)  # greedy: the top one
        assert bytes(entry.bytes).decode() == entry.token


def test_max_completion_tokens_and_n(client):
    response = chat(client, max_completion_tokens=3, n=2, temperature=0.9, seed=5,
                    extra_body={"ignore_eos": True})
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in response.choices)
    assert response.usage.completion_tokens == 6


def test_stream_with_n_sends_each_choice(client):
    chunks = list(chat(client, n=2, max_tokens=3, stream=True, extra_body={"ignore_eos": True}))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and
                c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length"}


def test_an_image_part_to_a_text_model_is_a_400_naming_messages(client):
    import openai

    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, messages=[{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}])
    assert "takes no images" in str(info.value) and info.value.body["param"] == "messages"
