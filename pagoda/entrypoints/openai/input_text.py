"""Entrypoints layer: checks on request text that must run before the tokenizer sees it.

Two ways text from a client hurts the server. A lone surrogate (JSON allows
`"\\ud800"`, Python's json decodes it) is not Unicode the tokenizer can
encode, nor text a response can carry, so it is refused wherever it appears.
And tokenizing a huge text holds the event loop for seconds (15 MB: ~14 s),
so a text with more bytes than the context could ever hold in tokens is
refused before tokenizing: no token covers more bytes than the vocabulary's
longest entry, so `bytes > max_model_len * longest` cannot fit.
"""

from __future__ import annotations

import re
from typing import Any

from pagoda.engine.tokenizer import Tokenizer

_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_position(value: Any) -> str | None:
    """Where in `value` (a JSON value) a string holds a surrogate code point: a path like `[2].text`, or None.

    The empty path is `value` itself.
    """
    # Iterative: a deeply nested value must not exhaust the interpreter's stack.
    pending: list[tuple[str, Any]] = [("", value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return path
        elif isinstance(item, dict):
            for key, inner in item.items():
                if isinstance(key, str) and _SURROGATE.search(key):
                    return f"a key of {path or 'the object'}"
                pending.append((f"{path}.{key}", inner))
        elif isinstance(item, (list, tuple)):
            pending.extend((f"{path}[{i}]", inner) for i, inner in enumerate(item))
    return None


def longest_token_bytes(tokenizer: Tokenizer) -> int:
    """An upper bound on the bytes of text one token stands for (its vocabulary string's UTF-8 length).

    Byte-level vocabularies spell a byte as one character of up to two UTF-8 bytes, and byte-fallback
    tokens spell one byte as `<0xNN>`, so the bound is loose but never too small.
    """
    return max(len(token.encode("utf-8", "surrogatepass")) for token in tokenizer.get_vocab())


def text_bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))
