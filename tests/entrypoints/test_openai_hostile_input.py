"""Hostile request bodies against a real `pagoda serve`: each gets a 400 naming the problem or a correct answer.

The explicit cases behind the fuzzer (test_openai_fuzz.py): lone surrogates
and NUL wherever text goes, integers past 64 bits, NaN and infinities,
bodies that are not JSON objects or not JSON, deep nesting, texts too long
to tokenize in reasonable time, and batches asking for too many completions.
Bodies are sent as raw bytes, since no JSON library would produce most of them.
"""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"  # what the `openai_server` fixture serves
CHAT = '"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2'
ERROR_KEYS = {"message", "type", "param", "code"}


def post(http: httpx.Client, path: str, body: str | bytes, content_type: str = "application/json") -> httpx.Response:
    return http.post(path, content=body if isinstance(body, bytes) else body.encode(),
                     headers={"Content-Type": content_type})


def assert_400(response: httpx.Response, param: str | None, words: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"], error


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": "ab", "max_tokens": 2, "stop": ["\\udc00"]}', "stop"),
    ("/v1/completions", '{"prompt": "ab", "max_tokens": 2, "model": "\\ud83d"}', "model"),
    ("/v1/completions", '{"prompt": "ab", "max_tokens": 2, "logit_bias": {"\\udc00": 1}}', "logit_bias"),
    ("/v1/completions", '{"prompt": "ab", "max_tokens": 2, "user": "\\ud800"}', "user"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}', "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x", "name": "\\udbff"}]}', "messages"),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
    ("/tokenize", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages"),
    ("/detokenize", '{"tokens": [1, 2], "model": "\\ud800"}', "model"),
])
def test_lone_surrogates_are_400_naming_the_field(http, path, body, param):
    assert_400(post(http, path, body), param, "lone surrogate")


def test_nul_and_astral_characters_are_answered(http):
    for prompt in ("a\\u0000b", "\\ud83d\\ude00 smile"):  # NUL; a valid surrogate pair (an emoji)
        response = post(http, "/v1/completions", f'{{"prompt": "{prompt}", "max_tokens": 2, "stop": ["\\u0000"]}}')
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1, response.text
    tokens = post(http, "/tokenize", '{"prompt": "\\u0000"}').json()["tokens"]
    assert post(http, "/detokenize", f'{{"tokens": {tokens}}}').json()["prompt"] == "\0"
    assert post(http, "/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\u0000"}], '
                '"max_tokens": 2}').status_code == 200


HUGE = str(10**30)


@pytest.mark.parametrize(("path", "body", "param", "words"), [
    ("/v1/completions", f'{{"prompt": "ab", "seed": {HUGE}}}', "seed", "less than or equal"),
    ("/v1/completions", f'{{"prompt": "ab", "seed": -{HUGE}}}', "seed", "greater than or equal"),
    ("/v1/completions", f'{{"prompt": "ab", "top_k": {HUGE}}}', "top_k", "less than or equal"),
    ("/v1/completions", f'{{"prompt": [1, {HUGE}]}}', "prompt", ""),
    ("/v1/completions", f'{{"prompt": "ab", "max_tokens": {HUGE}}}', "max_tokens", "maximum context length"),
    ("/v1/completions", f'{{"prompt": "ab", "max_tokens": 2, "min_tokens": {HUGE}}}', "min_tokens", "max_tokens"),
    ("/v1/completions", f'{{"prompt": "ab", "stop_token_ids": [{HUGE}]}}', "stop_token_ids", "vocabulary"),
    ("/v1/completions", f'{{"prompt": "ab", "logit_bias": {{"{HUGE}": 1}}}}', "logit_bias", "vocabulary"),
    ("/v1/completions", f'{{"prompt": "ab", "n": {HUGE}}}', "n", "less than or equal"),
    ("/v1/chat/completions", f'{{{CHAT}, "top_logprobs": {HUGE}, "logprobs": true}}', "top_logprobs", ""),
    ("/detokenize", f'{{"tokens": [{HUGE}]}}', "tokens", "vocabulary"),
    ("/detokenize", '{"tokens": [-1]}', "tokens", "vocabulary"),
])
def test_integers_past_64_bits_or_the_vocabulary_are_400(http, path, body, param, words):
    assert_400(post(http, path, body), param, words)


def test_seeds_across_the_64_bit_range_are_answered(http):
    for seed in (-(1 << 63), -1, 0, (1 << 63) - 1):
        response = post(http, "/v1/completions", f'{{"prompt": "ab", "max_tokens": 2, "seed": {seed}}}')
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize("param", ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                   "frequency_penalty", "length_penalty"])
def test_non_finite_floats_are_400(http, param, value):
    assert_400(post(http, "/v1/completions", f'{{"prompt": "ab", "{param}": {value}}}'), param, "finite")


def test_non_finite_logit_bias_is_400(http):
    assert_400(post(http, "/v1/completions", '{"prompt": "ab", "logit_bias": {"5": NaN}}'), "logit_bias", "finite")


@pytest.mark.parametrize("body", ["[]", '"prompt"', "null", "1", "", '[{"prompt": "ab"}]'])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
def test_bodies_that_are_not_json_objects_are_400(http, path, body):
    assert_400(post(http, path, body), None, "JSON object")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "", "application/xml"])
def test_wrong_content_types_are_400(http, content_type):
    assert_400(post(http, "/v1/completions", '{"prompt": "ab"}', content_type), None, "application/json")


@pytest.mark.parametrize("body", [
    b'{"prompt": "ab"',  # truncated
    b'{"prompt": "\xff\xfe"}',  # not UTF-8
    b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # deeper than the JSON parser goes
    b"[" * 100_000 + b"]" * 100_000,
])
def test_malformed_or_too_deeply_nested_json_is_400(http, body):
    response = post(http, "/v1/completions", body)
    assert response.status_code == 400 and set(response.json()["error"]) == ERROR_KEYS, response.text


def test_nesting_the_parser_accepts_is_refused_by_the_field(http):
    assert_400(post(http, "/v1/completions", '{"prompt": ' + "[" * 500 + "]" * 500 + "}"), "prompt", "")
    # Deep nesting inside a field Pagoda does not read is ignored.
    deep = '{"a": ' * 400 + "1" + "}" * 400
    response = post(http, "/v1/completions", f'{{"prompt": "ab", "max_tokens": 2, "x_unknown": {deep}}}')
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", '{"prompt": "%s"}', "prompt"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "%s"}]}', "messages"),
    ("/tokenize", '{"prompt": "%s"}', "prompt"),
])
def test_text_too_long_for_any_tokenization_is_400_without_tokenizing(http, path, body, param):
    # 12 MB of text: tokenizing it would hold the server for ~10 s; the refusal comes from its byte length.
    assert_400(post(http, path, body % ("ab " * 4_000_000)), param, "bytes of text")


def test_batches_asking_for_too_many_completions_are_400(http):
    prompts = ", ".join(['"a"'] * 65)
    assert_400(post(http, "/v1/completions", f'{{"prompt": [{prompts}], "n": 2}}'), "n", "at most 128")
    many = ", ".join(['"a"'] * 129)
    assert_400(post(http, "/v1/completions", f'{{"prompt": [{many}]}}'), "prompt", "at most 128")
    ok = post(http, "/v1/completions", f'{{"prompt": [{prompts[5:]}], "n": 2, "max_tokens": 1}}')  # 64 prompts
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 128


def test_the_server_answers_normally_after_hostile_input(http):
    post(http, "/v1/completions", '{"prompt": "\\ud800"}')
    post(http, "/v1/completions", b"[" * 100_000)
    response = post(http, "/v1/completions", '{"prompt": "Hi", "max_tokens": 2}')
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2
    assert http.get("/health").status_code == 200
