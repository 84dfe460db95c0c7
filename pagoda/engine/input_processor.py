"""Engine layer: turns a user prompt and `SamplingParams` into a validated `EngineCoreRequest`.

Everything a request could get wrong is checked here, before anything is
scheduled, so a bad request fails alone with a `ValueError` naming the field
and the engine goes on serving everyone else.
"""

from __future__ import annotations

import time

from pagoda.config import ModelConfig
from pagoda.engine.messages import EngineCoreRequest
from pagoda.engine.tokenizer import Tokenizer
from pagoda.sampling_params import SamplingParams

# Prompts are either text or token ids.
PromptType = str | list[int]

# As in vLLM: asking for more candidates than this per position is refused.
MAX_LOGPROBS = 20


class InputProcessor:
    def __init__(self, model_config: ModelConfig, tokenizer: Tokenizer) -> None:
        self._model_config = model_config
        self.tokenizer = tokenizer

    def tokenize(self, prompt: PromptType, add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        return list(prompt)

    def process(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> EngineCoreRequest:
        self._validate_prompt(prompt_token_ids)
        params = self._validate_params(params, len(prompt_token_ids))
        eos = self._model_config.eos_token_ids
        return EngineCoreRequest(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            sampling_params=params,
            eos_token_id=eos[0] if eos else None,
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            priority=priority,
            cache_salt=cache_salt,
        )

    def _validate_prompt(self, token_ids: list[int]) -> None:
        max_model_len = self._model_config.max_model_len
        vocab_size = self._model_config.vocab_size
        if not token_ids:
            raise ValueError("prompt is empty")
        if len(token_ids) >= max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens, which leaves no room to generate "
                f"within max_model_len={max_model_len}"
            )
        bad = [t for t in token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})")

    def _validate_params(self, params: SamplingParams, num_prompt_tokens: int) -> SamplingParams:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        vocab_size = self._model_config.vocab_size
        bad = [t for t in params.stop_token_ids if t >= vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids: {bad[0]} is outside the vocabulary [0, {vocab_size})")
        bad = [t for t in params.logit_bias or () if t >= vocab_size]
        if bad:
            raise ValueError(f"logit_bias: {bad[0]} is outside the vocabulary [0, {vocab_size})")
        for field in ("logprobs", "prompt_logprobs"):
            value = getattr(params, field)
            if value is not None and value > MAX_LOGPROBS:
                raise ValueError(f"{field} must be at most {MAX_LOGPROBS}, got {value}")
        # Eos (and any extra end-of-turn ids of the model) end a sequence unless ignored.
        extra_stops = [t for t in self._model_config.eos_token_ids[1:] if t not in params.stop_token_ids]
        room = self._model_config.max_model_len - num_prompt_tokens
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        changes: dict[str, object] = {}
        if max_tokens != params.max_tokens:
            changes["max_tokens"] = max_tokens
        if extra_stops and not params.ignore_eos:
            changes["stop_token_ids"] = params.stop_token_ids + extra_stops
        if changes.get("max_tokens", max_tokens) < params.min_tokens:
            changes["min_tokens"] = max_tokens
        return params.clone(**changes) if changes else params
