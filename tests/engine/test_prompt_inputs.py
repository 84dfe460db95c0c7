"""Prompt shapes users pass (text, token ids, dicts with images, chat content parts), and clear errors for others."""

from __future__ import annotations

import pytest

from pagoda.engine.prompt_inputs import cache_salt_of, parse_prompt, split_chat_images


def test_text_ids_and_dicts_parse() -> None:
    assert parse_prompt("hi").text == "hi"
    assert parse_prompt([2, 3]).token_ids == [2, 3]
    parsed = parse_prompt({"prompt": "<start_of_image>?", "multi_modal_data": {"image": b"png"},
                           "mm_processor_kwargs": {"do_pan_and_scan": True}})
    assert parsed.images == [b"png"] and parsed.mm_processor_kwargs == {"do_pan_and_scan": True}
    assert parse_prompt({"prompt": "x", "multi_modal_data": {"image": [b"a", b"b"]}}).images == [b"a", b"b"]
    assert parse_prompt({"prompt_token_ids": [5, 6]}).token_ids == [5, 6]


@pytest.mark.parametrize(("prompt", "message"), [
    ({"prompt": "x", "images": []}, "unknown keys"),
    ({"multi_modal_data": {}}, "exactly one of"),
    ({"prompt": "x", "prompt_token_ids": [1]}, "exactly one of"),
    ({"prompt": 5}, "must be a string"),
    ({"prompt": "x", "multi_modal_data": {"video": b""}}, "only 'image'"),
    ({"prompt": "x", "multi_modal_data": [b""]}, "must be a dict"),
    ({"prompt": "x", "multi_modal_data": {"image": None}}, "holds None"),
    ({"prompt_token_ids": [1], "multi_modal_data": {"image": b"x"}}, "need a text 'prompt'"),
    ({"prompt": "x", "mm_processor_kwargs": "pan"}, "mm_processor_kwargs must be a dict"),
    (3.5, "must be a string"),
])
def test_bad_prompts_name_the_problem(prompt: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_prompt(prompt)  # type: ignore[arg-type]


def test_chat_image_parts_become_template_parts_in_order() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "Compare"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "image", "image": b"raw"},
        ]},
    ]
    converted, images = split_chat_images(messages)
    assert images == ["data:image/png;base64,AAAA", b"raw"]
    assert converted[0] == messages[0]
    assert converted[1]["content"] == [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}]


@pytest.mark.parametrize(("part", "message"), [
    ({"type": "audio_url", "audio_url": {}}, "not supported"),
    ({"type": "image_url", "image_url": {}}, "needs"),
    ({"type": "image"}, "needs its 'image'"),
    ("text", "must be a dict"),
])
def test_bad_content_parts_name_the_problem(part: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_chat_images([{"role": "user", "content": [part]}])


def test_a_prompt_dict_may_carry_the_cache_salt_which_must_agree_with_the_argument() -> None:
    assert cache_salt_of({"prompt": "x", "cache_salt": "a"}, None) == "a"
    assert cache_salt_of({"prompt": "x", "cache_salt": "a"}, "a") == "a"
    assert cache_salt_of({"prompt": "x"}, "b") == "b" and cache_salt_of("x", None) is None
    with pytest.raises(ValueError, match="two cache salts"):
        cache_salt_of({"prompt": "x", "cache_salt": "a"}, "b")
    for bad in ("", 3):
        with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
            parse_prompt({"prompt": "x", "cache_salt": bad})
