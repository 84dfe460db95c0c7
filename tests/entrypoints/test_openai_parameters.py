"""Every request parameter of OpenAI's and vLLM's completions and chat APIs, classified against a real server.

Implemented parameters are tested elsewhere (test_openai_completions.py,
test_openai_chat.py, ...). Here: parameters that never change the output are
accepted; parameters Pagoda does not implement get a 400 naming them unless
their value means "off"; unknown fields are accepted and logged.
"""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.slow

COMPLETION = {"prompt": "Hello", "max_tokens": 1}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
ENDPOINTS = {"completions": ("/v1/completions", COMPLETION), "chat": ("/v1/chat/completions", CHAT)}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

# (endpoints, parameter, a value that asks for something Pagoda does not do)
REFUSED = [
    (("completions",), "suffix", " and then"),
    (("completions", "chat"), "best_of", 3),
    (("completions", "chat"), "use_beam_search", True),
    (("completions", "chat"), "spaces_between_special_tokens", False),
    (("completions", "chat"), "truncate_prompt_tokens", 3),
    (("completions", "chat"), "allowed_token_ids", [1, 2]),
    (("completions", "chat"), "bad_words", ["the"]),
    (("completions", "chat"), "structural_tag", "{}"),
    (("completions", "chat"), "guided_whitespace_pattern", " "),
    (("completions", "chat"), "logits_processors", ["my.module.Processor"]),
    (("completions", "chat"), "return_tokens_as_token_ids", True),
    (("completions", "chat"), "return_token_ids", True),
    (("completions", "chat"), "priority", 5),
    (("completions",), "add_special_tokens", False),
    (("completions",), "prompt_embeds", "AAAA"),
    (("chat",), "add_special_tokens", True),
    (("chat",), "functions", [TOOL["function"]]),
    (("chat",), "function_call", {"name": "f"}),
    (("chat",), "audio", {"voice": "alloy", "format": "wav"}),
    (("chat",), "modalities", ["text", "audio"]),
    (("chat",), "reasoning_effort", "high"),
    (("chat",), "verbosity", "low"),
    (("chat",), "web_search_options", {}),
    (("chat",), "continue_final_message", True),
    (("chat",), "documents", [{"title": "t", "text": "x"}]),
    (("chat",), "chat_template", "{{ messages }}"),
    (("chat",), "chat_template_kwargs", {"enable_thinking": True}),
]

# (endpoints, parameter, a value that changes nothing: absent features, their "off", or metadata)
ACCEPTED = [
    (("completions", "chat"), "user", "user-1"),
    (("completions", "chat"), "best_of", 1),
    (("completions", "chat"), "response_format", {"type": "text"}),
    (("completions", "chat"), "response_format", None),
    (("completions", "chat"), "use_beam_search", False),
    (("completions", "chat"), "length_penalty", 1.5),
    (("completions", "chat"), "guided_decoding_backend", "xgrammar"),
    (("completions", "chat"), "spaces_between_special_tokens", True),
    (("completions", "chat"), "bad_words", []),
    (("completions", "chat"), "logits_processors", []),
    (("completions", "chat"), "return_tokens_as_token_ids", False),
    (("completions", "chat"), "priority", 0),
    (("completions", "chat"), "stream_options", {"include_usage": False}),
    (("completions",), "echo", False),
    (("completions",), "suffix", ""),
    (("completions",), "add_special_tokens", True),
    (("chat",), "tools", []),
    (("chat",), "tool_choice", "none"),
    (("chat",), "functions", []),
    (("chat",), "function_call", "none"),
    (("chat",), "parallel_tool_calls", False),
    (("chat",), "metadata", {"team": "a"}),
    (("chat",), "store", True),
    (("chat",), "service_tier", "auto"),
    (("chat",), "prediction", {"type": "content", "content": "Hello"}),
    (("chat",), "prompt_cache_key", "k"),
    (("chat",), "safety_identifier", "s"),
    (("chat",), "modalities", ["text"]),
    (("chat",), "echo", False),
    (("chat",), "continue_final_message", False),
    (("chat",), "add_special_tokens", False),
    (("chat",), "chat_template_kwargs", {}),
]


def _cases(table: list) -> list:
    return [pytest.param(endpoint, name, value, id=f"{endpoint}-{name}={value!r}"[:80])
            for endpoints, name, value in table for endpoint in endpoints]


@pytest.mark.parametrize(("endpoint", "param", "value"), _cases(REFUSED))
def test_unimplemented_parameters_are_400_naming_them(http: httpx.Client, endpoint, param, value):
    path, body = ENDPOINTS[endpoint]
    response = http.post(path, json={**body, param: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("endpoint", "param", "value"), _cases(ACCEPTED))
def test_parameters_that_change_nothing_are_accepted(http: httpx.Client, endpoint, param, value):
    path, body = ENDPOINTS[endpoint]
    response = http.post(path, json={**body, param: value})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_unknown_fields_are_accepted_and_logged(http: httpx.Client, openai_server, endpoint):
    path, body = ENDPOINTS[endpoint]
    response = http.post(path, json={**body, "x_pagoda_unknown_a": 1, "x_pagoda_unknown_b": {"deep": [1]}})
    assert response.status_code == 200, response.text
    warnings = [line for line in openai_server.log_path.read_text().splitlines() if "x_pagoda_unknown_a" in line]
    assert any(path in line and "'x_pagoda_unknown_b'" in line and "ignoring unknown fields" in line
               for line in warnings), warnings
