"""Entrypoints layer: `/v1/chat/completions` — a conversation rendered by the model's chat template.

The template places BOS and the other special tokens itself, so the rendered
text is tokenized without adding any. A streamed response opens every choice
with a chunk carrying the assistant role, then sends the content as it
comes, the usage chunk when asked for, and `[DONE]`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagoda.entrypoints.openai.errors import OpenAIError
from pagoda.entrypoints.openai.protocol import ChatCompletionRequest
from pagoda.entrypoints.openai.responses import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    ChatStreamChoice,
    ChatTokenLogprob,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
)
from pagoda.entrypoints.openai.serving_engine import OpenAIServing, add_usage, sse
from pagoda.outputs import CompletionOutput, RequestOutput


def chat_logprobs(output: CompletionOutput, num_top: int) -> ChatLogprobs:
    """OpenAI's chat logprobs: each token with its bytes and its `num_top` most likely alternatives."""
    content = []
    for token_id, position in zip(output.token_ids, output.logprobs or []):
        chosen = position[token_id]
        top = sorted(position.values(), key=lambda p: p.rank)[:num_top]
        content.append(ChatTokenLogprob(
            token=chosen.decoded_token or "",
            logprob=chosen.logprob,
            bytes=list((chosen.decoded_token or "").encode()),
            top_logprobs=[TopLogprob(token=p.decoded_token or "", logprob=p.logprob,
                                     bytes=list((p.decoded_token or "").encode())) for p in top],
        ))
    return ChatLogprobs(content=content)


class OpenAIServingChat(OpenAIServing):
    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        model_name = self.check_request(request, "/v1/chat/completions",
                                        {"best_of": request.n, "add_special_tokens": False})
        prompt = await self.chat_prompt(request.messages, request.add_generation_prompt)
        max_tokens = self.max_tokens(request.requested_max_tokens, len(prompt.token_ids))
        params = self.sampling_params(request, max_tokens, request.num_logprobs)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        outputs = self.generate(prompt, params, request_id)
        if request.stream:
            return StreamingResponse(self._stream(request, request_id, model_name, outputs),
                                     media_type="text/event-stream")
        response = await self.cancel_on_disconnect(raw_request, self._collect(request, request_id, model_name, outputs))
        return JSONResponse(response.model_dump())

    async def _collect(
        self, request: ChatCompletionRequest, request_id: str, model_name: str, outputs: AsyncIterator[RequestOutput]
    ) -> ChatCompletionResponse:
        choices: list[ChatChoice] = []
        usage = UsageInfo()
        async with aclosing(outputs):
            async for output in outputs:
                add_usage(usage, output, first=True)
                for completion in output.outputs:
                    logprobs = None
                    if request.num_logprobs is not None:
                        logprobs = chat_logprobs(completion, request.num_logprobs)
                    choices.append(ChatChoice(
                        index=completion.index,
                        message=ChatMessageOut(content=completion.text),
                        logprobs=logprobs,
                        finish_reason=completion.finish_reason,
                        stop_reason=completion.stop_reason,
                    ))
        choices.sort(key=lambda choice: choice.index)
        return ChatCompletionResponse(id=request_id, model=model_name, choices=choices, usage=usage)

    async def _stream(
        self, request: ChatCompletionRequest, request_id: str, model_name: str, outputs: AsyncIterator[RequestOutput]
    ) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            return sse(ChatCompletionChunk(id=request_id, created=created, model=model_name, choices=choices,
                                           usage=usage))

        usage = UsageInfo()
        first_output = True
        try:
            yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                         for i in range(request.n)])
            async with aclosing(outputs):
                async for output in outputs:
                    add_usage(usage, output, first=first_output)
                    first_output = False
                    for completion in output.outputs:
                        # Tokens may bring no text yet (a partial character, a possible stop string).
                        if not completion.text and not completion.finished() and request.num_logprobs is None:
                            continue
                        yield chunk([ChatStreamChoice(
                            index=completion.index,
                            delta=DeltaMessage(content=completion.text),
                            logprobs=None if request.num_logprobs is None else chat_logprobs(
                                completion, request.num_logprobs),
                            finish_reason=completion.finish_reason,
                            stop_reason=completion.stop_reason,
                        )])
            if request.include_usage_in_stream:
                yield chunk([], usage)
        except OpenAIError as error:
            yield error.sse_event()
        yield "data: [DONE]\n\n"
