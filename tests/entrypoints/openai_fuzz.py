"""Fuzzing the OpenAI server from its own OpenAPI schema: requests, hostile mutations, and the verdict on answers.

Shared by tests/entrypoints/test_openai_fuzz.py (a bounded run in `make test`)
and benchmarks/fuzz_server.py (a larger one). Schemathesis turns the schema
of `create_app(...).openapi()` into Hypothesis strategies for every route, in
its positive mode (bodies the schema allows) and its negative mode (bodies it
forbids). On top, one field of a body may be replaced by a raw JSON fragment
the schema cannot express: lone surrogates, NUL, integers past 64 bits,
`NaN`/`Infinity`, deep nesting, huge strings; or the body may be sent with a
wrong content type. A server answer passes when it is not a 5xx, a 4xx
carries OpenAI's error body, and a stream carries no server error event.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
from hypothesis import strategies as st
from schemathesis.core import NOT_SET
from schemathesis.generation import GenerationMode

from pagoda.engine.arg_utils import EngineArgs
from pagoda.entrypoints.openai.api_server import create_app
from pagoda.entrypoints.openai.unsupported import UNSUPPORTED

# Generated requests generate at most this many tokens each, so the fuzz exercises the engine without
# spending minutes decoding; requests past the context still reach the server as generated.
MAX_FUZZ_TOKENS = 4
_CONTEXT = 2048  # the fuzzed server's --max-model-len (openai_server_helpers.SERVER_ARGS)
SERVED_MODEL = "smollm2-135m"  # the fuzzed server's model (openai_server_helpers.MODEL)
_GENERATING_PATHS = ("/v1/completions", "/v1/chat/completions")
_ERROR_KEYS = {"message", "type", "param", "code"}
_SLOT = "__fuzz_slot__"

_hostile_text = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates and NUL included
_hostile_fragments = st.one_of(
    _hostile_text.map(lambda text: json.dumps(text)),  # ensure_ascii: a lone surrogate travels as \udXXX
    st.sampled_from(['"\\ud800"', '"a\\udc00b"', '["\\udfff"]', '{"\\ud83d": 1}', '"\\u0000"', '"a\\u0000b"']),
    st.integers(min_value=1 << 63, max_value=1 << 200).map(str),
    st.integers(min_value=-(1 << 200), max_value=-(1 << 63) - 1).map(str),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "null", "true", "[]", "{}"]),
    st.integers(min_value=100, max_value=5000).map(lambda depth: "[" * depth + "]" * depth),
    st.integers(min_value=100, max_value=3000).map(lambda depth: '{"a": ' * depth + "1" + "}" * depth),
    st.integers(min_value=10_000, max_value=400_000).map(lambda size: '"' + "ab " * (size // 3) + '"'),
    st.lists(st.integers(min_value=-(1 << 70), max_value=1 << 70), max_size=20).map(json.dumps),
)
_wrong_content_types = st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "", "application/xml"])


def fuzz_schema() -> Any:
    """Schemathesis' view of the server's own OpenAPI schema (building the app starts no engine)."""
    import schemathesis

    app = create_app(EngineArgs(model=SERVED_MODEL), [SERVED_MODEL])
    return schemathesis.openapi.from_dict(app.openapi())


@dataclass
class FuzzRequest:
    method: str
    path: str
    content: bytes | None
    content_type: str | None

    def describe(self) -> str:
        body = b"" if self.content is None else self.content
        shown = body[:300] + (b"..." if len(body) > 300 else b"")
        return f"{self.method} {self.path} ({self.content_type}) {shown!r}"


def _cap_generation(body: dict[str, Any], draw: st.DrawFn) -> None:
    """Small completion budgets, drawn; a request the server refuses for its budget stays as generated."""
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and MAX_FUZZ_TOKENS < value <= _CONTEXT:
            body[key] = draw(st.integers(1, MAX_FUZZ_TOKENS))
    # Absent or null, the budget is whatever the context leaves (~2,000 tokens per choice).
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = draw(st.integers(1, MAX_FUZZ_TOKENS))


def _steer_to_engine(body: dict[str, Any], draw: st.DrawFn) -> None:
    """Drops what a schema-valid body can still be refused for: parameters Pagoda refuses, another model's
    name, token ids past the vocabulary, an empty prompt."""
    for name in [entry.name for entry in UNSUPPORTED] + ["best_of", "add_special_tokens", "stop_token_ids"]:
        body.pop(name, None)
    if "model" in body:
        body["model"] = SERVED_MODEL
    if "prompt" in body and not (isinstance(body["prompt"], str) and body["prompt"]):
        body["prompt"] = draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=40))


@st.composite
def fuzz_requests(draw: st.DrawFn, schema: Any) -> FuzzRequest:
    """One request for any route: schema-positive or schema-negative, maybe with a hostile field or content type."""
    mode = draw(st.sampled_from([GenerationMode.POSITIVE, GenerationMode.NEGATIVE]))
    case = draw(schema.as_strategy(generation_mode=mode))
    path = case.formatted_path
    if case.body is NOT_SET:
        return FuzzRequest(case.method.upper(), path, None, None)
    body = case.body
    if isinstance(body, (bytes, bytearray)):  # negative mode's bodies of another media type
        return FuzzRequest(case.method.upper(), path, bytes(body), case.media_type)
    if isinstance(body, dict) and path in _GENERATING_PATHS:
        _cap_generation(body, draw)
        # Positive bodies mostly break some rule the schema cannot state; steered past those (three times
        # in four) they reach the engine.
        if mode == GenerationMode.POSITIVE and draw(st.integers(0, 3)) > 0:
            _steer_to_engine(body, draw)
    content_type = "application/json"
    text = json.dumps(body)
    if isinstance(body, dict) and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(body) + ["prompt", "messages", "stop", "model", "logit_bias", "tokens"]))
        body[key] = _SLOT
        text = json.dumps(body).replace(json.dumps(_SLOT), draw(_hostile_fragments), 1)
    if draw(st.integers(0, 9)) == 0:
        content_type = draw(_wrong_content_types)
    return FuzzRequest(case.method.upper(), path, text.encode(), content_type)


@dataclass
class FuzzTally:
    """What the fuzz saw: statuses by count, and every answer that broke the rules."""

    statuses: Counter[int] = field(default_factory=Counter)
    answered: Counter[str] = field(default_factory=Counter)  # 2xx answers by path
    failures: list[str] = field(default_factory=list)
    slowest: tuple[float, str] = (0.0, "")  # seconds, and the request

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    @property
    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500)


def send(client: httpx.Client, request: FuzzRequest, tally: FuzzTally) -> None:
    """Sends `request`, then counts the answer and records why it fails, if it does."""
    headers = {} if request.content_type is None else {"Content-Type": request.content_type}
    started = time.monotonic()
    response = client.request(request.method, request.path, content=request.content, headers=headers)
    tally.slowest = max(tally.slowest, (time.monotonic() - started, request.describe()))
    tally.statuses[response.status_code] += 1
    if response.status_code < 300:
        tally.answered[request.path] += 1
    problem = _problem(response)
    if problem is not None:
        tally.failures.append(f"{problem}: {request.describe()} -> {response.status_code} {response.text[:300]!r}")


def _problem(response: httpx.Response) -> str | None:
    if response.status_code >= 500:
        return "server error"
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            return "4xx without OpenAI's error body"
        if not isinstance(error, dict) or set(error) != _ERROR_KEYS or not error["message"]:
            return "4xx without OpenAI's error body"
        return None
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data: {") and '"error"' in line:
                event = json.loads(line[len("data: "):])
                if isinstance(event.get("error"), dict) and event["error"].get("type") == "server_error":
                    return "server error inside a stream"
    return None


def reference_completion(client: httpx.Client) -> str:
    """A greedy completion whose text must not change however the server was fuzzed."""
    body = {"prompt": "The three primary colours are", "max_tokens": 12, "temperature": 0}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def engine_gauges(client: httpx.Client) -> dict[str, float]:
    """Running and waiting requests and KV cache use, as /metrics reports them."""
    gauges = {}
    for line in client.get("/metrics").text.splitlines():
        for name in ("kv_cache_usage_perc", "num_requests_running", "num_requests_waiting"):
            if line.startswith(f"pagoda:{name}{{"):
                gauges[name] = float(line.rsplit(" ", 1)[1])
    return gauges
