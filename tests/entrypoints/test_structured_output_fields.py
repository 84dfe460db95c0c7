"""The request fields that ask for structured output: each dialect maps to one constraint, and any JSON at all
in them is either a constraint or a ValueError naming the field (never another exception, so never a 500)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pagoda.entrypoints.openai.protocol import CompletionRequest
from pagoda.entrypoints.openai.structured_outputs import SOURCE_FIELDS, structured_outputs_of
from pagoda.sampling_params import StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize(("fields", "expected"), [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": None, "guided_json": None}, None),
    ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": True}}},
     StructuredOutputsParams(json=SCHEMA)),
    ({"structured_outputs": {"regex": "[a-z]+", "json": None}}, StructuredOutputsParams(regex="[a-z]+")),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
     StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)),
    ({"guided_json": SCHEMA}, StructuredOutputsParams(json=SCHEMA)),
    ({"guided_choice": ["a", "b"]}, StructuredOutputsParams(choice=["a", "b"])),
    ({"guided_grammar": 'root ::= "x"'}, StructuredOutputsParams(grammar='root ::= "x"')),
])
def test_each_dialect_maps_to_its_constraint(fields, expected):
    assert structured_outputs_of(fields) == expected


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4), max_leaves=12)
_keys = st.sampled_from(["type", "json_schema", "schema", "json", "regex", "choice", "grammar", "json_object",
                         "properties", "items", "enum", "anyOf", "$ref", "minimum", "pattern", "required"])
_shaped = st.recursive(_json, lambda inner: st.dictionaries(_keys, inner, max_size=5), max_leaves=16)


@settings(max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(SOURCE_FIELDS), _shaped)
def test_any_json_in_a_field_is_a_constraint_or_a_value_error_naming_the_field(field, value):
    try:  # the server's own request model first: values of the wrong type are its 400
        request = CompletionRequest.model_validate({"prompt": "a", field: value})
    except ValidationError:
        return
    try:
        params = structured_outputs_of({name: getattr(request, name) for name in SOURCE_FIELDS})
    except ValueError as error:
        assert str(error).startswith(f"{field}: "), error
        return
    assert params is None or isinstance(params, StructuredOutputsParams)
