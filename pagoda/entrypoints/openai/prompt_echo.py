"""Entrypoints layer: the prompt inside a response — `echo` and `prompt_logprobs`.

`echo` (completions) puts the prompt's text before each choice's text and,
with `logprobs`, the prompt tokens' logprobs before the completion's, as
OpenAI's legacy API did; the first prompt token has none, since nothing
predicts it. `prompt_logprobs` (vLLM's) reports each prompt position's token
and its top alternatives by token id, with rank and text.
"""

from __future__ import annotations

from collections.abc import Callable

from pagoda.entrypoints.openai.responses import CompletionLogprobs, PromptLogprob, PromptLogprobsOut
from pagoda.outputs import PromptLogprobs


def prompt_logprobs_out(logprobs: PromptLogprobs | None) -> PromptLogprobsOut | None:
    if logprobs is None:
        return None
    return [
        None if position is None else {
            str(token_id): PromptLogprob(logprob=entry.logprob, rank=entry.rank, decoded_token=entry.decoded_token)
            for token_id, entry in position.items()
        }
        for position in logprobs
    ]


def echo_logprobs(
    token_ids: list[int], logprobs: PromptLogprobs, num_top: int, decode: Callable[[int], str], text_length: int
) -> CompletionLogprobs:
    """The prompt's part of legacy logprobs: token, logprob, top `num_top` (and the prompt's own token), offset.

    Offsets count back from the end of the echoed text (`text_length` characters), so that tokens the
    tokenizer added and the text lacks (BOS) sit at 0 rather than shifting every later offset.
    """
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    for token_id, position in zip(token_ids, logprobs):
        if position is None:
            token, logprob, top = decode(token_id), None, None
        else:
            chosen = position[token_id]
            token, logprob = chosen.decoded_token or "", chosen.logprob
            ranked = sorted(position.values(), key=lambda p: p.rank)
            top = {p.decoded_token or "": p.logprob for p in ranked if p.rank <= num_top or p is chosen}
        tokens.append(token)
        token_logprobs.append(logprob)
        tops.append(top)
    offsets = []
    remaining = text_length
    for token in reversed(tokens):
        remaining -= len(token)
        offsets.append(max(0, remaining))
    offsets.reverse()
    return CompletionLogprobs(text_offset=offsets, token_logprobs=token_logprobs, tokens=tokens, top_logprobs=tops)


def joined(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        text_offset=first.text_offset + second.text_offset,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        tokens=first.tokens + second.tokens,
        top_logprobs=first.top_logprobs + second.top_logprobs,
    )
