"""Entrypoints layer: `/v1/completions` — text or token-id prompts (one or a batch), streamed or not.

Choice `i` of prompt `p` has index `p * n + i`, as in OpenAI's API. A
streamed response sends one chunk per new piece of text, then (when
`stream_options.include_usage` is set) a chunk with no choices and the usage,
then `[DONE]`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagoda.entrypoints.openai.errors import OpenAIError, bad_request
from pagoda.entrypoints.openai.protocol import MAX_N, CompletionRequest
from pagoda.entrypoints.openai.responses import CompletionChoice, CompletionLogprobs, CompletionResponse, UsageInfo
from pagoda.entrypoints.openai.serving_engine import OpenAIServing, add_usage, merge_async_iterators, sse
from pagoda.outputs import CompletionOutput, RequestOutput


def completion_logprobs(output: CompletionOutput, num_top: int, text_offset: int) -> CompletionLogprobs:
    """OpenAI's legacy logprobs: each token, its logprob, the top `num_top` and the text offsets."""
    result = CompletionLogprobs()
    for token_id, position in zip(output.token_ids, output.logprobs or []):
        chosen = position[token_id]
        token = chosen.decoded_token or ""
        result.tokens.append(token)
        result.token_logprobs.append(chosen.logprob)
        result.text_offset.append(text_offset)
        # As in vLLM, the sampled token is listed beside the top `num_top`.
        top = sorted(position.values(), key=lambda p: p.rank)
        result.top_logprobs.append({
            p.decoded_token or "": p.logprob for p in top if p.rank <= num_top or p is chosen
        })
        text_offset += len(token)
    return result


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Response:
        model_name = self.check_request(request, "/v1/completions",
                                        {"best_of": request.n, "add_special_tokens": True})
        prompts = request.prompts()
        if not prompts:
            raise bad_request("prompt is empty", "prompt")
        # OpenAI's bound on n, over the whole batch: one request cannot ask for unbounded work.
        if len(prompts) * request.n > MAX_N:
            raise bad_request(f"{len(prompts)} prompts with n={request.n} ask for {len(prompts) * request.n} "
                              f"completions; at most {MAX_N} per request", "n" if request.n > 1 else "prompt")
        token_ids = [self.prompt_token_ids(prompt, "prompt") for prompt in prompts]
        params = [
            self.sampling_params(request, self.max_tokens(request.max_tokens, len(ids)), request.logprobs)
            for ids in token_ids
        ]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = [
            self.generate(ids, p, request_id if len(prompts) == 1 else f"{request_id}-{i}", request)
            for i, (ids, p) in enumerate(zip(token_ids, params))
        ]
        outputs = merge_async_iterators(*streams)
        if request.stream:
            return StreamingResponse(self._stream(request, request_id, model_name, outputs),
                                     media_type="text/event-stream")
        response = await self.cancel_on_disconnect(raw_request, self._collect(request, request_id, model_name, outputs))
        return JSONResponse(response.model_dump())

    async def _collect(
        self, request: CompletionRequest, request_id: str, model_name: str,
        outputs: AsyncIterator[tuple[int, RequestOutput]],
    ) -> CompletionResponse:
        choices: list[CompletionChoice] = []
        usage = UsageInfo()
        async with aclosing(outputs):
            async for prompt_index, output in outputs:
                add_usage(usage, output, first=True)
                for completion in output.outputs:
                    choices.append(CompletionChoice(
                        index=prompt_index * request.n + completion.index,
                        text=completion.text,
                        logprobs=None if request.logprobs is None else completion_logprobs(
                            completion, request.logprobs, 0),
                        finish_reason=completion.finish_reason,
                        stop_reason=completion.stop_reason,
                    ))
        choices.sort(key=lambda choice: choice.index)
        return CompletionResponse(id=request_id, model=model_name, choices=choices, usage=usage)

    async def _stream(
        self, request: CompletionRequest, request_id: str, model_name: str,
        outputs: AsyncIterator[tuple[int, RequestOutput]],
    ) -> AsyncIterator[str]:
        usage = UsageInfo()
        text_offsets: dict[int, int] = {}  # choice index -> characters sent so far
        seen_prompts: set[int] = set()
        created = int(time.time())
        try:
            async with aclosing(outputs):
                async for prompt_index, output in outputs:
                    add_usage(usage, output, first=prompt_index not in seen_prompts)
                    seen_prompts.add(prompt_index)
                    for completion in output.outputs:
                        # Tokens may bring no text yet (a partial character, a possible stop string).
                        if not completion.text and not completion.finished() and request.logprobs is None:
                            continue
                        index = prompt_index * request.n + completion.index
                        offset = text_offsets.get(index, 0)
                        text_offsets[index] = offset + len(completion.text)
                        choice = CompletionChoice(
                            index=index,
                            text=completion.text,
                            logprobs=None if request.logprobs is None else completion_logprobs(
                                completion, request.logprobs, offset),
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

