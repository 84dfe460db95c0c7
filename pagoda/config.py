"""Shared contract: the frozen configuration tree, built once at the entrypoint.

Each component receives only its own sub-config. Validation happens in
`__post_init__` and names the field; facts discovered at run time (the
model's max length, the number of KV blocks) produce a new config through
`dataclasses.replace`, never by mutation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pagoda.kv_store_spec import KVStoreConfig

DType = Literal["auto", "bfloat16", "float16", "float32"]
_DTYPES = ("auto", "bfloat16", "float16", "float32")
_HASH_ALGOS = ("sha256", "xxhash")
_QUANTIZATIONS = (None, "int8")
KV_LOAD_MODES = ("layerwise", "bulk", "async")
# Which directions an encoder-cache store is used in: saves after encoding, loads instead of encoding, or both.
EC_ROLES = ("ec_producer", "ec_consumer", "ec_both")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelConfig:
    """The model to run: a resolved folder with config.json, weights and tokenizer."""

    model: str  # what the user asked for (alias, folder or .gguf path)
    path: str  # the resolved Hugging Face-style folder
    architecture: str
    dtype: str  # resolved torch dtype name
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    # The weights by content (`pagoda.models.identity`): how KV store keys name the model.
    identity: str
    seed: int = 0
    # Image models: soft tokens per image crop (one run of bidirectional attention); None for text-only models.
    mm_tokens_per_image: int | None = None
    # Weight-only quantization of the linear layers: None (the dtype above) or "int8".
    quantization: str | None = None

    def __post_init__(self) -> None:
        _require(self.dtype in _DTYPES[1:], f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        _require(self.quantization in _QUANTIZATIONS,
                 f"quantization must be one of {_QUANTIZATIONS}, got {self.quantization!r}")
        _require(self.max_model_len >= 1, f"max_model_len must be positive, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = 16
    enable_prefix_caching: bool = True
    prefix_caching_hash_algo: str = "sha256"
    # Bytes for KV blocks; None: `kv_cache_memory_fraction` of free memory, capped.
    kv_cache_memory: int | None = None
    kv_cache_memory_fraction: float = 0.2

    def __post_init__(self) -> None:
        _require(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128, 256),
                 f"block_size must be a power of two up to 256, got {self.block_size}")
        _require(self.prefix_caching_hash_algo in _HASH_ALGOS,
                 f"prefix_caching_hash_algo must be one of {_HASH_ALGOS}, got {self.prefix_caching_hash_algo!r}")
        _require(self.kv_cache_memory is None or self.kv_cache_memory > 0,
                 f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        _require(0.0 < self.kv_cache_memory_fraction <= 0.95,
                 f"kv_cache_memory_fraction must be in (0, 0.95], got {self.kv_cache_memory_fraction}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Batch limits for one engine step."""

    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # "fcfs" or "priority"
    # Image models: encoder output rows the encoder cache holds (None: max(8192, max_num_batched_tokens),
    # some thirty single-crop Gemma 3 images), and rows the encoder may produce per step (None: max_num_batched_tokens).
    encoder_cache_size: int | None = None
    max_num_encoder_input_tokens: int | None = None

    def __post_init__(self) -> None:
        _require(self.max_num_seqs >= 1, f"max_num_seqs must be positive, got {self.max_num_seqs}")
        _require(self.max_num_batched_tokens >= 1,
                 f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        _require(self.policy in ("fcfs", "priority"), f"policy must be 'fcfs' or 'priority', got {self.policy!r}")
        _require(self.enable_chunked_prefill or self.max_num_batched_tokens >= self.max_model_len,
                 "max_num_batched_tokens must be at least max_model_len when chunked prefill is disabled")
        for name in ("encoder_cache_size", "max_num_encoder_input_tokens"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"{name} must be positive, got {value}")

    @property
    def encoder_cache_rows(self) -> int:
        return self.encoder_cache_size or max(8192, self.max_num_batched_tokens)

    @property
    def encoder_compute_budget(self) -> int:
        return self.max_num_encoder_input_tokens or self.max_num_batched_tokens


@dataclass(frozen=True)
class KVTransferConfig:
    """The tiered KV store behind the KV connector.

    `kv_store` is the tier list, parsed once (`pagoda.kv_store_spec`). In the
    layerwise and bulk load modes a hit is loaded inside the step that
    computes the rest of the prompt (layer by layer, overlapping the forward
    pass, or all layers before it); in async mode the request waits in
    WAITING_FOR_REMOTE_KVS while its KV loads and other requests keep running.
    """

    kv_store: KVStoreConfig
    chunk_size: int = 256
    load_mode: str = "layerwise"
    # Where the scheduler side reaches the store's index (ZMQ); EngineCore picks a private ipc path.
    lookup_address: str | None = None

    def __post_init__(self) -> None:
        _require(isinstance(self.kv_store, KVStoreConfig),
                 f"kv_store must be a parsed KVStoreConfig (pagoda.kv_store_spec.parse_kv_store_spec), "
                 f"got {type(self.kv_store).__name__}")
        _require(self.chunk_size > 0, f"kv_store_chunk_size must be positive, got {self.chunk_size}")
        _require(self.load_mode in KV_LOAD_MODES,
                 f"kv_store_load_mode must be one of {KV_LOAD_MODES}, got {self.load_mode!r}")


EXECUTOR_BACKENDS = ("uni", "mp", "ray")


@dataclass(frozen=True)
class ParallelConfig:
    """How many worker ranks run the model, and in which processes.

    `distributed_executor_backend`: "uni" runs the one worker in the engine's
    process; "mp" runs each rank in a worker process of its own, fed through a
    shared-memory broadcast queue. None: "mp" when there is more than one
    rank, "uni" otherwise.

    Ranks: `pipeline_parallel_size` stages of `tensor_parallel_size` ranks
    each; global rank = stage * tensor_parallel_size + tensor-parallel rank.
    """

    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    # Engine cores (each a process with its own scheduler, KV cache and ranks) behind one front end.
    data_parallel_size: int = 1
    # Stages the decoder's layers are split into, one after another (each stage a group of ranks).
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        _require(self.tensor_parallel_size >= 1,
                 f"tensor_parallel_size must be positive, got {self.tensor_parallel_size}")
        _require(self.pipeline_parallel_size >= 1,
                 f"pipeline_parallel_size must be positive, got {self.pipeline_parallel_size}")
        _require(self.data_parallel_size >= 1, f"data_parallel_size must be positive, got {self.data_parallel_size}")
        _require(self.distributed_executor_backend in (None, *EXECUTOR_BACKENDS),
                 f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS}, "
                 f"got {self.distributed_executor_backend!r}")
        _require(not (self.distributed_executor_backend == "uni" and self.world_size > 1),
                 f"distributed_executor_backend 'uni' runs one rank; {self.world_size} need 'mp' or 'ray'")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def last_stage_rank(self) -> int:
        """The global rank that answers a step: the last stage's first tensor-parallel rank (it samples)."""
        return (self.pipeline_parallel_size - 1) * self.tensor_parallel_size

    @property
    def threads_per_rank(self) -> int:
        """This machine's cores shared out among every rank of every engine core."""
        return max(1, (os.cpu_count() or 1) // (self.world_size * self.data_parallel_size))

    @property
    def executor_backend(self) -> str:
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "mp" if self.world_size > 1 else "uni"


@dataclass(frozen=True)
class MultiModalConfig:
    """Image inputs of multimodal models (ignored by text-only ones)."""

    # Processor options applied to every image, overridden per prompt (`do_pan_and_scan`, `pan_and_scan_*`).
    mm_processor_kwargs: dict[str, Any] = field(default_factory=dict)
    # Most images one prompt may carry; None: no limit beyond what fits the context.
    limit_images_per_prompt: int | None = None
    # The processor cache's budget (preprocessed pixels, by image hash); 0 turns it off.
    processor_cache_bytes: int = 4 << 30

    def __post_init__(self) -> None:
        _require(isinstance(self.mm_processor_kwargs, dict),
                 f"mm_processor_kwargs must be a dict, got {type(self.mm_processor_kwargs).__name__}")
        _require(self.limit_images_per_prompt is None or self.limit_images_per_prompt >= 0,
                 f"limit_mm_per_prompt['image'] must be non-negative, got {self.limit_images_per_prompt}")
        _require(self.processor_cache_bytes >= 0,
                 f"mm_processor_cache_gb must be non-negative, got {self.processor_cache_bytes / 2**30:g}")


@dataclass(frozen=True)
class ECTransferConfig:
    """The encoder-cache store behind the EC connector: encoder outputs of images that outlive the engine.

    `ec_store` uses the `--kv-store` tier syntax (`pagoda.kv_store_spec`),
    parsed once. A producer saves what the encoder computes, a consumer loads
    what the store holds instead of running the encoder, `ec_both` does both.
    """

    ec_store: KVStoreConfig
    ec_role: str
    # Where the scheduler side reaches the store's index (ZMQ); EngineCore picks a private ipc path.
    lookup_address: str | None = None

    def __post_init__(self) -> None:
        _require(isinstance(self.ec_store, KVStoreConfig),
                 f"ec_store must be a parsed KVStoreConfig (pagoda.kv_store_spec.parse_kv_store_spec), "
                 f"got {type(self.ec_store).__name__}")
        _require(self.ec_role in EC_ROLES, f"ec_role must be one of {EC_ROLES}, got {self.ec_role!r}")

    @property
    def is_producer(self) -> bool:
        return self.ec_role in ("ec_producer", "ec_both")

    @property
    def is_consumer(self) -> bool:
        return self.ec_role in ("ec_consumer", "ec_both")


def _disk_paths(store: KVStoreConfig) -> set[Path]:
    return {Path(tier.path).expanduser().resolve() for tier in store.tiers if tier.path is not None}


@dataclass(frozen=True)
class PagodaConfig:
    """The whole tree, passed to the engine."""

    model_config: ModelConfig
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    kv_transfer_config: KVTransferConfig | None = None
    mm_config: MultiModalConfig = field(default_factory=MultiModalConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    ec_transfer_config: ECTransferConfig | None = None

    def __post_init__(self) -> None:
        if self.kv_transfer_config is not None and self.ec_transfer_config is not None:
            # A disk tier owns its folder: it indexes every file there against its budget and evicts them.
            shared = _disk_paths(self.kv_transfer_config.kv_store) & _disk_paths(self.ec_transfer_config.ec_store)
            _require(not shared, f"--kv-store and --ec-store name the same disk folder {sorted(map(str, shared))}; "
                                 f"give each store a folder of its own")
        if self.kv_transfer_config is not None:
            _require(self.kv_transfer_config.chunk_size % self.cache_config.block_size == 0,
                     f"kv_store_chunk_size ({self.kv_transfer_config.chunk_size}) must be a multiple of "
                     f"block_size ({self.cache_config.block_size})")
        # The input processor checks prompts against the model's limit, the scheduler and worker size by theirs.
        _require(self.model_config.max_model_len == self.scheduler_config.max_model_len,
                 f"ModelConfig.max_model_len ({self.model_config.max_model_len}) differs from "
                 f"SchedulerConfig.max_model_len ({self.scheduler_config.max_model_len})")
