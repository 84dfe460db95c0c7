"""Entrypoints layer: the engine's command-line flags, grouped as vLLM groups them, each with help and default.

`add_engine_flags` puts the flags of `EngineArgs` on a parser in groups
(model, cache, scheduler, KV store, parallel, images); `engine_kwargs` reads
them back as `EngineArgs` keywords. `HelpFormatter` shows every flag's
default: the value, "off" for a switch, or the words of the help when the
default depends on the model (those say "default:" themselves). Sizes take
units (`--kv-cache-memory 2GiB`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from pagoda.kv_store_spec import parse_size


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: ...)" to each option's help unless the help states its default itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: {'on' if action.default else 'off'})"
        if isinstance(action, argparse.BooleanOptionalAction):
            return f"{text} (default: {'on' if action.default else 'off'})"
        return f"{text} (default: %(default)s)"


def size(text: str) -> int:
    """A byte count with an optional unit, for argparse."""
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def add_engine_flags(parser: argparse.ArgumentParser, model_flag: bool = False) -> None:
    """The engine's flags in groups; the model is a positional argument, or `--model` (`model_flag`) as in
    vLLM's benchmarks."""
    from pagoda.config import EC_ROLES
    from pagoda.engine.arg_utils import EngineArgs

    defaults = EngineArgs()
    model = parser.add_argument_group("model")
    model.add_argument(*(["--model"] if model_flag else ["model"]), **({} if model_flag else {"nargs": "?"}),
                       default=defaults.model,
                       help="alias (gemma3-270m, smollm2-135m), Hugging Face folder, or .gguf file "
                            f"(default: {defaults.model})")
    model.add_argument("--dtype", default=defaults.dtype, choices=["auto", "bfloat16", "float16", "float32"],
                       help="weights and activations; auto is bfloat16 where the CPU has a bfloat16 dot product "
                            "(and on GPUs), else float32")
    model.add_argument("--max-model-len", type=int, default=None,
                       help="longest prompt plus completion, in tokens (default: the model's own maximum)")
    model.add_argument("--seed", type=int, default=defaults.seed, help="seed for requests that give none")
    model.add_argument("--quantization", choices=["int8"], default=None,
                       help="weight-only int8 quantization of the linear layers, opt-in (default: none)")

    cache = parser.add_argument_group("KV cache")
    cache.add_argument("--block-size", type=int, default=defaults.block_size, help="tokens per KV-cache block")
    cache.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=defaults.enable_prefix_caching,
                       help="share the KV blocks of common prompt prefixes between requests")
    cache.add_argument("--prefix-caching-hash-algo", default=defaults.prefix_caching_hash_algo,
                       choices=["sha256", "xxhash"], help="hash naming each block's prefix")
    cache.add_argument("--kv-cache-memory", type=size, default=None, metavar="SIZE",
                       help="memory for KV blocks, e.g. 2GiB or 512MiB (default: "
                            f"{defaults.kv_cache_memory_fraction * 100:.0f}%% of the free memory at start-up, capped)")

    scheduler = parser.add_argument_group("scheduler")
    scheduler.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs,
                           help="most requests in one batch")
    scheduler.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens,
                           help="most tokens one step computes (prompt chunks and decodes together)")
    scheduler.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                           default=defaults.enable_chunked_prefill,
                           help="split long prompts across steps, so running requests keep decoding")
    scheduler.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default=defaults.scheduling_policy,
                           help="waiting requests in arrival order, or by each request's priority (lower first)")

    store = parser.add_argument_group("KV store")
    store.add_argument("--kv-store", default=None, metavar="TIERS",
                       help="tiered KV store, fastest first, e.g. "
                            "cpu:4GiB,disk:/var/cache/pagoda-kv:20GiB,redis://127.0.0.1:6379/0 (see README; "
                            "default: none)")
    store.add_argument("--kv-store-chunk-size", type=int, default=defaults.kv_store_chunk_size,
                       help="tokens per stored chunk (a multiple of --block-size)")
    store.add_argument("--kv-store-load-mode", choices=["layerwise", "bulk", "async"],
                       default=defaults.kv_store_load_mode,
                       help="layerwise overlaps loading with compute, bulk loads before the step, async loads "
                            "while other requests run")

    parallel = parser.add_argument_group("parallel")
    parallel.add_argument("--tensor-parallel-size", "-tp", type=int, default=defaults.tensor_parallel_size,
                          help="ranks splitting the model (gloo on CPU, NCCL on CUDA)")
    parallel.add_argument("--pipeline-parallel-size", "-pp", type=int, default=defaults.pipeline_parallel_size,
                          help="stages splitting the model's layers, each of --tensor-parallel-size ranks; the "
                               "engine keeps as many batches in flight")
    parallel.add_argument("--data-parallel-size", "-dp", type=int, default=defaults.data_parallel_size,
                          help="engine cores (processes, each with its own scheduler and KV cache) behind one "
                               "front end")
    parallel.add_argument("--distributed-executor-backend", choices=["uni", "mp", "ray"], default=None,
                          help="where the ranks run: uni (in the engine process), mp (local worker processes), "
                               "ray (Ray actors, also on other nodes); default: mp with more than one rank, "
                               "else uni")

    images = parser.add_argument_group("images (Gemma 3 vision)")
    images.add_argument("--mm-processor-kwargs", type=json_object, default=None, metavar="JSON",
                        help='image processor options for every image, e.g. \'{"do_pan_and_scan": true}\' '
                             "(default: none)")
    images.add_argument("--limit-mm-per-prompt", type=json_object, default=None, metavar="JSON",
                        help='most images per prompt, e.g. \'{"image": 2}\' (default: no limit beyond the '
                             "context)")
    images.add_argument("--mm-processor-cache-gb", type=float, default=defaults.mm_processor_cache_gb,
                        help="processor cache for preprocessed images, in GB (0 turns it off)")
    images.add_argument("--encoder-cache-size", type=int, default=None,
                        help="encoder output rows the encoder cache holds (default: max(8192, batched tokens))")
    images.add_argument("--max-num-encoder-input-tokens", type=int, default=None,
                        help="encoder output rows one step may compute (default: --max-num-batched-tokens)")
    images.add_argument("--ec-store", default=None, metavar="TIERS",
                        help="store for image encoder outputs, same tier syntax as --kv-store, e.g. "
                             "disk:/var/cache/pagoda-ec:20GiB,redis://127.0.0.1:6379/0 (needs --ec-role; "
                             "default: none)")
    images.add_argument("--ec-role", choices=list(EC_ROLES), default=None,
                        help="ec_producer saves encoder outputs, ec_consumer loads them instead of encoding, "
                             "ec_both does both (default: none)")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `EngineArgs` keywords the parsed flags set (every field but the model)."""
    from pagoda.engine.arg_utils import EngineArgs

    names = {f.name for f in dataclasses.fields(EngineArgs)} - {"model"}
    return {name: getattr(args, name) for name in names if hasattr(args, name)}
