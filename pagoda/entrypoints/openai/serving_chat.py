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

from pagoda.entrypoints.openai.errors import OpenAIError, bad_request
from pagoda.entrypoints.openai.prompt_echo import prompt_logprobs_out
from pagoda.entrypoints.openai.protocol import ChatCompletionRequest
from pagoda.entrypoints.openai.tool_calls import ToolPlan, plan_tool_calls
from pagoda.entrypoints.openai.responses import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    ChatStreamChoice,
    ChatTokenLogprob,
    DeltaMessage,
    FunctionCall,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    UsageInfo,
)
from pagoda.entrypoints.openai.serving_engine import OpenAIServing, add_usage, sse
from pagoda.outputs import CompletionOutput, RequestOutput
from pagoda.structured_output.grammar import check_structured_outputs


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
        if request.stream and request.prompt_logprobs is not None:
            raise bad_request("prompt_logprobs: not available when streaming; send stream: false",
                              "prompt_logprobs")
        plan = self._tool_plan(request)
        prompt = await self.chat_prompt(request.messages, request.add_generation_prompt, request.tools or None)
        max_tokens = self.max_tokens(request.requested_max_tokens, len(prompt.token_ids))
        params = self.sampling_params(request, max_tokens, request.num_logprobs, request.prompt_logprobs)
        if plan is not None:
            if params.structured_outputs is not None:
                raise bad_request("tool_choice: a request that must call a tool cannot also ask for structured "
                                  "output (response_format, structured_outputs, guided_*)", "tool_choice")
            params = params.clone(structured_outputs=plan.constraint)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        outputs = self.generate(prompt, params, request_id, request)
        if request.stream:
            return StreamingResponse(self._stream(request, request_id, model_name, outputs, plan),
                                     media_type="text/event-stream")
        response = await self.cancel_on_disconnect(
            raw_request, self._collect(request, request_id, model_name, outputs, plan))
        return JSONResponse(response.model_dump())

    @staticmethod
    def _tool_plan(request: ChatCompletionRequest) -> ToolPlan | None:
        try:
            plan = plan_tool_calls(request.tools, request.tool_choice, request.parallel_tool_calls)
            if plan is not None:
                check_structured_outputs(plan.constraint)
        except ValueError as error:
            message = str(error)
            param = message.split(":", 1)[0] if message.startswith(("tools:", "tool_choice:")) else "tools"
            raise bad_request(message if param != "tools" or message.startswith("tools:")
                              else f"tools: {message}", param) from error
        return plan

    async def _collect(
        self, request: ChatCompletionRequest, request_id: str, model_name: str, outputs: AsyncIterator[RequestOutput],
        plan: ToolPlan | None,
    ) -> ChatCompletionResponse:
        choices: list[ChatChoice] = []
        usage = UsageInfo()
        prompt_logprobs = None
        async with aclosing(outputs):
            async for output in outputs:
                add_usage(usage, output, first=True)
                if request.prompt_logprobs is not None:
                    prompt_logprobs = prompt_logprobs_out(output.prompt_logprobs)
                for completion in output.outputs:
                    logprobs = None
                    if request.num_logprobs is not None:
                        logprobs = chat_logprobs(completion, request.num_logprobs)
                    message, finish_reason = _message(completion, plan)
                    if message.content is not None:
                        message.content = _echoed(request) + message.content
                    choices.append(ChatChoice(
                        index=completion.index,
                        message=message,
                        logprobs=logprobs,
                        finish_reason=finish_reason,
                        stop_reason=completion.stop_reason,
                    ))
        choices.sort(key=lambda choice: choice.index)
        return ChatCompletionResponse(id=request_id, model=model_name, choices=choices, usage=usage,
                                      prompt_logprobs=prompt_logprobs)

    async def _stream(
        self, request: ChatCompletionRequest, request_id: str, model_name: str, outputs: AsyncIterator[RequestOutput],
        plan: ToolPlan | None,
    ) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            return sse(ChatCompletionChunk(id=request_id, created=created, model=model_name, choices=choices,
                                           usage=usage))

        usage = UsageInfo()
        first_output = True
        calls = {index: _StreamedCalls(plan) for index in range(request.n)} if plan is not None else None
        try:
            echoed = "" if plan is not None else _echoed(request)
            yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=echoed))
                         for i in range(request.n)])
            async with aclosing(outputs):
                async for output in outputs:
                    add_usage(usage, output, first=first_output)
                    first_output = False
                    for completion in output.outputs:
                        # Tokens may bring no text yet (a partial character, a possible stop string).
                        if not completion.text and not completion.finished() and request.num_logprobs is None:
                            continue
                        delta, finish_reason = (DeltaMessage(content=completion.text), completion.finish_reason)
                        if calls is not None:
                            delta, finish_reason = calls[completion.index].delta(completion)
                            if delta is None:
                                continue
                        yield chunk([ChatStreamChoice(
                            index=completion.index,
                            delta=delta,
                            logprobs=None if request.num_logprobs is None else chat_logprobs(
                                completion, request.num_logprobs),
                            finish_reason=finish_reason,
                            stop_reason=completion.stop_reason,
                        )])
            if request.include_usage_in_stream:
                yield chunk([], usage)
        except OpenAIError as error:
            yield error.sse_event()
        yield "data: [DONE]\n\n"


def _echoed(request: ChatCompletionRequest) -> str:
    """What `echo` puts before the answer: the last message's text when it is the assistant's (the answer
    continues it), as vLLM does; nothing otherwise."""
    last = request.messages[-1]
    if not request.echo or last.role != "assistant":
        return ""
    content = last.to_template_message()["content"]
    return content if isinstance(content, str) else ""


def _message(completion: CompletionOutput, plan: ToolPlan | None) -> tuple[ChatMessageOut, str | None]:
    """The answer as a message, and its finish reason: tool calls when the request had to call a tool and its
    answer is complete, else the text (a call cut short by max_tokens stays text, finishing with "length")."""
    if plan is None or completion.finish_reason != "stop":
        return ChatMessageOut(content=completion.text), completion.finish_reason
    calls = [ToolCall(id=call["id"], function=FunctionCall(**call["function"])) for call in plan.calls(completion.text)]
    return ChatMessageOut(content=None, tool_calls=calls), "tool_calls"


class _StreamedCalls:
    """One streamed choice's tool calls: a named function's arguments stream as they come; calls of
    "required" are whole only at the end (their name comes inside the JSON), so they come in the last chunk."""

    def __init__(self, plan: ToolPlan) -> None:
        self._plan = plan
        self._text = ""
        self._call_id = f"call_{uuid.uuid4().hex[:24]}"

    def delta(self, completion: CompletionOutput) -> tuple[DeltaMessage | None, str | None]:
        first = not self._text
        self._text += completion.text
        finished = completion.finished()
        reason = completion.finish_reason if completion.finish_reason != "stop" else "tool_calls"
        if self._plan.named is not None:
            if not completion.text:
                return (DeltaMessage(), reason) if finished else (None, None)
            call = ToolCallDelta(index=0, id=self._call_id if first else None, type="function" if first else None,
                                 function=FunctionCall(name=self._plan.named if first else None,
                                                       arguments=completion.text))
            return DeltaMessage(tool_calls=[call]), reason if finished else None
        if not finished:
            return None, None
        if completion.finish_reason != "stop":
            return DeltaMessage(content=self._text), completion.finish_reason
        calls = [ToolCallDelta(index=i, id=call["id"], type="function", function=FunctionCall(**call["function"]))
                 for i, call in enumerate(self._plan.calls(self._text))]
        return DeltaMessage(tool_calls=calls), "tool_calls"
