"""Structured output through the official `openai` client against a real server: JSON schemas, JSON objects,
regex and choice in every dialect clients send, and 400s naming what is wrong."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest
from structured_schemas import SCHEMAS

pytestmark = pytest.mark.slow

BUDGET = 300  # tokens: every schema's strings, arrays and numbers are bounded well below this


def _ask_for(schema: dict) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Reply with a JSON value for this schema: {json.dumps(schema)}"}]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chat_outputs_parse_and_validate_against_every_schema(client, temperature):
    def complete(index: int) -> tuple[int, str, str | None]:
        schema = SCHEMAS[index]
        response = client.chat.completions.create(
            model="smollm2-135m", messages=_ask_for(schema), max_tokens=BUDGET, temperature=temperature, seed=index,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{index}", "schema": schema}})
        return index, response.choices[0].message.content, response.choices[0].finish_reason

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:  # one batch in the engine
        results = list(pool.map(complete, range(len(SCHEMAS))))
    assert len(SCHEMAS) >= 20
    for index, text, finish_reason in results:
        assert finish_reason == "stop", (index, text)
        jsonschema.validate(json.loads(text), SCHEMAS[index])


def test_json_object_on_completions_is_a_json_object(client):
    response = client.completions.create(model="smollm2-135m", prompt="A JSON object with the name and the age of a cat:",
                                         max_tokens=BUDGET, temperature=0,
                                         extra_body={"response_format": {"type": "json_object"}})
    choice = response.choices[0]
    assert choice.finish_reason == "stop", choice.text
    assert isinstance(json.loads(choice.text), dict)


@pytest.mark.parametrize("extra_body", [
    {"structured_outputs": {"regex": r"[0-9]{3}-[a-z]{2,4}"}},
    {"guided_regex": r"[0-9]{3}-[a-z]{2,4}"},
])
def test_regex_is_honoured_in_both_dialects(client, extra_body):
    for seed in range(3):
        response = client.completions.create(model="smollm2-135m", prompt="A product code:", max_tokens=20,
                                             temperature=1.0, seed=seed, extra_body=extra_body)
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", response.choices[0].text), response.choices[0].text


@pytest.mark.parametrize("extra_body", [
    {"structured_outputs": {"choice": ["positive", "negative", "not sure"]}},
    {"guided_choice": ["positive", "negative", "not sure"]},
])
def test_choice_is_honoured_in_both_dialects(client, extra_body):
    for seed in range(3):
        response = client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "Is 'I love it' positive or negative?"}],
            max_tokens=10, temperature=1.0, seed=seed, extra_body=extra_body)
        assert response.choices[0].message.content in {"positive", "negative", "not sure"}


def test_a_grammar_in_gbnf_is_honoured(client):
    response = client.completions.create(model="smollm2-135m", prompt="Answer:", max_tokens=10, temperature=1.0,
                                         seed=0, extra_body={"guided_grammar": 'root ::= ("yes" | "no") "!"'})
    assert response.choices[0].text in {"yes!", "no!"}


def test_a_streamed_constrained_answer_is_the_same_text(client):
    schema = SCHEMAS[0]
    kwargs = dict(model="smollm2-135m", messages=_ask_for(schema), max_tokens=BUDGET, temperature=0,
                  response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        stream=True, **kwargs) if chunk.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(streamed), schema)


@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format", "strin"),
    ({"response_format": {"type": "xml"}}, "response_format", "'xml'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"guided_regex": "a(b"}, "guided_regex", "unclosed group"),
    ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar", "undefined_rule"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"structured_outputs": {"json": {"type": "object"}, "regex": "a"}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs", "whitespace_pattern"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex", "one structured output"),
    # Readable as a grammar, refused only against the vocabulary, by the engine core.
    ({"structured_outputs": {"grammar": 'start: <|no_such_token|> "a"'}}, "structured_outputs",
     "unknown special token"),
])
def test_a_constraint_that_cannot_compile_is_a_400_naming_it(client, extra, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="smollm2-135m", prompt="Hi", max_tokens=5, extra_body=extra)
    error = caught.value.body
    assert error["param"] == param and words in error["message"], error


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_of_tokens_the_grammar_rules_out_are_floored_not_a_500(http, stream):
    # A choice of two words leaves most of a step's top 5 at probability 0 (logprob -inf, which JSON lacks).
    body = {"messages": [{"role": "user", "content": "Yes or no?"}], "max_tokens": 4, "temperature": 0,
            "logprobs": True, "top_logprobs": 5, "structured_outputs": {"choice": ["yes", "no"]}, "stream": stream}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    lines = [json.loads(line[6:]) for line in response.text.splitlines()
             if line.startswith("data: {")] if stream else [response.json()]
    values = [top["logprob"] for answer in lines for choice in answer["choices"] if choice.get("logprobs")
              for token in choice["logprobs"]["content"] for top in [token, *token["top_logprobs"]]]
    assert values and all(isinstance(v, float) and -9999.0 <= v <= 0 for v in values)
    assert -9999.0 in values  # some of the top 5 were ruled out
    completion = http.post("/v1/completions", json={"prompt": "Yes or no?", "max_tokens": 2, "logprobs": 5,
                                                    "structured_outputs": {"choice": ["yes", "no"]}})
    assert completion.status_code == 200, completion.text
