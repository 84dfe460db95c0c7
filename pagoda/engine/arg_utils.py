"""Engine layer: `EngineArgs` — the user's flat options, turned once into the frozen config tree.

Names follow vLLM's flags (`max_model_len`, `block_size`, ...). The model is
resolved (and a GGUF converted) here, and the facts only the model folder
knows — max length, vocabulary, end-of-sequence ids — are read from its
config.json (its `text_config` when a multimodal config nests the decoder),
and its content identity (what KV store keys name) is computed once.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagoda.config import (
    EC_ROLES,
    CacheConfig,
    ECTransferConfig,
    KVTransferConfig,
    ModelConfig,
    MultiModalConfig,
    PagodaConfig,
    ParallelConfig,
    SchedulerConfig,
)
from pagoda.engine.auto_dtype import resolve_dtype
from pagoda.kv_store_spec import parse_kv_store_spec
from pagoda.models.hf_config import check_tensor_parallel_size, mm_info, text_config
from pagoda.models.pipeline_stages import check_pipeline_parallel
from pagoda.models.identity import model_identity
from pagoda.models.resolve import resolve_model

# Where `LLM` runs EngineCore: in this process, or in its own. AsyncLLM always uses its own.
ENGINE_MODES = ("inproc", "mp")


@dataclass
class EngineArgs:
    model: str = "gemma3-270m"
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    block_size: int = 16
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: str = "sha256"
    kv_cache_memory: int | None = None
    kv_cache_memory_fraction: float = 0.2
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "fcfs"
    engine_mode: str = "inproc"
    quantization: str | None = None
    # The tiered KV store, e.g. "cpu:4GiB,disk:/var/cache/pagoda-kv:20GiB"; None: no store.
    kv_store: str | None = None
    kv_store_chunk_size: int = 256
    kv_store_load_mode: str = "layerwise"
    # Image models (as vLLM names them): processor options for every image, e.g. {"do_pan_and_scan": True};
    # the most items per prompt, e.g. {"image": 2}; the processor cache's size; the encoder cache's size and
    # per-step budget in encoder output rows (None: see SchedulerConfig).
    mm_processor_kwargs: dict[str, Any] | None = None
    limit_mm_per_prompt: dict[str, int] | None = None
    mm_processor_cache_gb: float = 4.0
    # Worker ranks (tensor parallelism) and where they run: "uni" (in the engine's process) or "mp".
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    # Engine cores behind this front end, each with its own scheduler and KV cache (a process each).
    data_parallel_size: int = 1
    # Stages the decoder's layers are split into (pipeline parallelism), each of tensor_parallel_size ranks.
    pipeline_parallel_size: int = 1
    encoder_cache_size: int | None = None
    max_num_encoder_input_tokens: int | None = None
    # The encoder-cache store for image encoder outputs (same tier syntax), e.g. "disk:/var/cache/pagoda-ec:20GiB",
    # and its role: "ec_producer", "ec_consumer" or "ec_both". None: no store.
    ec_store: str | None = None
    ec_role: str | None = None

    def __post_init__(self) -> None:
        if self.engine_mode not in ENGINE_MODES:
            raise ValueError(f"engine_mode must be one of {ENGINE_MODES}, got {self.engine_mode!r}")
        ec_transfer_config(self.ec_store, self.ec_role)  # a mistake is named before the model is resolved

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(model=model, **kwargs)

    def create_config(self) -> PagodaConfig:
        path = resolve_model(self.model)
        hf_config = json.loads((Path(path) / "config.json").read_text())
        decoder_config = text_config(hf_config)
        model_max = int(decoder_config.get("max_position_embeddings", 2048))
        max_model_len = model_max if self.max_model_len is None else self.max_model_len
        if max_model_len > model_max:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's maximum of {model_max}")
        eos = decoder_config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        image_info = mm_info(hf_config)
        check_tensor_parallel_size(hf_config, self.tensor_parallel_size)
        if self.pipeline_parallel_size > 1:
            check_pipeline_parallel(decoder_config, self.pipeline_parallel_size, image_info is not None,
                                    self.kv_store, self.ec_store)
        model_config = ModelConfig(
            model=self.model,
            path=str(path),
            architecture=(hf_config.get("architectures") or ["unknown"])[0],
            dtype=resolve_dtype(self.dtype),
            max_model_len=max_model_len,
            vocab_size=int(decoder_config["vocab_size"]),
            eos_token_ids=eos_ids,
            identity=model_identity(Path(path), self.quantization),
            seed=self.seed,
            quantization=self.quantization,
            mm_tokens_per_image=None if image_info is None else image_info.mm_tokens_per_image,
        )
        cache_config = CacheConfig(
            block_size=self.block_size,
            enable_prefix_caching=self.enable_prefix_caching,
            prefix_caching_hash_algo=self.prefix_caching_hash_algo,
            kv_cache_memory=self.kv_cache_memory,
            kv_cache_memory_fraction=self.kv_cache_memory_fraction,
        )
        scheduler_config = SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=max_model_len,
            enable_chunked_prefill=self.enable_chunked_prefill,
            policy=self.scheduling_policy,
            encoder_cache_size=self.encoder_cache_size,
            max_num_encoder_input_tokens=self.max_num_encoder_input_tokens,
        )
        kv_transfer_config = None
        if self.kv_store is not None:
            kv_transfer_config = KVTransferConfig(parse_kv_store_spec(self.kv_store), self.kv_store_chunk_size,
                                                  self.kv_store_load_mode)
        return PagodaConfig(model_config, cache_config, scheduler_config, kv_transfer_config,
                            mm_config=self._mm_config(),
                            ec_transfer_config=ec_transfer_config(self.ec_store, self.ec_role),
                            parallel_config=ParallelConfig(self.tensor_parallel_size,
                                                           self.distributed_executor_backend,
                                                           self.data_parallel_size,
                                                           self.pipeline_parallel_size))

    def _mm_config(self) -> MultiModalConfig:
        limits = dict(self.limit_mm_per_prompt or {})
        unknown = sorted(set(limits) - {"image"})
        if unknown:
            raise ValueError(f"limit_mm_per_prompt: only 'image' is supported, got {unknown}")
        if self.mm_processor_cache_gb < 0:
            raise ValueError(f"mm_processor_cache_gb must be non-negative, got {self.mm_processor_cache_gb}")
        return MultiModalConfig(mm_processor_kwargs=dict(self.mm_processor_kwargs or {}),
                                limit_images_per_prompt=limits.get("image"),
                                processor_cache_bytes=int(self.mm_processor_cache_gb * 2**30))


def ec_transfer_config(ec_store: str | None, ec_role: str | None) -> ECTransferConfig | None:
    """The encoder-cache store the `ec_store` / `ec_role` pair describes; None when neither is given."""
    if ec_store is None and ec_role is None:
        return None
    if ec_store is None:
        raise ValueError(f"ec_role={ec_role!r} needs an encoder-cache store: set ec_store (--ec-store), "
                         f"e.g. disk:/var/cache/pagoda-ec:20GiB")
    if ec_role is None:
        raise ValueError(f"ec_store={ec_store!r} needs ec_role (--ec-role), one of {EC_ROLES}")
    return ECTransferConfig(parse_kv_store_spec(ec_store, flag="--ec-store"), ec_role)
