"""Entrypoints layer: the request fields that ask for structured output, as one `StructuredOutputsParams`.

Clients ask in three dialects: OpenAI's `response_format` (`json_object`, or
`json_schema` with its `schema`), vLLM's `structured_outputs` object (`json`,
`regex`, `choice`, `grammar`, `json_object`, `disable_any_whitespace`), and
vLLM's older `guided_json` / `guided_regex` / `guided_choice` /
`guided_grammar`. A request may use one of them, once; anything malformed or
that the grammar library cannot read is a ValueError whose message starts
with the field the client sent (the server turns it into a 400 naming it).
"""

from __future__ import annotations

import re
from typing import Any

from pagoda.sampling_params import StructuredOutputsParams
from pagoda.structured_output.grammar import check_structured_outputs

SOURCE_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                 "guided_grammar")
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace")


def structured_outputs_of(fields: dict[str, Any]) -> StructuredOutputsParams | None:
    """The constraint the request's `SOURCE_FIELDS` values ask for; None when they ask for none."""
    asked = {name: value for name, value in fields.items() if _asks(name, value)}
    if not asked:
        return None
    if len(asked) > 1:
        raise ValueError(f"{' and '.join(asked)}: a request may ask for one structured output, in one field")
    ((source, value),) = asked.items()
    try:
        if source == "response_format":
            params = _from_response_format(value)
        elif source == "structured_outputs":
            params = _from_structured_outputs(value)
        else:
            params = StructuredOutputsParams(**{_GUIDED[source]: value})
        check_structured_outputs(params)
    except ValueError as error:
        raise ValueError(f"{source}: {_without_engine_prefix(str(error))}") from None
    return params


def _without_engine_prefix(message: str) -> str:
    """"structured_outputs.json: Invalid type" -> "Invalid type"; "SamplingParams.structured_outputs.choice must
    be ..." -> "choice must be ..." (the client named none of these fields)."""
    message = re.sub(r"^(SamplingParams\.)?structured_outputs\.[a-z_]+: ", "", message)
    return re.sub(r"^(SamplingParams\.)?structured_outputs[. ]", "", message)


def _asks(name: str, value: Any) -> bool:
    if name == "response_format":
        return value is not None and value != {"type": "text"}
    return value is not None


def _from_response_format(value: Any) -> StructuredOutputsParams:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ValueError("json_schema.schema must be a JSON schema object")
        return StructuredOutputsParams(json=schema)
    raise ValueError(f"type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def _from_structured_outputs(value: dict[str, Any]) -> StructuredOutputsParams:
    unknown = sorted(set(value) - set(_STRUCTURED_KEYS))
    if unknown:
        raise ValueError(f"{', '.join(map(ascii, unknown))} not supported (this server takes "
                         f"{', '.join(_STRUCTURED_KEYS)})")
    chosen = {key: item for key, item in value.items() if item is not None}
    if not isinstance(chosen.get("json", ""), (str, dict)):
        raise ValueError("json must be a JSON schema (an object or its text)")
    for key, kind in (("regex", str), ("grammar", str), ("choice", list), ("json_object", bool),
                      ("disable_any_whitespace", bool)):
        if key in chosen and not isinstance(chosen[key], kind):
            raise ValueError(f"{key} must be a {kind.__name__}, got {type(chosen[key]).__name__}")
    return StructuredOutputsParams(**chosen)
