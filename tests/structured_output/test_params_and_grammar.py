"""StructuredOutputsParams' own checks, its trip across processes, and the grammars built from it."""

from __future__ import annotations

import json

import msgspec
import pytest

from pagoda import SamplingParams, StructuredOutputsParams
from pagoda.structured_output import grammar
from pagoda.structured_output.grammar import _closed_objects, check_structured_outputs


@pytest.mark.parametrize(("fields", "words"), [
    ({}, "exactly one of json, regex, choice, grammar or json_object, got none"),
    ({"json": {"type": "object"}, "regex": "a"}, "got json, regex"),
    ({"choice": []}, "non-empty list"),
    ({"choice": ["a", ""]}, "non-empty strings"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": "[1, 2]"}, "must be a JSON schema (an object), got list"),
])
def test_a_malformed_constraint_is_refused_naming_it(fields, words):
    with pytest.raises(ValueError, match="structured_outputs") as caught:
        StructuredOutputsParams(**fields)
    assert words in str(caught.value)


def test_a_schema_object_is_kept_as_text_in_its_own_key_order():
    schema = {"type": "object", "properties": {"zeta": {"type": "string"}, "alpha": {"type": "integer"}}}
    params = StructuredOutputsParams(json=schema)
    assert params.json == json.dumps(schema) and list(json.loads(params.json)["properties"]) == ["zeta", "alpha"]
    assert params.key == StructuredOutputsParams(json=json.dumps(schema)).key
    assert params.key != StructuredOutputsParams(json=schema, disable_any_whitespace=True).key


def test_sampling_params_with_a_constraint_cross_a_process_boundary_unchanged():
    params = SamplingParams(max_tokens=7, structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=SamplingParams)
    assert decoded == params and decoded.structured_outputs.kind == "choice"


@pytest.mark.parametrize(("fields", "words"), [
    ({"json": {"type": "strin"}}, "structured_outputs.json: Invalid type: strin"),
    ({"json": {"properties": {"a": {"$ref": "#/$defs/missing"}}}}, "structured_outputs.json: "),
    ({"regex": "a(b"}, "structured_outputs.regex: "),
    ({"grammar": "root ::= undefined_rule"}, "structured_outputs.grammar: "),
    ({"grammar": "start: ("}, "structured_outputs.grammar: "),
])
def test_a_constraint_the_library_cannot_read_is_a_value_error_naming_its_kind(fields, words):
    with pytest.raises(ValueError) as caught:
        check_structured_outputs(StructuredOutputsParams(**fields))
    assert str(caught.value).startswith(words), caught.value


@pytest.mark.parametrize("fields", [
    {"json": {"type": "object", "properties": {"a": {"type": "integer"}}}},
    {"json_object": True},
    {"regex": "[a-z]{2,4}"},
    {"choice": ['say "hi"', "naïve\n", "日本"]},
    {"grammar": 'root ::= ("yes" | "no") "!"'},
    {"grammar": 'start: "a" | "b"'},
])
def test_every_kind_builds(fields):
    check_structured_outputs(StructuredOutputsParams(**fields))


def test_objects_listing_their_properties_are_closed_everywhere_but_where_the_schema_says_otherwise():
    schema = {
        "type": "object",
        "properties": {"properties": {"type": "object", "properties": {"x": {"type": "integer"}}},
                       "free": {"type": "object", "properties": {"y": {}}, "additionalProperties": True}},
        "$defs": {"p": {"properties": {"z": {}}}},
        "anyOf": [{"properties": {"w": {}}}],
        "items": {"properties": {"v": {}}},
    }
    closed = _closed_objects(schema)
    assert closed["additionalProperties"] is False
    # A property named "properties" is a property, not a keyword: its map gains no entry.
    assert set(closed["properties"]) == {"properties", "free"}
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert closed["properties"]["free"]["additionalProperties"] is True
    assert closed["$defs"]["p"]["additionalProperties"] is False
    assert closed["anyOf"][0]["additionalProperties"] is False
    assert closed["items"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the request's own schema is not changed


class PanicException(BaseException):
    """Stands in for pyo3's: a Rust panic crosses into Python as a BaseException of this name."""


def test_a_panic_inside_llguidance_is_a_value_error_not_a_crash(monkeypatch: pytest.MonkeyPatch):
    # Seen in CI: a fuzzed schema made llguidance panic while truncating its own error text.
    def panic(*_args, **_kwargs):
        raise PanicException("end byte index 100 is not a char boundary")

    monkeypatch.setattr(grammar.llguidance.LLMatcher, "validate_grammar", panic)
    with pytest.raises(ValueError, match=r"structured_outputs\.regex: llguidance failed on it \(end byte index"):
        check_structured_outputs(StructuredOutputsParams(regex="[a-z]+ panics"))


def test_a_schema_nested_past_the_stack_is_a_value_error():
    deep = '{"type": "object", "properties": {"a": ' * 5000 + "{}" + "}}" * 5000
    with pytest.raises(ValueError, match=r"structured_outputs\.json"):
        check_structured_outputs(StructuredOutputsParams(json=deep))
