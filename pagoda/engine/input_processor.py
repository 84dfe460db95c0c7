"""Engine layer: turns a user prompt and `SamplingParams` into a validated `EngineCoreRequest`.

A prompt with images goes through the model's multimodal processor
(`pagoda.multimodal`): images loaded and checked, preprocessed (or taken
from the processor cache), placeholders expanded into the token ids, one
`MultiModalFeature` per image; each item must fit the encoder cache, or it
could never be scheduled.

Everything a request could get wrong is checked here, before anything is
scheduled, so a bad request fails alone with a `ValueError` naming the field
and the engine goes on serving everyone else.
"""

from __future__ import annotations

import time

from typing import Any

from pagoda.structured_output.grammar import check_structured_outputs
from pagoda.config import ModelConfig, PagodaConfig, SchedulerConfig
from pagoda.core.multimodal import MultiModalFeature
from pagoda.engine.messages import EngineCoreRequest
from pagoda.engine.prompt_inputs import ProcessedPrompt, PromptType, parse_prompt
from pagoda.engine.tokenizer import Tokenizer
from pagoda.sampling_params import SamplingParams

# As in vLLM: asking for more candidates than this per position is refused.
MAX_LOGPROBS = 20


def make_input_processor(config: PagodaConfig, tokenizer: Tokenizer) -> InputProcessor:
    """The input processor for the configured model, with the image processor when the model takes images."""
    mm_processor = None
    if config.model_config.mm_tokens_per_image is not None:
        # Imported only here: PIL and the image code are no concern of text-only models' start-up.
        from pagoda.multimodal.processor import MultiModalProcessor

        mm = config.mm_config
        limit = None if mm.limit_images_per_prompt is None else {"image": mm.limit_images_per_prompt}
        mm_processor = MultiModalProcessor.from_folder(config.model_config.path, tokenizer,
                                                       config.model_config.identity, mm.mm_processor_kwargs,
                                                       limit, cache_bytes=mm.processor_cache_bytes)
    return InputProcessor(config.model_config, tokenizer, config.scheduler_config, mm_processor)


class InputProcessor:
    def __init__(self, model_config: ModelConfig, tokenizer: Tokenizer,
                 scheduler_config: SchedulerConfig | None = None, mm_processor: Any = None) -> None:
        self._model_config = model_config
        self._scheduler_config = scheduler_config or SchedulerConfig(max_model_len=model_config.max_model_len)
        self.tokenizer = tokenizer
        # `pagoda.multimodal`'s processor for image models, None for text-only ones.
        self.mm_processor = mm_processor

    def process_prompt(self, prompt: PromptType | ProcessedPrompt, add_special_tokens: bool = True) -> ProcessedPrompt:
        """Token ids (images expanded) and image items of any prompt shape `parse_prompt` takes."""
        if isinstance(prompt, ProcessedPrompt):
            return prompt
        parsed = parse_prompt(prompt)
        if self.mm_processor is None:
            if parsed.images or parsed.mm_processor_kwargs:
                raise ValueError(f"model {self._model_config.model!r} takes no images "
                                 "(multi_modal_data and mm_processor_kwargs are for image models)")
            return ProcessedPrompt(self.tokenize(parsed.text if parsed.text is not None else parsed.token_ids,
                                                 add_special_tokens), text=parsed.text)
        if parsed.text is None:
            return ProcessedPrompt(self.tokenize(parsed.token_ids, add_special_tokens))
        if not parsed.text:
            raise ValueError("prompt is empty")
        token_ids, features = self.mm_processor.process(parsed.text, parsed.images, parsed.mm_processor_kwargs,
                                                        add_special_tokens=add_special_tokens)
        self._validate_features(features)
        return ProcessedPrompt(token_ids, features or None, text=parsed.text)

    def _validate_features(self, features: list[MultiModalFeature]) -> None:
        cache_rows = self._scheduler_config.encoder_cache_rows
        for index, feature in enumerate(features):
            if feature.num_embeds > cache_rows:
                raise ValueError(f"image {index} needs {feature.num_embeds} encoder output rows, more than the "
                                 f"encoder cache holds (encoder_cache_size={cache_rows})")

    def tokenize(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
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
        mm_features: list[MultiModalFeature] | None = None,
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
            mm_features=mm_features,
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
        if params.structured_outputs is not None:
            check_structured_outputs(params.structured_outputs)
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
