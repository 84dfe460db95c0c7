"""Entrypoints layer: tool calling where a grammar can drive it — `tool_choice` "required" or a named function.

As vLLM does it: a named function constrains the answer to a JSON object of
that function's `parameters` schema, which becomes the one call's
`arguments`; "required" constrains it to a JSON array of one or more
`{"name": ..., "parameters": ...}` objects, one per call, each valid for the
tool it names (one item at most when `parallel_tool_calls` is false).
`tool_choice: "auto"` (OpenAI's default when tools are sent) needs a parser
for the model's own tool-call syntax, which neither default model's chat
template defines, so it is refused with a 400 saying what to send instead;
"none" generates text as usual. The declared tools are also handed to the
chat template, for templates that describe them to the model.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from pagoda.sampling_params import StructuredOutputsParams

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NO_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolPlan:
    """How this request's answer becomes tool calls: one named function, or any number of the declared ones."""

    functions: dict[str, dict[str, Any]]  # name -> its parameters schema
    named: str | None  # the one function to call, or None for "required"
    parallel: bool

    @property
    def constraint(self) -> StructuredOutputsParams:
        if self.named is not None:
            return StructuredOutputsParams(json=self.functions[self.named])
        call = [{"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
                 "required": ["name", "parameters"]} for name, schema in self.functions.items()]
        array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": call}}
        if not self.parallel:
            array["maxItems"] = 1
        return StructuredOutputsParams(json=array)

    def calls(self, text: str) -> list[dict[str, Any]]:
        """The answer as OpenAI's `tool_calls`; ValueError if it is not what the grammar allowed (cut short)."""
        if self.named is not None:
            json.loads(text)
            return [_call(self.named, text)]
        return [_call(item["name"], json.dumps(item["parameters"])) for item in json.loads(text)]


def plan_tool_calls(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
                    parallel_tool_calls: bool | None) -> ToolPlan | None:
    """The plan `tools` and `tool_choice` ask for; None for plain text; ValueError naming the field."""
    functions = _functions(tools or [])
    if tool_choice is None:
        tool_choice = "auto" if functions else "none"
    if tool_choice == "none":
        return None
    if not functions:
        raise ValueError(f"tool_choice: {json.dumps(tool_choice)} needs tools to choose from")
    if tool_choice == "auto":
        raise ValueError("tool_choice: 'auto' needs a parser for this model's own tool-call syntax, which its "
                         "chat template does not define; send tool_choice 'required' or name a function "
                         "({\"type\": \"function\", \"function\": {\"name\": ...}})")
    parallel = parallel_tool_calls is not False
    if tool_choice == "required":
        return ToolPlan(functions, None, parallel)
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(name, str):
        raise ValueError("tool_choice: must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                         "\"function\": {\"name\": ...}}")
    if name not in functions:
        raise ValueError(f"tool_choice: names {name!r}, which is not among the tools ({', '.join(functions)})")
    return ToolPlan(functions, name, parallel)


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    functions: dict[str, dict[str, Any]] = {}
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ValueError(f"tools: tools[{index}] must be {{\"type\": \"function\", \"function\": {{...}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"tools: tools[{index}].function.name must be 1-64 letters, digits, '_' or '-'")
        if name in functions:
            raise ValueError(f"tools: the function name {name!r} is declared twice")
        parameters = function.get("parameters", _NO_PARAMETERS)
        if not isinstance(parameters, dict):
            raise ValueError(f"tools: tools[{index}].function.parameters must be a JSON schema object")
        functions[name] = parameters
    return functions


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}
