"""`echo` and `prompt_logprobs` over HTTP, against `LLM` on the same model: the prompt's text and logprobs
come back as OpenAI's legacy API and vLLM's extension shape them, streamed or not."""

from __future__ import annotations

import json

import httpx
import pytest

from pagoda import SamplingParams

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
PROMPT = "The capital of France is"
# Prompt logprobs of the server and of the in-process engine differ only by batch shapes.
TOLERANCE = 1e-3


def _complete(http: httpx.Client, **body: object) -> dict:
    response = http.post("/v1/completions", json={"prompt": PROMPT, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def _streamed(http: httpx.Client, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


@pytest.fixture(scope="module")
def reference(smollm_llm):
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=2, prompt_logprobs=2)
    return smollm_llm.generate([PROMPT], params, use_tqdm=False)[0]


def test_echo_puts_the_prompt_before_the_completion(http, reference):
    choice = _complete(http, max_tokens=4, echo=True)["choices"][0]
    assert choice["text"] == PROMPT + reference.outputs[0].text


def test_echo_with_max_tokens_0_returns_the_prompt_alone_with_its_logprobs(http, reference):
    body = _complete(http, max_tokens=0, echo=True, logprobs=1)
    choice = body["choices"][0]
    assert choice["text"] == PROMPT
    assert body["usage"]["completion_tokens"] == 0
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(reference.prompt_token_ids)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for position, got in enumerate(logprobs["token_logprobs"][1:], 1):
        token_id = reference.prompt_token_ids[position]
        assert got == pytest.approx(reference.prompt_logprobs[position][token_id].logprob, abs=TOLERANCE)


def test_echo_with_logprobs_lists_prompt_then_completion_tokens_with_offsets_into_the_text(http, reference):
    choice = _complete(http, max_tokens=4, echo=True, logprobs=2)["choices"][0]
    logprobs = choice["logprobs"]
    num_prompt = len(reference.prompt_token_ids)
    assert len(logprobs["tokens"]) == num_prompt + 4
    completion_tokens = logprobs["tokens"][num_prompt:]
    assert "".join(completion_tokens) == reference.outputs[0].text
    # Offsets index the returned text: the completion starts where the echoed prompt ends.
    assert logprobs["text_offset"][num_prompt] == len(PROMPT)
    for offset, token in zip(logprobs["text_offset"][1:], logprobs["tokens"][1:]):
        assert choice["text"][offset:offset + len(token)] == token
    for top in logprobs["top_logprobs"][1:]:
        assert 2 <= len(top) <= 3  # the top 2, and the chosen token when it is not among them


def test_streamed_echo_adds_up_to_the_unstreamed_answer(http):
    whole = _complete(http, max_tokens=5, echo=True, logprobs=1)["choices"][0]
    chunks = _streamed(http, "/v1/completions", {"prompt": PROMPT, "temperature": 0, "max_tokens": 5,
                                                 "echo": True, "logprobs": 1})
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert sum((c["choices"][0]["logprobs"]["tokens"] for c in chunks), []) == whole["logprobs"]["tokens"]
    assert chunks[0]["choices"][0]["text"].startswith(PROMPT)


def test_prompt_logprobs_report_every_prompt_position_by_token_id(http, reference):
    choice = _complete(http, max_tokens=1, prompt_logprobs=2)["choices"][0]
    positions = choice["prompt_logprobs"]
    assert len(positions) == len(reference.prompt_token_ids) and positions[0] is None
    for position, entries in enumerate(positions[1:], 1):
        expected = reference.prompt_logprobs[position]
        assert set(entries) == {str(token_id) for token_id in expected}
        for token_id, want in expected.items():
            got = entries[str(token_id)]
            assert got["rank"] == want.rank and got["decoded_token"] == want.decoded_token
            assert got["logprob"] == pytest.approx(want.logprob, abs=TOLERANCE)


def test_chat_reports_prompt_logprobs_for_the_rendered_conversation(http):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "prompt_logprobs": 0}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    positions = answer["prompt_logprobs"]
    assert len(positions) == answer["usage"]["prompt_tokens"] and positions[0] is None
    assert all(len(entries) == 1 and next(iter(entries.values()))["logprob"] <= 0 for entries in positions[1:])


def test_chat_echo_continues_the_assistants_last_message(http):
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}]
    body = {"messages": messages, "max_tokens": 3, "temperature": 0, "echo": True}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"].startswith("Blue")
    streamed = _streamed(http, "/v1/chat/completions", body)
    assert streamed[0]["choices"][0]["delta"]["content"] == "Blue"
    plain = http.post("/v1/chat/completions", json={**body, "echo": False}).json()
    assert response.json()["choices"][0]["message"]["content"] == "Blue" + plain["choices"][0]["message"]["content"]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stream": True,
                              "prompt_logprobs": 1}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": PROMPT, "prompt_logprobs": 21}, "prompt_logprobs"),
])
def test_what_cannot_be_served_is_a_400_naming_it(http, path, body, param):
    response = http.post(path, json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
