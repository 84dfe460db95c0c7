"""Entrypoints layer: what completions and chat share — checks, prompt handling, and the engine call.

Everything a request could get wrong against this model (unknown model name,
a parameter Pagoda does not implement, token ids outside the vocabulary, a
prompt longer than the context) is checked here, before the request reaches
the engine, so it fails alone with a 400 naming the field. A client that goes away closes its request's output
stream, which aborts the request in the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from http import HTTPStatus
from typing import Any, TypeVar

import jinja2
from fastapi import Request
from pydantic import BaseModel

from pagoda.engine.async_llm import AsyncLLM
from pagoda.engine.exceptions import EngineDeadError
from pagoda.engine.prompt_inputs import ProcessedPrompt, split_chat_images
from pagoda.engine.tokenizer import render_chat
from pagoda.entrypoints.openai.errors import OpenAIError, bad_request, from_value_error
from pagoda.entrypoints.openai.input_text import longest_token_bytes, text_bytes
from pagoda.entrypoints.openai.protocol import ChatMessage, Prompt, SamplingRequest
from pagoda.entrypoints.openai.responses import UsageInfo
from pagoda.entrypoints.openai.unsupported import log_unknown_fields, refuse_unsupported
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams

T = TypeVar("T")

ENGINE_DEAD_MESSAGE = "the engine process died; this server cannot serve requests until it is restarted"
# How often a non-streaming request checks whether its client is still there.
_DISCONNECT_POLL_SECONDS = 0.5


def sse(body: BaseModel) -> str:
    """One server-sent event carrying `body` as JSON."""
    return f"data: {body.model_dump_json()}\n\n"


def engine_dead_error(detail: EngineDeadError | None = None) -> OpenAIError:
    message = ENGINE_DEAD_MESSAGE if detail is None else f"{ENGINE_DEAD_MESSAGE} ({detail})"
    return OpenAIError(HTTPStatus.SERVICE_UNAVAILABLE, message, code="engine_dead")


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, model_names: list[str]) -> None:
        self.engine = engine
        self.model_names = model_names
        self.tokenizer = engine.get_tokenizer()
        model_config = engine.config.model_config
        self.max_model_len = model_config.max_model_len
        self.vocab_size = model_config.vocab_size
        # More bytes of text than this cannot fit the context, whatever the tokenizer makes of them.
        self.max_text_bytes = self.max_model_len * longest_token_bytes(self.tokenizer)

    def check_model(self, model: str | None) -> str:
        """The served name to report; 404 for a model this server does not serve."""
        if model is None:
            return self.model_names[0]
        if model not in self.model_names:
            raise OpenAIError(HTTPStatus.NOT_FOUND, f"the model `{model}` does not exist; this server serves "
                              f"{self.model_names}", param="model", code="model_not_found")
        return model

    def check_request(self, request: SamplingRequest, endpoint: str, defaults: dict[str, Any]) -> str:
        """Checks that need the model; returns the model name to report.

        `defaults`: the harmless value of each unimplemented parameter whose default
        depends on the endpoint or on the request (see `refuse_unsupported`).
        """
        model_name = self.check_model(request.model)
        log_unknown_fields(request, endpoint)
        refuse_unsupported(request, defaults)
        if request.priority != 0 and self.engine.config.scheduler_config.policy != "priority":
            raise bad_request("priority: this server schedules first come, first served; start it with "
                              "--scheduling-policy priority to order requests by priority", "priority")
        if self.engine.errored:
            raise engine_dead_error()
        self.check_token_ids(list(request.logit_bias or ()), "logit_bias")
        self.check_token_ids(request.stop_token_ids or [], "stop_token_ids")
        return model_name

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(f"{param}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", param)

    def check_text_length(self, text: str, param: str) -> None:
        """400 for a text too long to fit the context in any tokenization, before spending time tokenizing it."""
        size = text_bytes(text)
        if size > self.max_text_bytes:
            raise bad_request(f"{param} is {size} bytes of text, more than this model's maximum context "
                              f"length of {self.max_model_len} tokens can hold", param)

    def encode(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        self.check_text_length(text, param)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def prompt_token_ids(self, prompt: Prompt, param: str) -> list[int]:
        """Text is tokenized (BOS added as the model's tokenizer says); token ids are checked against the vocabulary."""
        if isinstance(prompt, str):
            token_ids = self.encode(prompt, param) if prompt else []
        else:
            token_ids = list(prompt)
            self.check_token_ids(token_ids, param)
        if not token_ids:
            raise bad_request(f"{param} is empty", param)
        if len(token_ids) >= self.max_model_len:
            raise bad_request(f"{param} has {len(token_ids)} tokens; this model's maximum context length is "
                              f"{self.max_model_len} tokens, with at least one left for the completion", param)
        return token_ids

    def chat_token_ids(self, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
        """A conversation rendered by the chat template; 400 naming `messages` if the template refuses it."""
        text, images = self._render_chat(messages, add_generation_prompt)
        if images:
            raise bad_request("messages: images are not tokenized here; send them to /v1/chat/completions",
                              "messages")
        # The template places BOS and the other special tokens itself.
        return self.encode(text, "messages", add_special_tokens=False)

    async def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool,
                          tools: list[dict[str, Any]] | None = None) -> ProcessedPrompt:
        """The conversation as the engine's prompt: token ids, and for image parts, the preprocessed images
        (off the event loop); 400 naming `messages` for a bad image or a model that takes none."""
        text, images = self._render_chat(messages, add_generation_prompt, tools)
        if not images:
            return ProcessedPrompt(self.prompt_token_ids(self.encode(text, "messages", add_special_tokens=False),
                                                         "messages"))
        self.check_text_length(text, "messages")
        try:
            processed = await self.engine.process_prompt({"prompt": text, "multi_modal_data": {"image": images}},
                                                         add_special_tokens=False)
        except ValueError as error:
            raise bad_request(f"messages: {error}", "messages") from error
        self.prompt_token_ids(processed.token_ids, "messages")
        return processed

    def _render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool,
                     tools: list[dict[str, Any]] | None = None) -> tuple[str, list[Any]]:
        try:
            conversation, images = split_chat_images([m.to_template_message() for m in messages])
            if images and self.engine.input_processor.mm_processor is None:
                # Before rendering: a text model's template may not even take a list of parts.
                raise ValueError("this model takes no images")
            return render_chat(self.tokenizer, conversation, add_generation_prompt, tools=tools), images
        except (ValueError, TypeError, jinja2.TemplateError) as error:  # TypeError: a template tripping on parts
            raise bad_request(f"messages: {error}", "messages") from error

    def max_tokens(self, requested: int | None, num_prompt_tokens: int) -> int:
        """The completion budget: as requested, or what the context leaves; 400 past the context."""
        room = self.max_model_len - num_prompt_tokens
        if requested is None:
            return room
        if requested > room:
            raise bad_request(f"max_tokens={requested} plus the prompt's {num_prompt_tokens} tokens exceeds this "
                              f"model's maximum context length of {self.max_model_len} tokens", "max_tokens")
        return requested

    @staticmethod
    def sampling_params(request: SamplingRequest, max_tokens: int, num_logprobs: int | None,
                        num_prompt_logprobs: int | None) -> SamplingParams:
        try:
            return request.to_sampling_params(max_tokens, num_logprobs, num_prompt_logprobs)
        except ValueError as error:
            raise from_value_error(error) from error

    async def generate(
        self, prompt: list[int] | ProcessedPrompt, params: SamplingParams, request_id: str, request: SamplingRequest
    ) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one prompt, engine failures as OpenAI errors.

        A consumer that stops early (its client went away) closes this
        generator, and `AsyncLLM.generate` then aborts the request.
        """
        try:
            async for output in self.engine.generate(prompt, params, request_id, request.priority,
                                                     cache_salt=request.cache_salt):
                if output.error is not None and output.invalid_request:
                    raise from_value_error(ValueError(output.error))
                if output.error is not None:
                    raise OpenAIError(HTTPStatus.INTERNAL_SERVER_ERROR, f"request failed: {output.error}")
                yield output
        except ValueError as error:
            raise from_value_error(error, "prompt") from error
        except EngineDeadError as error:
            raise engine_dead_error(error) from error

    @staticmethod
    async def cancel_on_disconnect(raw_request: Request, work: Awaitable[T]) -> T:
        """Runs `work`, cancelling it if the client disconnects first (non-streaming requests)."""
        task = asyncio.ensure_future(work)
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_SECONDS)
            if done:
                return task.result()
            if await raw_request.is_disconnected():
                task.cancel()
                # Nobody reads this answer; 499 is the usual "client closed request".
                raise OpenAIError(499, "client disconnected")


def add_usage(usage: UsageInfo, output: RequestOutput, first: bool) -> None:
    """Counts one output's tokens into `usage`; the prompt is counted on a prompt's first output only."""
    if first:
        usage.prompt_tokens += len(output.prompt_token_ids)
    if output.finished:
        usage.prompt_tokens_details.cached_tokens += output.num_cached_tokens
        store_tokens = usage.prompt_tokens_details.kv_store_tokens
        for tier, tokens in (output.metrics.kv_store_tokens if output.metrics else {}).items():
            store_tokens[tier] = store_tokens.get(tier, 0) + tokens
    usage.completion_tokens += sum(len(c.token_ids) for c in output.outputs)
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens


async def merge_async_iterators(*iterators: AsyncIterator[T]) -> AsyncIterator[tuple[int, T]]:
    """Items of several iterators as they come, tagged with the iterator's position."""
    if len(iterators) == 1:
        async with aclosing(iterators[0]):
            async for item in iterators[0]:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, T] | tuple[int, BaseException] | None] = asyncio.Queue()

    async def drain(index: int, iterator: AsyncIterator[T]) -> None:
        try:
            async for item in iterator:
                await queue.put((index, item))
        except Exception as error:  # noqa: BLE001 - handed to the consumer, which re-raises it
            await queue.put((index, error))
        await queue.put(None)

    tasks = [asyncio.ensure_future(drain(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            entry = await queue.get()
            if entry is None:
                remaining -= 1
                continue
            if isinstance(entry[1], BaseException):
                raise entry[1]
            yield entry  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
