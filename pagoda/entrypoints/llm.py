"""Entrypoints layer: `LLM`, the offline batch API (named and shaped like vLLM's).

    from pagoda import LLM, SamplingParams
    llm = LLM(model="gemma3-270m")
    outputs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16))
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Union

import msgspec
from tqdm.auto import tqdm

from pagoda.engine.arg_utils import EngineArgs
from pagoda.engine.llm_engine import LLMEngine, PreparedRequest
from pagoda.engine.prompt_inputs import PromptType, split_chat_images
from pagoda.engine.tokenizer import ChatMessage, render_chat
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import RequestOutputKind, SamplingParams

Prompts = Union[PromptType, Sequence[PromptType]]


def _as_prompt_list(prompts: Prompts) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
        return [list(prompts)]  # type: ignore[arg-type]
    if isinstance(prompts, Sequence):
        return list(prompts)  # type: ignore[arg-type]
    raise ValueError(f"prompts must be a string, a list of token ids, or a list of either; got {type(prompts).__name__}")


class LLM:
    """`generate` and `chat` run batches to completion.

    The engine runs in this process, or with `engine_mode="mp"` in a process of its own.
    """

    def __init__(self, model: str = "gemma3-270m", **kwargs: Any) -> None:
        self.engine_args = EngineArgs.from_kwargs(model, **kwargs)
        self.config = self.engine_args.create_config()
        self.llm_engine = LLMEngine(self.config, self.engine_args.engine_mode)
        self._request_counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: Prompts,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order."""
        prompt_list = _as_prompt_list(prompts)
        return self._run(prompt_list, sampling_params, use_tqdm, priority, add_special_tokens=True)

    def chat(
        self,
        messages: list[ChatMessage] | list[list[ChatMessage]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, by the model's chat template.

        Content may be a string or OpenAI-style parts: text, and images as
        `{"type": "image_url", "image_url": {"url": "data:..."}}` or
        `{"type": "image", "image": PIL image, path or bytes}`.
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.llm_engine.tokenizer
        prompts: list[PromptType] = []
        for conversation in conversations:
            conversation, images = split_chat_images(conversation)
            text = render_chat(tokenizer, conversation, add_generation_prompt, chat_template)
            prompts.append({"prompt": text, "multi_modal_data": {"image": images}} if images else text)
        # The template already places BOS and other special tokens.
        return self._run(prompts, sampling_params, use_tqdm, None, add_special_tokens=False)

    def _run(
        self,
        prompts: list[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool,
        priority: Sequence[int] | None,
        add_special_tokens: bool,
    ) -> list[RequestOutput]:
        params_list = self._params_per_prompt(sampling_params, len(prompts))
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"priority has {len(priority)} entries for {len(prompts)} prompts")
        # Validate everything before submitting anything: a bad prompt leaves the engine untouched.
        prepared: list[PreparedRequest] = []
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            params = msgspec.structs.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
            prepared.append(
                self.llm_engine.prepare_request(
                    str(next(self._request_counter)), prompt, params,
                    priority=0 if priority is None else priority[i], add_special_tokens=add_special_tokens,
                )
            )
        for request in prepared:
            self.llm_engine.submit(request)
        return self._run_engine([request.parent.request_id for request in prepared], use_tqdm)

    @staticmethod
    def _params_per_prompt(
        sampling_params: SamplingParams | Sequence[SamplingParams] | None, num_prompts: int
    ) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * num_prompts
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        if len(sampling_params) != num_prompts:
            raise ValueError(f"got {len(sampling_params)} sampling_params for {num_prompts} prompts")
        return list(sampling_params)

    def _run_engine(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm) as progress:
            try:
                while self.llm_engine.has_unfinished_requests():
                    for output in self.llm_engine.step():
                        if output.finished:
                            finished[output.request_id] = output
                            progress.update(1)
            except BaseException:
                self.llm_engine.abort_request([r for r in request_ids if r not in finished])
                raise
        return [finished[request_id] for request_id in request_ids]

    def reset_prefix_cache(self) -> bool:
        return self.llm_engine.reset_prefix_cache()

    def flush_kv_store(self) -> bool:
        """Wait until every KV save so far reached all tiers of the KV store (e.g. before another
        engine reads them); False when the engine has no store."""
        return self.llm_engine.flush_kv_store()

    def reset_mm_cache(self) -> bool:
        """Forget preprocessed images (the processor caches of the front end and the engine)."""
        return self.llm_engine.reset_mm_cache()

    def shutdown(self) -> None:
        """Release the engine (and stop its process in "mp" mode)."""
        self.llm_engine.shutdown()

    def get_metrics(self) -> dict[str, float]:
        """The engine's gauges and counters now (not as of the last step: a flush or a store's background
        writes may have counted more since)."""
        stats = self.llm_engine.engine_core.get_stats()
        metrics = {field: float(getattr(stats, field)) for field in stats.__struct_fields__
                   if field not in ("kv_store", "multimodal")}
        for tier, counters in (stats.kv_store or {}).items():
            for name, value in counters.items():
                metrics[f"kv_store.{tier}.{name}"] = value
        per_engine = getattr(self.llm_engine.engine_core, "per_engine_stats", None)
        for index, core_stats in enumerate(per_engine() if per_engine is not None else ()):
            for field in () if core_stats is None else core_stats.__struct_fields__:
                value = getattr(core_stats, field)
                if isinstance(value, (int, float)):
                    metrics[f"dp{index}.{field}"] = float(value)
        for group, counters in {**(stats.multimodal or {}), **self.llm_engine.front_end_mm_metrics()}.items():
            for name, value in counters.items():
                metrics[f"mm.{group}.{name}"] = value
        return metrics
