"""Multimodal (front end): Gemma 3's image slots in a prompt, expanded and located as transformers' processor does.

Each `<start_of_image>` in the prompt text is one image slot. Expansion:

    slot, no crops  ->  "\\n\\n" boi soft*T eoi "\\n\\n"                      (T = mm_tokens_per_image)
    slot, k crops   ->  "Here is the original image " SEQ " and here are some crops to help you see better "
                        SEQ " " SEQ ... (k times)                          (SEQ = the no-crop expansion)

The expanded string is then tokenized whole, so Gemma's merged newline tokens
("\\n\\n\\n" where a slot touches a newline) come out exactly as transformers'
`Gemma3Processor` produces them. The item's `PlaceholderRange` runs from its
first boi to its last eoi; its embed runs are the T soft tokens after each
boi, one run per crop:

    ids:     ... \\n\\n boi s s s s eoi \\n\\n  and here ... boi s s s s eoi \\n\\n ...
                      ^offset                                     ^ end (exclusive) after this eoi
    runs:            [1, 5)                    [k, k + 4)           (relative to offset)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pagoda.core.multimodal import PlaceholderRange

if TYPE_CHECKING:
    from pagoda.engine.tokenizer import Tokenizer

_CROPS_INTRO = "Here is the original image "
_CROPS_BRIDGE = " and here are some crops to help you see better "


@dataclass(frozen=True, slots=True)
class Gemma3ImageTokens:
    """Gemma 3's image token ids and texts, from the model's config.json and checked against the tokenizer."""

    boi_token_id: int
    eoi_token_id: int
    image_token_id: int
    mm_tokens_per_image: int
    boi_token: str
    eoi_token: str
    image_token: str

    @classmethod
    def from_config(cls, config: dict[str, Any], tokenizer: Tokenizer) -> Gemma3ImageTokens:
        ids = {}
        for key, default in (("boi_token_index", 255999), ("eoi_token_index", 256000),
                             ("image_token_index", 262144), ("mm_tokens_per_image", 256)):
            value = config.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"config.json: {key} must be a positive integer, got {value!r}")
            ids[key] = value
        texts = [_token_text(tokenizer, ids[key], key) for key in ("boi_token_index", "eoi_token_index",
                                                                    "image_token_index")]
        return cls(ids["boi_token_index"], ids["eoi_token_index"], ids["image_token_index"],
                   ids["mm_tokens_per_image"], *texts)

    @property
    def full_image_sequence(self) -> str:
        return f"\n\n{self.boi_token}{self.image_token * self.mm_tokens_per_image}{self.eoi_token}\n\n"

    def slot_replacement(self, num_crops: int) -> str:
        """What one `<start_of_image>` slot becomes for an image with `num_crops` Pan-and-Scan crops."""
        sequence = self.full_image_sequence
        if num_crops == 0:
            return sequence
        return _CROPS_INTRO + sequence + _CROPS_BRIDGE + " ".join([sequence] * num_crops)


def count_slots(prompt: str, tokens: Gemma3ImageTokens) -> int:
    return prompt.count(tokens.boi_token)


def expand_prompt(prompt: str, crops_per_item: list[int], tokens: Gemma3ImageTokens) -> str:
    """`prompt` with its i-th slot replaced for the i-th item; one item per slot."""
    # A soft token typed into the text would take an encoder row that belongs to no image.
    if tokens.image_token in prompt:
        raise ValueError(f"the prompt text contains {tokens.image_token}, which only image expansion may place")
    pieces = prompt.split(tokens.boi_token)
    if len(pieces) - 1 != len(crops_per_item):
        raise ValueError(f"the prompt has {len(pieces) - 1} {tokens.boi_token} slots for {len(crops_per_item)} images")
    expanded = [pieces[0]]
    for crops, piece in zip(crops_per_item, pieces[1:]):
        expanded.append(tokens.slot_replacement(crops))
        expanded.append(piece)
    return "".join(expanded)


def locate_items(token_ids: list[int], crops_per_item: list[int], tokens: Gemma3ImageTokens) -> list[PlaceholderRange]:
    """Each item's placeholder range in the expanded prompt's ids, one embed run per crop."""
    boi_positions = [index for index, token_id in enumerate(token_ids) if token_id == tokens.boi_token_id]
    expected = sum(1 + crops for crops in crops_per_item)
    if len(boi_positions) != expected:
        raise ValueError(f"the expanded prompt has {len(boi_positions)} {tokens.boi_token} tokens, expected {expected}")
    num_soft = sum(1 for token_id in token_ids if token_id == tokens.image_token_id)
    if num_soft != expected * tokens.mm_tokens_per_image:
        raise ValueError(f"the expanded prompt has {num_soft} {tokens.image_token} tokens, "
                         f"expected {expected * tokens.mm_tokens_per_image}")
    ranges = []
    cursor = 0
    for crops in crops_per_item:
        item_bois = boi_positions[cursor:cursor + 1 + crops]
        cursor += 1 + crops
        offset = item_bois[0]
        runs = []
        for boi in item_bois:
            run_start, run_end = boi + 1, boi + 1 + tokens.mm_tokens_per_image
            if (token_ids[run_start:run_end] != [tokens.image_token_id] * tokens.mm_tokens_per_image
                    or run_end >= len(token_ids) or token_ids[run_end] != tokens.eoi_token_id):
                raise ValueError(f"the image sequence at token {boi} is not {tokens.boi_token} followed by "
                                 f"{tokens.mm_tokens_per_image} {tokens.image_token} and {tokens.eoi_token}")
            runs.append((run_start - offset, run_end - offset))
        last_eoi = item_bois[-1] + 1 + tokens.mm_tokens_per_image
        ranges.append(PlaceholderRange(offset=offset, length=last_eoi + 1 - offset, embed_runs=tuple(runs)))
    return ranges


def _token_text(tokenizer: Tokenizer, token_id: int, key: str) -> str:
    text = tokenizer.backend_tokenizer.id_to_token(token_id)
    if text is None:
        raise ValueError(f"config.json: {key}={token_id} is not in the tokenizer's vocabulary "
                         "(a Gemma 3 vision tokenizer has <start_of_image>, <end_of_image> and <image_soft_token>)")
    return text
