"""Engine layer: loading the model's tokenizer and rendering chat conversations."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

ChatMessage = dict[str, Any]


def load_tokenizer(model_path: str | Path) -> PreTrainedTokenizerBase:
    # tokenizer.json carries everything (BOS rule included); AutoTokenizer would also import torch
    # through AutoConfig, which a front end without a model does not need.
    if not (Path(model_path) / "tokenizer.json").is_file():
        raise ValueError(f"{model_path}: Pagoda needs a fast tokenizer (tokenizer.json)")
    return PreTrainedTokenizerFast.from_pretrained(str(model_path))


def load_tokenizer_in_background(model_path: str | Path) -> Future[PreTrainedTokenizerBase]:
    """Start loading the tokenizer on a thread, so it overlaps the engine's start-up (about 2 s saved)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagoda-tokenizer")
    future = pool.submit(load_tokenizer, model_path)
    pool.shutdown(wait=False)  # the thread finishes the load, then exits
    return future


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[ChatMessage],
                add_generation_prompt: bool = True, chat_template: str | None = None) -> str:
    """The conversation as prompt text, by the model's chat template (or `chat_template`)."""
    if chat_template is None and tokenizer.chat_template is None:
        raise ValueError("this model has no chat template; pass chat_template= or use generate()")
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"each chat message needs 'role' and 'content', got {message!r}")
    return tokenizer.apply_chat_template(
        messages, chat_template=chat_template, add_generation_prompt=add_generation_prompt, tokenize=False
    )
