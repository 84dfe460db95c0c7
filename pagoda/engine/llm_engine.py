"""Engine layer: `LLMEngine` — input processing, the core client and output processing in one loop.

Adding a request is two-phase: `prepare_request` validates and tokenizes
without touching the engine (so a batch with one bad prompt adds nothing),
and `submit` hands the prepared request to the core.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagoda.config import PagodaConfig
from pagoda.engine.core_client import EngineCoreClient, make_client
from pagoda.engine.input_processor import InputProcessor, make_input_processor
from pagoda.engine.prompt_inputs import ProcessedPrompt, PromptType, cache_salt_of
from pagoda.engine.messages import EngineCoreRequest, SchedulerStatsMessage
from pagoda.engine.output_processor import OutputProcessor, ParentRequest
from pagoda.engine.tokenizer import load_tokenizer_in_background
from pagoda.outputs import RequestMetrics, RequestOutput
from pagoda.sampling_params import SamplingParams


@dataclass
class PreparedRequest:
    parent: ParentRequest
    children: list[EngineCoreRequest]


def prepare_request(
    input_processor: InputProcessor,
    request_id: str,
    prompt: PromptType | ProcessedPrompt,
    params: SamplingParams,
    priority: int = 0,
    cache_salt: str | None = None,
    add_special_tokens: bool = True,
) -> PreparedRequest:
    """Validate and tokenize one user request and fan it out into its `n` core requests."""
    cache_salt = cache_salt_of(prompt, cache_salt)
    processed = input_processor.process_prompt(prompt, add_special_tokens)
    token_ids = processed.token_ids
    first = input_processor.process(request_id, token_ids, params, priority=priority, cache_salt=cache_salt,
                                    mm_features=processed.mm_features)
    parent = ParentRequest(
        request_id=request_id,
        prompt=processed.text,
        prompt_token_ids=token_ids,
        n=params.n,
        output_kind=params.output_kind,
        metrics=RequestMetrics(arrival_time=first.arrival_time, num_prompt_tokens=len(token_ids)),
    )
    children = []
    for index in range(params.n):
        # Each of the n sequences samples on its own; seeded ones get distinct seeds.
        seed = None if params.seed is None else params.seed + index
        child_params = first.sampling_params.clone(n=1, seed=seed)
        children.append(
            EngineCoreRequest(
                request_id=parent.child_id(index),
                prompt_token_ids=token_ids,
                sampling_params=child_params,
                eos_token_id=first.eos_token_id,
                arrival_time=first.arrival_time,
                priority=priority,
                cache_salt=cache_salt,
                mm_features=processed.mm_features,
            )
        )
    return PreparedRequest(parent, children)


class LLMEngine:
    def __init__(self, config: PagodaConfig, engine_mode: str = "inproc") -> None:
        self.config = config
        tokenizer = load_tokenizer_in_background(config.model_config.path)
        self.engine_core: EngineCoreClient = make_client(config, engine_mode)
        self.tokenizer = tokenizer.result()
        self.input_processor = make_input_processor(config, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer.backend_tokenizer)
        self.scheduler_stats: SchedulerStatsMessage | None = None

    def prepare_request(
        self,
        request_id: str,
        prompt: PromptType | ProcessedPrompt,
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
        add_special_tokens: bool = True,
    ) -> PreparedRequest:
        prepared = prepare_request(
            self.input_processor, request_id, prompt, params, priority, cache_salt, add_special_tokens
        )
        self.output_processor.check_request_ids(request_id, [child.request_id for child in prepared.children])
        return prepared

    def submit(self, prepared: PreparedRequest) -> None:
        for index, child in enumerate(prepared.children):
            self.output_processor.add_request(prepared.parent, index, child)
            self.engine_core.add_request(child)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams, **kwargs: object) -> None:
        self.submit(self.prepare_request(request_id, prompt, params, **kwargs))  # type: ignore[arg-type]

    def abort_request(self, request_ids: list[str]) -> None:
        self.engine_core.abort_requests(self.output_processor.abort_requests(request_ids))

    def step(self) -> list[RequestOutput]:
        outputs = self.engine_core.get_output()
        request_outputs, to_abort = self.output_processor.process_outputs(outputs.outputs)
        self.engine_core.abort_requests(to_abort)
        if outputs.scheduler_stats is not None:
            self.scheduler_stats = outputs.scheduler_stats
        return request_outputs

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def reset_prefix_cache(self) -> bool:
        return self.engine_core.reset_prefix_cache()

    def flush_kv_store(self) -> bool:
        return self.engine_core.flush_kv_store()

    def reset_mm_cache(self) -> bool:
        """Forget preprocessed images on both sides (the front end's processor cache, the engine's pixels)."""
        if self.input_processor.mm_processor is not None:
            self.input_processor.mm_processor.cache.clear()
        return self.engine_core.reset_mm_cache()

    def front_end_mm_metrics(self) -> dict[str, dict[str, float]]:
        """Counters of the front end's image caches: the processor cache, and the pixel mirror's resends."""
        processor = self.input_processor.mm_processor
        if processor is None:
            return {}
        stats = processor.cache.stats
        metrics = {"processor_cache": {"hits": float(stats.hits), "misses": float(stats.misses),
                                       "evictions": float(stats.evictions), "bytes": float(stats.num_bytes)}}
        resends = getattr(self.engine_core, "num_mm_resends", None)
        if resends is not None:
            metrics["pixel_mirror"] = {"resends": float(resends)}
        return metrics

    def shutdown(self) -> None:
        self.engine_core.shutdown()
