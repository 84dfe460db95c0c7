"""Entrypoints layer: `/v1/completions` — text or token-id prompts (one or a batch), streamed or not.

Choice `i` of prompt `p` has index `p * n + i`, as in OpenAI's API. A
streamed response sends one chunk per new piece of text, then (when
`stream_options.include_usage` is set) a chunk with no choices and the usage,
then `[DONE]`. With `echo`, a choice's first chunk (or its text) starts with
the prompt; `echo` with `max_tokens: 0` returns the prompt alone, to score it.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagoda.entrypoints.openai.errors import OpenAIError, bad_request
from pagoda.entrypoints.openai.prompt_echo import echo_logprobs, joined, prompt_logprobs_out
from pagoda.entrypoints.openai.protocol import MAX_N, CompletionRequest, Prompt
from pagoda.entrypoints.openai.responses import CompletionChoice, CompletionLogprobs, CompletionResponse, UsageInfo
from pagoda.entrypoints.openai.serving_engine import OpenAIServing, add_usage, merge_async_iterators, sse
from pagoda.outputs import CompletionOutput, PromptLogprobs, RequestOutput


def completion_logprobs(output: CompletionOutput, num_top: int, text_offset: int) -> CompletionLogprobs:
    """OpenAI's legacy logprobs: each token, its logprob, the top `num_top` and the text offsets."""
    tokens, token_logprobs, offsets, tops = [], [], [], []
    for token_id, position in zip(output.token_ids, output.logprobs or []):
        chosen = position[token_id]
        token = chosen.decoded_token or ""
        tokens.append(token)
        token_logprobs.append(chosen.logprob)
        offsets.append(text_offset)
        # As in vLLM, the sampled token is listed beside the top `num_top`.
        top = sorted(position.values(), key=lambda p: p.rank)
        tops.append({p.decoded_token or "": p.logprob for p in top if p.rank <= num_top or p is chosen})
        text_offset += len(token)
    # Built whole, so that the model's checks (logprobs JSON can carry) see every value.
    return CompletionLogprobs(text_offset=offsets, token_logprobs=token_logprobs, tokens=tokens, top_logprobs=tops)


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Response:
        model_name = self.check_request(request, "/v1/completions",
                                        {"best_of": request.n, "add_special_tokens": True})
        if request.max_tokens == 0 and not request.echo:
            raise bad_request("max_tokens: 0 asks for no completion, which only makes sense with echo: true "
                              "(to score the prompt)", "max_tokens")
        if request.stream and request.prompt_logprobs is not None:
            raise bad_request("prompt_logprobs: not available when streaming; send stream: false, or echo: true "
                              "with logprobs to stream the prompt's logprobs", "prompt_logprobs")
        prompts = request.prompts()
        if not prompts:
            raise bad_request("prompt is empty", "prompt")
        # OpenAI's bound on n, over the whole batch: one request cannot ask for unbounded work.
        if len(prompts) * request.n > MAX_N:
            raise bad_request(f"{len(prompts)} prompts with n={request.n} ask for {len(prompts) * request.n} "
                              f"completions; at most {MAX_N} per request", "n" if request.n > 1 else "prompt")
        token_ids = [self.prompt_token_ids(prompt, "prompt") for prompt in prompts]
        echo = _Echo(request, [self._prompt_text(prompt) for prompt in prompts], self._decode_token)
        params = [
            # max_tokens 0 (echo alone) still runs one step, for the prompt's logprobs; its token is dropped.
            self.sampling_params(request, max(1, self.max_tokens(request.max_tokens, len(ids))), request.logprobs,
                                 echo.num_prompt_logprobs)
            for ids in token_ids
        ]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = [
            self.generate(ids, p, request_id if len(prompts) == 1 else f"{request_id}-{i}", request)
            for i, (ids, p) in enumerate(zip(token_ids, params))
        ]
        outputs = merge_async_iterators(*streams)
        if request.stream:
            return StreamingResponse(self._stream(request, request_id, model_name, outputs, echo),
                                     media_type="text/event-stream")
        response = await self.cancel_on_disconnect(
            raw_request, self._collect(request, request_id, model_name, outputs, echo))
        return JSONResponse(response.model_dump())

    def _prompt_text(self, prompt: Prompt) -> str:
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt, skip_special_tokens=False)

    def _decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    async def _collect(
        self, request: CompletionRequest, request_id: str, model_name: str,
        outputs: AsyncIterator[tuple[int, RequestOutput]], echo: _Echo,
    ) -> CompletionResponse:
        choices: list[CompletionChoice] = []
        usage = UsageInfo()
        async with aclosing(outputs):
            async for prompt_index, output in outputs:
                output = echo.visible(output)
                add_usage(usage, output, first=True)
                for completion in output.outputs:
                    text, logprobs = echo.first_chunk(prompt_index, completion, output.prompt_token_ids,
                                                      output.prompt_logprobs)
                    choices.append(CompletionChoice(
                        index=prompt_index * request.n + completion.index,
                        text=text,
                        logprobs=logprobs,
                        finish_reason=completion.finish_reason,
                        stop_reason=completion.stop_reason,
                        prompt_logprobs=(prompt_logprobs_out(output.prompt_logprobs)
                                         if request.prompt_logprobs is not None else None),
                    ))
        choices.sort(key=lambda choice: choice.index)
        return CompletionResponse(id=request_id, model=model_name, choices=choices, usage=usage)

    async def _stream(
        self, request: CompletionRequest, request_id: str, model_name: str,
        outputs: AsyncIterator[tuple[int, RequestOutput]], echo: _Echo,
    ) -> AsyncIterator[str]:
        usage = UsageInfo()
        text_offsets: dict[int, int] = {}  # choice index -> characters sent so far
        prompt_logprobs: dict[int, PromptLogprobs] = {}  # choice index -> its prompt's logprobs so far
        seen_prompts: set[int] = set()
        created = int(time.time())
        try:
            async with aclosing(outputs):
                async for prompt_index, output in outputs:
                    output = echo.visible(output)
                    add_usage(usage, output, first=prompt_index not in seen_prompts)
                    seen_prompts.add(prompt_index)
                    for completion in output.outputs:
                        index = prompt_index * request.n + completion.index
                        prompt_logprobs.setdefault(index, []).extend(output.prompt_logprobs or [])
                        # Tokens may bring no text yet (a partial character, a possible stop string).
                        if not completion.finished() and (
                            not completion.token_ids or (not completion.text and request.logprobs is None)
                        ):
                            continue
                        if index in text_offsets:
                            offset = text_offsets[index]
                            text = completion.text
                            logprobs = None if request.logprobs is None else completion_logprobs(
                                completion, request.logprobs, offset)
                        else:
                            offset = 0
                            text, logprobs = echo.first_chunk(prompt_index, completion, output.prompt_token_ids,
                                                              prompt_logprobs[index])
                        text_offsets[index] = offset + len(text)
                        choice = CompletionChoice(
                            index=index,
                            text=text,
                            logprobs=logprobs,
                            finish_reason=completion.finish_reason,
                            stop_reason=completion.stop_reason,
                        )
                        yield sse(CompletionResponse(id=request_id, created=created, model=model_name,
                                                     choices=[choice]))
            if request.include_usage_in_stream:
                yield sse(CompletionResponse(id=request_id, created=created, model=model_name, choices=[],
                                             usage=usage))
        except OpenAIError as error:
            yield error.sse_event()
        yield "data: [DONE]\n\n"


class _Echo:
    """What `echo` adds to a request's choices: the prompt's text first and, with `logprobs`, its tokens'."""

    def __init__(self, request: CompletionRequest, prompt_texts: list[str], decode: Callable[[int], str]) -> None:
        self._enabled = request.echo
        self._only = request.echo and request.max_tokens == 0
        self._num_logprobs = request.logprobs
        self._prompt_texts = prompt_texts
        self._decode = decode
        self.num_prompt_logprobs = request.prompt_logprobs
        if request.echo and request.logprobs is not None:
            self.num_prompt_logprobs = max(request.logprobs, request.prompt_logprobs or 0)

    def visible(self, output: RequestOutput) -> RequestOutput:
        """The output as the client sees it: with echo alone, the one token generated is not part of it."""
        if not self._only:
            return output
        hidden = [dataclasses.replace(c, text="", token_ids=[], logprobs=None if c.logprobs is None else [],
                                      cumulative_logprob=None if c.cumulative_logprob is None else 0.0)
                  for c in output.outputs]
        return dataclasses.replace(output, outputs=hidden)

    def first_chunk(
        self, prompt_index: int, completion: CompletionOutput, prompt_token_ids: list[int],
        prompt_logprobs: PromptLogprobs | None,
    ) -> tuple[str, CompletionLogprobs | None]:
        """A choice's text and logprobs from its start: the prompt's (when echoing), then the completion's."""
        prefix = self._prompt_texts[prompt_index] if self._enabled else ""
        logprobs = None
        if self._num_logprobs is not None:
            logprobs = completion_logprobs(completion, self._num_logprobs, len(prefix))
            if self._enabled and prompt_logprobs:
                logprobs = joined(echo_logprobs(prompt_token_ids, prompt_logprobs, self._num_logprobs,
                                                self._decode, len(prefix)), logprobs)
        return prefix + completion.text, logprobs
