"""Engine layer: a request's structured-output constraint as an llguidance grammar, or a ValueError naming what is wrong.

Checking a grammar needs no tokenizer and takes about a millisecond, so the
front end checks every constrained request before queueing it; the engine
core builds the matcher for the same grammar against the vocabulary.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import llguidance

from pagoda.sampling_params import StructuredOutputsParams

# Keywords whose value is one schema, a list of schemas, or a map from names to schemas.
_SCHEMA_KEYWORDS = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames",
                    "unevaluatedItems", "unevaluatedProperties")
_SCHEMA_LIST_KEYWORDS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAP_KEYWORDS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")

# Whitespace between JSON tokens: room for pretty-printing (a line break, then indentation), but not for
# the endless run of newlines a small model falls into when any whitespace is allowed.
_JSON_WHITESPACE = r"(\r?\n)?[\x20\x09]{0,32}"

# Grammar text formats vLLM's `grammar` takes: Lark, or GBNF/EBNF (llguidance converts those to Lark).
_FORMAT_OF_KIND = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}


def grammar_of(params: StructuredOutputsParams) -> str:
    """The llguidance grammar `params` asks for; ValueError("structured_outputs.<kind>: ...") if it is invalid."""
    return _grammar(params.key)


def check_structured_outputs(params: StructuredOutputsParams) -> None:
    """ValueError naming the problem if `params` cannot become a grammar."""
    grammar_of(params)


@functools.lru_cache(maxsize=256)
def _grammar(key: tuple[str, str, bool]) -> str:
    kind, spec, compact = key
    try:
        if kind in ("json", "json_object"):
            schema = _closed_objects(json.loads(spec)) if kind == "json" else {"type": "object"}
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_json_options(compact))
        else:
            grammar = llguidance.grammar_from(_FORMAT_OF_KIND[kind], spec)  # type: ignore[arg-type]
        problem = llguidance.LLMatcher.validate_grammar(grammar)
    except (ValueError, RecursionError) as error:  # RecursionError: a schema nested past Python's stack
        raise ValueError(f"structured_outputs.{kind}: {error}") from None
    except BaseException as error:
        if not is_panic(error):
            raise
        raise ValueError(f"structured_outputs.{kind}: llguidance failed on it ({str(error)[:200]})") from None
    if problem:
        raise ValueError(f"structured_outputs.{kind}: {problem}")
    return grammar


def is_panic(error: BaseException) -> bool:
    """A Rust panic inside llguidance, raised as pyo3's PanicException (a BaseException, not an Exception)."""
    return type(error).__name__ == "PanicException"


def _json_options(compact: bool) -> dict[str, Any]:
    return {"whitespace_flexible": False} if compact else {"whitespace_pattern": _JSON_WHITESPACE}


def _closed_objects(schema: Any) -> Any:
    """The schema with `additionalProperties: false` wherever an object lists its properties and says nothing more.

    JSON Schema allows unlisted properties by default, and a small model left free to add them wanders
    off into keys of its own; xgrammar's strict mode (vLLM's default) and OpenAI's strict schemas close
    such objects too. An explicit `additionalProperties` is kept as written.
    """
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    if isinstance(closed.get("properties"), dict) and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    for keyword in _SCHEMA_KEYWORDS:
        if keyword in closed:
            value = closed[keyword]
            closed[keyword] = [_closed_objects(v) for v in value] if isinstance(value, list) else _closed_objects(value)
    for keyword in _SCHEMA_LIST_KEYWORDS:
        if isinstance(closed.get(keyword), list):
            closed[keyword] = [_closed_objects(v) for v in closed[keyword]]
    for keyword in _SCHEMA_MAP_KEYWORDS:
        if isinstance(closed.get(keyword), dict):
            closed[keyword] = {name: _closed_objects(v) for name, v in closed[keyword].items()}
    return closed
