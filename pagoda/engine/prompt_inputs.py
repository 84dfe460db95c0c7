"""Engine layer: the prompt shapes users pass, as vLLM takes them, parsed into one form.

A prompt is text, a list of token ids, or a dict:
`{"prompt": text, "multi_modal_data": {"image": image or [images]},
"mm_processor_kwargs": {...}, "cache_salt": "tenant"}` (or `"prompt_token_ids"`
instead of `"prompt"`, without images; prefix-cache blocks are shared only
between prompts of equal salts). An image is a PIL image, a file path, bytes or
a `data:` URI. Chat messages may carry OpenAI-style content parts; those are
turned into the `{"type": "image"}` / `{"type": "text"}` parts chat
templates expect, with the images collected in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagoda.core.multimodal import MultiModalFeature

PromptType = str | list[int] | dict[str, Any]

_PROMPT_KEYS = {"prompt", "prompt_token_ids", "multi_modal_data", "mm_processor_kwargs", "cache_salt"}
# Content-part types carrying an image, and where each keeps it.
_IMAGE_PARTS = {"image_url": "image_url", "image": "image", "image_pil": "image_pil"}


@dataclass
class ProcessedPrompt:
    """A prompt ready for the engine: token ids with images expanded, and the image items."""

    token_ids: list[int]
    mm_features: list[MultiModalFeature] | None = None
    text: str | None = None


@dataclass
class ParsedPrompt:
    text: str | None = None
    token_ids: list[int] | None = None
    images: list[Any] = field(default_factory=list)
    mm_processor_kwargs: dict[str, Any] | None = None


def parse_prompt(prompt: PromptType) -> ParsedPrompt:
    if isinstance(prompt, str):
        return ParsedPrompt(text=prompt)
    if isinstance(prompt, dict):
        return _parse_dict_prompt(prompt)
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return ParsedPrompt(token_ids=list(prompt))
    raise ValueError(f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")


def _parse_dict_prompt(prompt: dict[str, Any]) -> ParsedPrompt:
    unknown = sorted(set(prompt) - _PROMPT_KEYS)
    if unknown:
        raise ValueError(f"prompt dict has unknown keys {unknown}; expected some of {sorted(_PROMPT_KEYS)}")
    if ("prompt" in prompt) == ("prompt_token_ids" in prompt):
        raise ValueError("a prompt dict needs exactly one of 'prompt' and 'prompt_token_ids'")
    parsed = parse_prompt(prompt["prompt"] if "prompt" in prompt else list(prompt["prompt_token_ids"]))
    if "prompt" in prompt and not isinstance(prompt["prompt"], str):
        raise ValueError(f"'prompt' must be a string, got {type(prompt['prompt']).__name__}")
    salt = prompt.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise ValueError(f"cache_salt must be a non-empty string, got {salt!r}")
    kwargs = prompt.get("mm_processor_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"mm_processor_kwargs must be a dict, got {type(kwargs).__name__}")
    parsed.mm_processor_kwargs = kwargs
    data = prompt.get("multi_modal_data")
    if data is None:
        return parsed
    if not isinstance(data, dict):
        raise ValueError(f"multi_modal_data must be a dict such as {{'image': ...}}, got {type(data).__name__}")
    other = sorted(set(data) - {"image"})
    if other:
        raise ValueError(f"multi_modal_data: only 'image' is supported, got {other}")
    images = data.get("image")
    parsed.images = list(images) if isinstance(images, (list, tuple)) else [images]
    if any(image is None for image in parsed.images):
        raise ValueError("multi_modal_data['image'] holds None")
    if parsed.images and parsed.token_ids is not None:
        raise ValueError("images need a text 'prompt' (with one <start_of_image> per image), not prompt_token_ids")
    return parsed


def split_chat_images(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages with image parts replaced by `{"type": "image"}`, and the images in order of appearance."""
    images: list[Any] = []
    converted: list[dict[str, Any]] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            converted.append(message)
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            if not isinstance(part, dict) or "type" not in part:
                raise ValueError(f"a content part must be a dict with a 'type', got {part!r}")
            kind = part["type"]
            if kind in _IMAGE_PARTS:
                images.append(_image_of_part(part, _IMAGE_PARTS[kind]))
                parts.append({"type": "image"})
            elif kind == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
            else:
                raise ValueError(f"content parts of type {kind!r} are not supported (text and images are)")
        converted.append({**message, "content": parts})
    return converted, images


def _image_of_part(part: dict[str, Any], key: str) -> Any:
    value = part.get(key)
    if key == "image_url":
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str):
            raise ValueError("an image_url part needs {'url': 'data:image/...;base64,...'}")
        return url
    if value is None:
        raise ValueError(f"a content part of type {part['type']!r} needs its {key!r} field")
    return value


def cache_salt_of(prompt: PromptType | ProcessedPrompt, cache_salt: str | None) -> str | None:
    """The request's salt: the argument's, or the prompt dict's `cache_salt` (vLLM's spelling); not both."""
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    if salt is not None and cache_salt is not None and salt != cache_salt:
        raise ValueError(f"two cache salts for one request: {cache_salt!r} and the prompt's {salt!r}")
    return cache_salt if cache_salt is not None else salt
