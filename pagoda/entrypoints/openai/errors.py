"""Entrypoints layer: HTTP errors with OpenAI's error body, and the handlers that render them.

Every failure the server reports looks like
`{"error": {"message", "type", "param", "code"}}`, the shape the official
clients turn into typed exceptions; `param` names the offending field. A
message may quote the client's input, so it is made encodable first (a lone
surrogate would otherwise fail the response itself). An exception nothing
else handled still answers in this shape, as a 500, and is logged.
"""

from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagoda.entrypoints.openai.responses import ErrorResponse
from pagoda.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# OpenAI's error types by status.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        message = _encodable(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = None if param is None else _encodable(param)
        self.code = code

    def body(self) -> dict[str, dict[str, str | None]]:
        error_type = _ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

    def sse_event(self) -> str:
        """The error as a server-sent event, for failures after a stream has started."""
        return f"data: {json.dumps(self.body())}\n\n"


def _encodable(text: str) -> str:
    """`text` with anything UTF-8 cannot carry (lone surrogates) spelled as escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(HTTPStatus.BAD_REQUEST, message, param)


# Engine-side ValueErrors start with the field they are about ("SamplingParams.top_p must ...",
# "stop_token_ids: ...", "prompt has ..."); these are the names that can appear there.
_ENGINE_PARAMS = frozenset(SamplingParams.__struct_fields__) | {"prompt", "response_format", "guided_json",
                                                                 "guided_regex", "guided_choice", "guided_grammar"}


def from_value_error(error: ValueError, default_param: str | None = None) -> OpenAIError:
    """A 400 for a ValueError raised below the server, naming the field when the message does."""
    match = re.match(r"(?:SamplingParams\.)?([a-z_]+)\b", str(error))
    param = match.group(1) if match and match.group(1) in _ENGINE_PARAMS else default_param
    return bad_request(str(error), param)


# Pydantic's error types for a body that is missing or not a JSON object (a list, a string, not JSON).
_NOT_AN_OBJECT = frozenset({"missing", "model_attributes_type", "dict_type", "model_type"})


async def _on_validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    # ("body", "messages", 0, "role"): the param is the top-level field, the message has the full path.
    # A JSON syntax error is located by a character offset (an int), which names no field.
    location = [str(part) for part in first.get("loc", ()) if part != "body" and isinstance(part, str)]
    param = location[0] if location else None
    message = first.get("msg", "invalid value")
    if first.get("type") == "value_error" and "error" in first.get("ctx", {}):
        message = str(first["ctx"]["error"])  # our own validators' words, without pydantic's "Value error, "
    if not location and first.get("type") in _NOT_AN_OBJECT:
        message = "the request body must be a JSON object, sent with 'Content-Type: application/json'"
    return bad_request(f"{'.'.join(location)}: {message}" if location else message, param).response()


async def _on_openai_error(_: Request, error: OpenAIError) -> JSONResponse:
    return error.response()


async def _on_http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    return OpenAIError(error.status_code, str(error.detail)).response()


async def _on_unexpected_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("%s %s failed", request.method, request.url.path, exc_info=error)
    return OpenAIError(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(error).__name__}").response()


def describe_errors_in_openapi(app: FastAPI) -> None:
    """The OpenAPI schema says what the server answers: 400 with OpenAI's error body, where FastAPI says 422."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(error_schema.pop("$defs"))
            schemas["ErrorResponse"] = error_schema
            error = {"description": "Refused, with OpenAI's error body",
                     "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            for operation in (op for path in schema["paths"].values() for op in path.values()):
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                if "requestBody" in operation:
                    responses["400"] = error
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(OpenAIError, _on_openai_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _on_unexpected_error)
