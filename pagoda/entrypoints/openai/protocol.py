"""Entrypoints layer: the request bodies of the OpenAI-compatible API, as pydantic models.

Field names and ranges follow OpenAI's API reference, plus the extra sampling
fields vLLM's users send (`top_k`, `min_p`, `ignore_eos`, ...). Range checks
live in the field declarations, so a bad value is refused with a 400 naming
the field before anything reaches the engine; floats must be finite (Python's
json reads `NaN` and `Infinity`), integers that travel to the engine must fit
its 64-bit fields, and no string may hold a lone surrogate. The parameters
Pagoda does not implement are declared too, so the OpenAPI schema shows them
and `unsupported.py` can refuse them by name; fields no model declares are
kept aside (`model_extra`) to be logged and ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pagoda.entrypoints.openai.input_text import lone_surrogate_position
from pagoda.entrypoints.openai.structured_outputs import SOURCE_FIELDS, structured_outputs_of
from pagoda.sampling_params import RequestOutputKind, SamplingParams

# As in vLLM: more logprob candidates per position than this are refused.
MAX_LOGPROBS = 20
# OpenAI's own upper bound on `n`.
MAX_N = 128

# The engine's messages carry integers as 64-bit values (msgspec refuses larger ones).
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

LogitBias = dict[int, Annotated[float, Field(ge=-100.0, le=100.0)]]
JSONObject = dict[str, Any]


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_lone_surrogates(cls, value: Any) -> Any:
        position = lone_surrogate_position(value)
        if position is not None:
            raise ValueError(f"lone surrogate code point at {position or 'the value'}: text must be valid Unicode")
        return value


class RequestBody(OpenAIBaseModel):
    """A top-level request body: unknown fields are kept in `model_extra`, to be logged and ignored."""

    model_config = ConfigDict(extra="allow")


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class SamplingRequest(RequestBody):
    """Fields shared by completions and chat completions."""

    model: str | None = None  # None: the served model
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: LogitBias | None = None
    # vLLM's extra sampling fields.
    top_k: int = Field(0, ge=-1, le=INT64_MAX)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # per prompt position, non-streaming only
    # Accepted: they never change what is generated.
    user: str | None = None
    length_penalty: float = 1.0  # beam search only, which is refused
    guided_decoding_backend: str | None = None  # this server has one backend (llguidance)
    # Structured output, in three dialects (structured_outputs.py).
    response_format: JSONObject | None = None
    structured_outputs: JSONObject | None = None
    guided_json: str | JSONObject | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # Refused unless harmless (unsupported.py).
    best_of: int | None = Field(None, ge=1)
    guided_whitespace_pattern: str | None = None
    use_beam_search: bool = False
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    structural_tag: str | None = None
    logits_processors: list[Any] | None = None
    return_tokens_as_token_ids: bool = False
    return_token_ids: bool | None = None
    # Scheduling and prefix-cache isolation (serving_engine.py).
    priority: int = Field(0, ge=INT64_MIN, le=INT64_MAX)  # lower runs first, under --scheduling-policy priority
    cache_salt: str | None = Field(None, min_length=1)  # prefixes are shared only between equal salts

    @property
    def include_usage_in_stream(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def to_sampling_params(self, max_tokens: int, num_logprobs: int | None,
                           num_prompt_logprobs: int | None) -> SamplingParams:
        """Raises ValueError (from SamplingParams) on combinations the field checks cannot see."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            logprobs=num_logprobs,
            prompt_logprobs=num_prompt_logprobs,
            logit_bias=self.logit_bias or None,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
            structured_outputs=structured_outputs_of({name: getattr(self, name) for name in SOURCE_FIELDS}),
        )


# A prompt is text or token ids; /v1/completions also takes a batch of either.
TokenId = Annotated[int, Field(ge=0)]
Prompt = str | list[TokenId]
PromptBatch = str | list[TokenId] | list[str] | list[list[TokenId]]


class CompletionRequest(SamplingRequest):
    prompt: PromptBatch
    max_tokens: int | None = Field(16, ge=0)  # 0 only with echo
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False  # the prompt before the completion (prompt_echo.py)
    # Refused unless harmless (unsupported.py).
    suffix: str | None = None
    add_special_tokens: bool = True
    prompt_embeds: str | list[str] | None = None

    def prompts(self) -> list[Prompt]:
        """The batch as a list of prompts (a flat list of ints is one token-id prompt)."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]


class ImageURL(OpenAIBaseModel):
    url: str  # a data: URI; this server fetches nothing
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(OpenAIBaseModel):
    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[JSONObject] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # the call a tool message answers

    def to_template_message(self) -> dict[str, Any]:
        """The message as the chat template expects it: text parts joined into a string; with images, a list
        of text and `image_url` parts (`pagoda.engine.prompt_inputs.split_chat_images` takes it from there)."""
        content: Any = self.content
        if isinstance(content, list):
            unsupported = sorted({part.type for part in content if part.type not in ("text", "image_url")})
            if unsupported:
                raise ValueError(f"content parts of type {unsupported} are not supported (text and image_url are)")
            if any(part.type == "image_url" for part in content):
                content = [_template_part(part) for part in content]
            else:
                content = "".join(part.text or "" for part in content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        for field in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, field) is not None:
                message[field] = getattr(self, field)
        return message


def _template_part(part: ContentPart) -> dict[str, Any]:
    if part.type == "text":
        return {"type": "text", "text": part.text or ""}
    if part.image_url is None:
        raise ValueError("an image_url content part needs image_url: {\"url\": \"data:image/...;base64,...\"}")
    return {"type": "image_url", "image_url": {"url": part.image_url.url}}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI for max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    echo: bool = False  # vLLM's: an answer continuing an assistant's last message starts with that message
    # Tool calling where a grammar drives it (tool_calls.py).
    tools: list[JSONObject] | None = None
    tool_choice: str | JSONObject | None = None
    parallel_tool_calls: bool | None = None
    # Accepted: they never change what is generated (a prediction only speeds up an answer that stays the same).
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prediction: JSONObject | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Refused unless harmless (unsupported.py).
    functions: list[JSONObject] | None = None
    function_call: str | JSONObject | None = None
    audio: JSONObject | None = None
    modalities: list[str] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: JSONObject | None = None
    continue_final_message: bool = False
    add_special_tokens: bool = False
    documents: list[JSONObject] | None = None
    chat_template: str | None = None
    chat_template_kwargs: JSONObject | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(RequestBody):
    """Either `prompt` (text) or `messages` (rendered by the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]
