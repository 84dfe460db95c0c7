"""Shared contract: how one request wants its tokens chosen and its output shaped.

`SamplingParams` travels from the entrypoints down to the sampler (and across
process boundaries later), so it is a msgspec Struct. Checks that need only the
parameters themselves run on construction; checks against the model (vocab
size, max_model_len) run in the engine's `InputProcessor`.
"""

from __future__ import annotations

import functools
import json
from enum import IntEnum
from typing import Any

import msgspec

# Temperatures below this are treated as greedy, as in vLLM.
GREEDY_EPSILON = 1e-5
# More sequences per request than this is a mistake (each is a request in the scheduler).
MAX_N = 1024


class RequestOutputKind(IntEnum):
    """What each `RequestOutput` carries while a request runs."""

    CUMULATIVE = 0  # the whole text and all tokens so far
    DELTA = 1  # only what is new since the previous output
    FINAL_ONLY = 2  # a single output when the request finishes


class StructuredOutputsParams(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A constraint on the generated text (names follow vLLM's): exactly one of the first five is set.

    `json` is a JSON schema, as an object or its text (kept as text, in its own key order, which is the
    order the output's properties follow); `grammar` is EBNF in the GBNF dialect xgrammar reads.
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False  # any JSON object, no schema
    disable_any_whitespace: bool = False  # JSON without free whitespace between tokens

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            self.json = json.dumps(self.json)
        chosen = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        chosen += ["json_object"] if self.json_object else []
        if len(chosen) != 1:
            raise ValueError("SamplingParams.structured_outputs must set exactly one of json, regex, choice, "
                             f"grammar or json_object, got {', '.join(chosen) if chosen else 'none'}")
        if self.choice is not None:
            _check(bool(self.choice) and all(isinstance(c, str) and c for c in self.choice),
                   "structured_outputs.choice", "must be a non-empty list of non-empty strings")
        if self.json is not None:
            try:
                schema = json.loads(self.json)
            except (ValueError, RecursionError) as error:  # RecursionError: nested past Python's stack
                raise ValueError(f"SamplingParams.structured_outputs.json is not valid JSON: {error}") from None
            _check(isinstance(schema, (dict, bool)), "structured_outputs.json",
                   f"must be a JSON schema (an object), got {type(schema).__name__}")

    @property
    def kind(self) -> str:
        """Which constraint this is: json, regex, choice, grammar or json_object."""
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json_object"

    @property
    def key(self) -> tuple[str, str, bool]:
        """What identifies the compiled grammar: equal keys, one compilation."""
        spec = {"json": self.json, "regex": self.regex, "grammar": self.grammar, "json_object": ""}.get(self.kind)
        if self.choice is not None:
            spec = json.dumps(self.choice)
        return self.kind, spec or "", self.disable_any_whitespace


class SamplingParams(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Sampling and output options for one request (names follow vLLM)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: all tokens
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # OpenAI semantics: token id -> value added to that token's logit before sampling.
    logit_bias: dict[int, float] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self._check_types()
        self._validate()

    def _check_types(self) -> None:
        """Every field of its declared type (an int where a float goes becomes a float): a seed of 1.5 or a
        bool for n is refused here, naming the field, not deep in the engine for the whole batch."""
        try:
            checked = msgspec.convert(msgspec.structs.asdict(self), _field_types(), strict=True)
        except msgspec.ValidationError as error:
            raise ValueError(f"SamplingParams: {error}") from None
        for name in self.__struct_fields__:
            setattr(self, name, getattr(checked, name))

    def _validate(self) -> None:
        _check(1 <= self.n <= MAX_N, "n", f"must be from 1 to {MAX_N}, got {self.n}")
        _check(self.temperature >= 0.0, "temperature", f"must be non-negative, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= -1, "top_k", f"must be -1, 0 (all tokens) or positive, got {self.top_k}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        _check(self.repetition_penalty > 0.0, "repetition_penalty", f"must be positive, got {self.repetition_penalty}")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        # The n sequences are seeded seed, seed + 1, ...: all must fit a generator's 64 bits.
        _check(self.seed is None or -(2**63) <= self.seed and self.seed + self.n <= 2**64, "seed",
               f"must fit in 64 bits (from -2**63 to 2**64 - n), got {self.seed}")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens", f"must be at least 1, got {self.max_tokens}")
        _check(self.min_tokens >= 0, "min_tokens", f"must be non-negative, got {self.min_tokens}")
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            f"({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
        )
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "must be non-negative token ids")
        _check(self.logprobs is None or self.logprobs >= 0, "logprobs", f"must be non-negative, got {self.logprobs}")
        _check(
            self.prompt_logprobs is None or self.prompt_logprobs >= 0,
            "prompt_logprobs",
            f"must be non-negative, got {self.prompt_logprobs}",
        )
        for name in ("top_k", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or -(2**63) <= value < 2**63, name, f"must fit in 64 bits, got {value}")
        _check(all(t < 2**63 for t in [*self.stop_token_ids, *(self.logit_bias or ())]), "stop_token_ids",
               "and logit_bias keys must be token ids (below 2**63)")
        if self.logit_bias is not None:
            _check(all(t >= 0 for t in self.logit_bias), "logit_bias", "keys must be non-negative token ids")
            _check(all(-100.0 <= b <= 100.0 for b in self.logit_bias.values()), "logit_bias",
                   "values must be in [-100, 100]")

    def clone(self, **changes: object) -> "SamplingParams":
        return msgspec.structs.replace(self, **changes)


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{field} {message}")


@functools.cache
def _field_types() -> type[msgspec.Struct]:
    """SamplingParams' fields and types without its checks, for one strict conversion (msgspec caches a
    Struct's type information; converting field by field would rebuild it each time)."""
    fields = [(f.name, f.type) for f in msgspec.structs.fields(SamplingParams)]
    return msgspec.defstruct("SamplingParamsFields", fields, kw_only=True)
