"""Gemma 3 prompt expansion and placeholder location on hand-built token ids (no tokenizer)."""

from __future__ import annotations

import pytest

from pagoda.core.multimodal import PlaceholderRange
from pagoda.multimodal.gemma3_prompt import Gemma3ImageTokens, expand_prompt, locate_items

TOKENS = Gemma3ImageTokens(boi_token_id=10, eoi_token_id=11, image_token_id=12, mm_tokens_per_image=3,
                           boi_token="<boi>", eoi_token="<eoi>", image_token="<img>")
SEQ = "\n\n<boi><img><img><img><eoi>\n\n"


def test_expansion_without_and_with_crops() -> None:
    assert expand_prompt("a<boi>b", [0], TOKENS) == "a" + SEQ + "b"
    expected = "a" + "Here is the original image " + SEQ + " and here are some crops to help you see better " + \
        SEQ + " " + SEQ + "b"
    assert expand_prompt("a<boi>b", [2], TOKENS) == expected
    assert expand_prompt("<boi><boi>", [0, 1], TOKENS).count("<boi>") == 3


def test_expansion_count_and_reserved_token_errors() -> None:
    with pytest.raises(ValueError, match="2 <boi> slots for 1 images"):
        expand_prompt("<boi><boi>", [0], TOKENS)
    with pytest.raises(ValueError, match="contains <img>"):
        expand_prompt("<img><boi>", [0], TOKENS)


def test_locate_items_ranges_and_runs() -> None:
    # 0:bos 1:nl 2:boi 3-5:img 6:eoi 7:nl 8:text 9:boi 10-12:img 13:eoi 14:text 15:boi 16-18:img 19:eoi 20:nl
    ids = [2, 108, 10, 12, 12, 12, 11, 108, 99, 10, 12, 12, 12, 11, 99, 10, 12, 12, 12, 11, 108]
    first, second = locate_items(ids, [0, 1], TOKENS)
    assert first == PlaceholderRange(offset=2, length=5, embed_runs=((1, 4),))
    assert second == PlaceholderRange(offset=9, length=11, embed_runs=((1, 4), (7, 10)))
    assert second.absolute_embed_runs() == [(10, 13), (16, 19)]


@pytest.mark.parametrize("ids, message", [
    ([10, 12, 12, 12, 11, 10, 12, 12, 12, 11], "2 <boi> tokens, expected 1"),
    ([10, 12, 12, 11, 12], "is not <boi> followed by 3 <img> and <eoi>"),
    ([10, 12, 12, 12], "is not <boi> followed by 3 <img> and <eoi>"),
    ([10, 12, 12, 12, 11, 12], "4 <img> tokens, expected 3"),
])
def test_locate_items_refuses_sequences_that_are_not_the_expansion(ids: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        locate_items(ids, [0], TOKENS)
