"""Engine layer: the model's tokenizer and its chat template, without transformers.

`Tokenizer` wraps the Rust `tokenizers` backend read from tokenizer.json
(which carries the BOS rule Pagoda's converter writes) and renders chat
templates with jinja2 as Hugging Face's tokenizers do (sandboxed, trimmed
blocks, loop controls, `raise_exception`, `strftime_now`, `tojson`, the
special tokens as variables). Importing transformers alone cost ~0.7 s of
start-up and building its tokenizer over Gemma's 262k vocabulary ~2 s more;
the tests check the ids and rendered text against transformers'.
"""

from __future__ import annotations

import functools
import json
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as BackendTokenizer

ChatMessage = dict[str, Any]

_CHAT_TEMPLATE_FILE = "chat_template.jinja"


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template."""

    def __init__(self, backend: BackendTokenizer, chat_template: str | None, special_tokens: dict[str, str]) -> None:
        self.backend_tokenizer = backend
        self.chat_template = chat_template
        # bos_token, eos_token, ...: chat templates refer to them by these names.
        self.special_tokens = special_tokens

    @classmethod
    def from_folder(cls, model_path: str | Path) -> Tokenizer:
        folder = Path(model_path)
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"{folder}: Pagoda needs a fast tokenizer (tokenizer.json)")
        config = _read_tokenizer_config(folder)
        template_file = folder / _CHAT_TEMPLATE_FILE
        chat_template = template_file.read_text() if template_file.is_file() else _template_of(config)
        return cls(BackendTokenizer.from_file(str(folder / "tokenizer.json")), chat_template, _special_tokens(config))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; ValueError for text that is not valid Unicode (a lone surrogate)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"text is not valid Unicode: {err.reason} at character {err.start}") from None
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        """Every token's text, added tokens included, with its id."""
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def apply_chat_template(self, messages: list[ChatMessage], chat_template: str | None = None,
                            add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None) -> str:
        """The conversation as prompt text, by the model's chat template (or `chat_template`), with the
        declared `tools` for templates that describe them."""
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise ValueError("this model has no chat template; pass chat_template= or use generate()")
        try:
            return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                             tools=tools, documents=None, **self.special_tokens)
        except jinja2.TemplateError as err:
            raise ValueError(f"the chat template failed: {err}") from err


def load_tokenizer_in_background(model_path: str | Path) -> Future[Tokenizer]:
    """Start loading the tokenizer on a thread, so it overlaps the engine's start-up."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagoda-tokenizer")
    future = pool.submit(Tokenizer.from_folder, model_path)
    pool.shutdown(wait=False)  # the thread finishes the load, then exits
    return future


def render_chat(tokenizer: Tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True,
                chat_template: str | None = None, tools: list[dict[str, Any]] | None = None) -> str:
    """The conversation as prompt text; every message needs a role and content."""
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"each chat message needs 'role' and 'content', got {message!r}")
    return tokenizer.apply_chat_template(messages, chat_template, add_generation_prompt, tools)


def _read_tokenizer_config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config


def _template_of(config: dict[str, Any]) -> str | None:
    """tokenizer_config.json's chat template: a string, or named templates of which "default" is used."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for name, value in config.items():
        if not name.endswith("_token"):
            continue
        content = value.get("content") if isinstance(value, dict) else value
        if isinstance(content, str):
            tokens[name] = content
    return tokens


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(value: Any, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False) -> str:
    # Unlike jinja2's own filter: no HTML escaping and no ASCII escapes, which would change the prompt's text.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(template)
