"""Test data: 22 varied JSON schemas for the structured-output tests (every string, array and number bounded,
so a small model's output fits its token budget)."""

from __future__ import annotations

from typing import Any

_NAME = {"type": "string", "minLength": 1, "maxLength": 20}

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": _NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"person": {"type": "object", "properties": {
        "name": _NAME, "address": {"type": "object", "properties": {
            "city": _NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"]}},
        "required": ["name", "address"]}}, "required": ["person"]},
    {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50}, "minItems": 1, "maxItems": 5},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "radius": {"type": "integer", "minimum": 1,
                                                                                 "maximum": 99}},
         "required": ["kind", "radius"]},
        {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1,
                                                                               "maximum": 99}},
         "required": ["kind", "side"]}]},
    {"type": "object", "properties": {"title": _NAME, "subtitle": _NAME, "pages": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 999}},
     "required": ["title"]},
    {"type": "object", "properties": {"active": {"type": "boolean"}, "admin": {"type": "boolean"}},
     "required": ["active", "admin"]},
    {"type": "object", "properties": {"ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}},
     "required": ["ratio"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 1000},
                                         "tags": {"type": "array", "maxItems": 3,
                                                  "items": {"enum": ["new", "sale", "old"]}}},
        "required": ["id", "tags"]}}}, "required": ["items"]},
    {"type": "array", "minItems": 2, "maxItems": 2,
     "items": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer", "minimum": 0,
                                                                         "maximum": 9}}},
    {"type": "object", "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
     "required": ["date"]},
    {"type": "object", "properties": {"version": {"const": 2}, "name": _NAME}, "required": ["version", "name"]},
    {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                          "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                         "required": ["x", "y"]}},
     "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
     "required": ["start", "end"]},
    {"type": "object", "properties": {"value": {"anyOf": [_NAME, {"type": "integer", "minimum": 0,
                                                                   "maximum": 100}]}},
     "required": ["value"]},
    {"type": "object", "properties": {"nickname": {"type": ["string", "null"], "maxLength": 12}},
     "required": ["nickname"]},
    {"type": "object", "properties": {"score": {"type": "integer", "minimum": 10, "maximum": 20}},
     "required": ["score"]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "boolean"}}, "required": ["c"]}}, "required": ["b"]}}, "required": ["a"]},
    {"type": "object", "properties": {"size": {"enum": ["S", "M", "L"]}, "count": {"enum": [1, 2, 3]}},
     "required": ["size", "count"]},
    {"type": "array", "maxItems": 3, "items": _NAME},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "error": _NAME,
                                      "code": {"type": "integer", "minimum": 100, "maximum": 599}},
     "required": ["ok", "code"]},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000},
                                      "currency": {"enum": ["EUR", "USD", "JPY"]}},
     "required": ["price", "currency"]},
    {"type": "object", "properties": {"languages": {"type": "array", "minItems": 1, "maxItems": 4,
                                                    "items": {"enum": ["python", "rust", "go", "c"]}},
                                      "years": {"type": "integer", "minimum": 0, "maximum": 50}},
     "required": ["languages", "years"]},
]
