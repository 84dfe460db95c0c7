"""Grammar-driven tool calling through the official `openai` client: a named function and "required" give
calls valid for the declared parameters, streamed or not; "auto" and malformed tools are 400s saying why."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.slow

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}}, "required": ["timezone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMA_OF = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _valid(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_named_function_is_called_with_valid_arguments(client, temperature):
    response = client.chat.completions.create(
        model="smollm2-135m", messages=ASK, tools=TOOLS, max_tokens=100, temperature=temperature, seed=1,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    _valid(call)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_gives_one_or_more_valid_calls_of_declared_tools(client, parallel):
    response = client.chat.completions.create(
        model="smollm2-135m", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200,
        temperature=1.0, seed=3, parallel_tool_calls=parallel)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    assert parallel or len(choice.message.tool_calls) == 1
    for call in choice.message.tool_calls:
        _valid(call)


def test_a_conversation_with_a_tool_result_continues(client):
    first = client.chat.completions.create(
        model="smollm2-135m", messages=ASK, tools=TOOLS, max_tokens=100, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0].message
    reply = client.chat.completions.create(model="smollm2-135m", max_tokens=20, temperature=0, messages=[
        *ASK, first.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "18 degrees, sunny"}])
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_streamed_calls_add_up_to_the_same_calls(client, tool_choice):
    kwargs = dict(model="smollm2-135m", messages=ASK, tools=TOOLS, tool_choice=tool_choice, max_tokens=200,
                  temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls: dict[int, dict[str, str]] = {}
    finish_reasons = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        choice = chunk.choices[0]
        finish_reasons.append(choice.finish_reason)
        for delta in choice.delta.tool_calls or []:
            entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
    assert finish_reasons[-1] == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == [
        (call.function.name, json.loads(call.function.arguments)) for call in whole]


@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"tools": TOOLS}, "tool_choice", "'auto' needs a parser"),
    ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", "send tool_choice 'required'"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}], "tool_choice": "required"}, "tools",
     "letters, digits"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
      "tool_choice": "required"}, "tools", "strin"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot also ask for structured output"),
])
def test_tool_requests_that_cannot_be_served_are_400s_saying_why(client, extra, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smollm2-135m", messages=ASK, max_tokens=5, **extra)
    error = caught.value.body
    assert error["param"] == param and words in error["message"], error


def test_tool_choice_none_answers_in_text(client):
    response = client.chat.completions.create(model="smollm2-135m", messages=ASK, tools=TOOLS, tool_choice="none",
                                              max_tokens=8, temperature=0)
    assert response.choices[0].message.content and not response.choices[0].message.tool_calls
