"""Entrypoints layer: request parameters Pagoda does not implement, refused rather than silently dropped.

OpenAI's and vLLM's request bodies carry parameters that change what is
generated (beam search, a suffix, ...). Pagoda does not
implement them, so a request that sets one to anything but a value meaning
"off" gets a 400 naming it: a client asking for JSON must not get free text
with a 200. Parameters that never change the output (`user`, `metadata`,
`store`, ...) are declared in the protocol models and accepted. Fields no
model declares are accepted too, as OpenAI's SDKs send fields a server may not
know, with one warning naming them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from pagoda.entrypoints.openai.errors import bad_request

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unsupported:
    name: str
    # True when the request's value changes nothing (absent, off, or the default).
    harmless: Callable[[Any], bool]
    what: str


def _unset(value: Any) -> bool:
    return value is None


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


def _is(*allowed: Any) -> Callable[[Any], bool]:
    # `False == 0` in Python: compare types too, so `echo: 0` is not mistaken for `echo: false`.
    return lambda value: any(value == a and type(value) is type(a) for a in allowed)


def _text_modality(value: Any) -> bool:
    return value is None or value == ["text"]


# Parameter -> its harmless values. Requests are checked against the entries their model declares.
UNSUPPORTED: tuple[Unsupported, ...] = (
    # OpenAI, completions
    Unsupported("suffix", lambda v: v is None or v == "", "insertion after a suffix"),
    # OpenAI, chat
    Unsupported("functions", _empty, "function calling"),
    Unsupported("function_call", lambda v: v is None or v in ("none", "auto"), "function calling"),
    Unsupported("audio", _unset, "audio output"),
    Unsupported("modalities", _text_modality, "output modalities other than text"),
    Unsupported("reasoning_effort", _unset, "reasoning effort"),
    Unsupported("verbosity", _unset, "verbosity"),
    Unsupported("web_search_options", _unset, "web search"),
    # vLLM's extras
    Unsupported("use_beam_search", _is(False), "beam search"),
    Unsupported("spaces_between_special_tokens", _is(True), "detokenizing without spaces between special tokens"),
    Unsupported("truncate_prompt_tokens", _unset, "prompt truncation"),
    Unsupported("allowed_token_ids", _unset, "restricting sampling to allowed token ids"),
    Unsupported("bad_words", _empty, "bad words"),
    Unsupported("structural_tag", _unset, "structural tags"),
    Unsupported("guided_whitespace_pattern", _unset, "a whitespace pattern for structured output"),
    Unsupported("logits_processors", _empty, "custom logits processors"),
    Unsupported("return_tokens_as_token_ids", _is(False), "logprob tokens as token ids"),
    Unsupported("return_token_ids", lambda v: v is None or v is False, "token ids in the response"),
    Unsupported("prompt_embeds", _unset, "prompt embeddings"),
    Unsupported("continue_final_message", _is(False), "continuing the final message"),
    Unsupported("documents", _unset, "documents for the chat template"),
    Unsupported("chat_template", _unset, "a chat template from the request"),
    Unsupported("chat_template_kwargs", _empty, "chat template arguments"),
)


def refuse_unsupported(request: BaseModel, defaults: dict[str, Any]) -> None:
    """400 naming the first declared parameter that asks for something Pagoda does not do.

    `defaults` holds values that depend on the endpoint (`add_special_tokens`) or on
    the request (`best_of` equal to `n` is harmless).
    """
    fields = type(request).model_fields
    for entry in UNSUPPORTED:
        if entry.name in fields and not entry.harmless(getattr(request, entry.name)):
            raise bad_request(f"{entry.name}: {entry.what} is not supported by this server; leave "
                              f"{entry.name} out or send its default", entry.name)
    for name, default in defaults.items():
        value = getattr(request, name)
        if value is not None and value != default:
            raise bad_request(f"{name}: only {default!r} is supported by this server", name)


def log_unknown_fields(request: BaseModel, endpoint: str) -> None:
    """One warning naming the fields the request's model does not declare (they are ignored)."""
    if request.model_extra:
        names = ", ".join(ascii(name) for name in sorted(request.model_extra))
        logger.warning("%s: ignoring unknown fields %s", endpoint, names)
