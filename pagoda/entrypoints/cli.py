"""Entrypoints layer: the `pagoda` command (`generate`, `serve`, `bench`, `convert`), flags named like vLLM's."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

from pagoda import envs

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Here is a short story about a lighthouse keeper:",
    "def fibonacci(n):",
    "The three primary colours are",
)


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    from pagoda.config import EC_ROLES
    from pagoda.engine.arg_utils import EngineArgs

    defaults = EngineArgs()
    parser.add_argument("model", nargs="?", default=defaults.model,
                        help="alias (gemma3-270m, smollm2-135m), Hugging Face folder, or .gguf file")
    parser.add_argument("--dtype", default=defaults.dtype, choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--block-size", type=int, default=defaults.block_size)
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=defaults.enable_prefix_caching)
    parser.add_argument("--prefix-caching-hash-algo", default=defaults.prefix_caching_hash_algo,
                        choices=["sha256", "xxhash"])
    parser.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for KV blocks")
    parser.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens)
    parser.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                        default=defaults.enable_chunked_prefill)
    parser.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default=defaults.scheduling_policy,
                        help="waiting requests in arrival order, or by each request's priority (lower first)")
    parser.add_argument("--quantization", choices=["int8"], default=None,
                        help="weight-only quantization of the linear layers (opt-in)")
    parser.add_argument("--kv-store", default=None, metavar="TIERS",
                        help="tiered KV store, fastest first, e.g. "
                             "cpu:4GiB,disk:/var/cache/pagoda-kv:20GiB,redis://127.0.0.1:6379/0 (see README)")
    parser.add_argument("--kv-store-chunk-size", type=int, default=defaults.kv_store_chunk_size,
                        help="tokens per stored chunk (a multiple of --block-size)")
    parser.add_argument("--kv-store-load-mode", choices=["layerwise", "bulk", "async"],
                        default=defaults.kv_store_load_mode)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=defaults.tensor_parallel_size,
                        help="ranks splitting the model (gloo on CPU, NCCL on CUDA)")
    parser.add_argument("--data-parallel-size", "-dp", type=int, default=defaults.data_parallel_size,
                        help="engine cores (processes, each with its own scheduler and KV cache) behind one front end")
    parser.add_argument("--distributed-executor-backend", choices=["uni", "mp", "ray"], default=None,
                        help="where the ranks run: uni (in the engine process), mp (local worker processes), "
                             "ray (Ray actors, also on other nodes); default mp with more than one rank, else uni")
    parser.add_argument("--mm-processor-kwargs", type=_json_object, default=None, metavar="JSON",
                        help='image processor options for every image, e.g. \'{"do_pan_and_scan": true}\'')
    parser.add_argument("--limit-mm-per-prompt", type=_json_object, default=None, metavar="JSON",
                        help='most images per prompt, e.g. \'{"image": 2}\'')
    parser.add_argument("--mm-processor-cache-gb", type=float, default=defaults.mm_processor_cache_gb,
                        help="processor cache for preprocessed images (0 turns it off)")
    parser.add_argument("--encoder-cache-size", type=int, default=None,
                        help="encoder output rows the encoder cache holds (default: max(8192, batched tokens))")
    parser.add_argument("--max-num-encoder-input-tokens", type=int, default=None,
                        help="encoder output rows one step may compute (default: --max-num-batched-tokens)")
    parser.add_argument("--ec-store", default=None, metavar="TIERS",
                        help="store for image encoder outputs, same tier syntax as --kv-store, e.g. "
                             "disk:/var/cache/pagoda-ec:20GiB,redis://127.0.0.1:6379/0 (needs --ec-role)")
    parser.add_argument("--ec-role", choices=list(EC_ROLES), default=None,
                        help="ec_producer saves encoder outputs, ec_consumer loads them instead of encoding, "
                             "ec_both does both")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _engine_kwargs(args: argparse.Namespace) -> dict[str, object]:
    from pagoda.engine.arg_utils import EngineArgs

    names = {f.name for f in dataclasses.fields(EngineArgs)} - {"model"}
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def _generate(args: argparse.Namespace) -> None:
    from pagoda import LLM, SamplingParams

    started = time.monotonic()
    llm = LLM(args.model, **_engine_kwargs(args))
    print(f"engine ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.sampling_seed)
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    started = time.monotonic()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.monotonic() - started
    num_generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    for output in outputs:
        print(f"--- {output.prompt!r}\n{output.outputs[0].text}\n")
    print(f"{len(outputs)} prompts, {num_generated} tokens in {elapsed:.2f} s: "
          f"{num_generated / elapsed:.1f} output tok/s")


def _serve(args: argparse.Namespace) -> None:
    from pagoda.engine.arg_utils import EngineArgs
    from pagoda.entrypoints.openai.api_server import run_server

    engine_args = EngineArgs.from_kwargs(args.model, **_engine_kwargs(args))
    run_server(engine_args, args.host, args.port, args.api_key, args.served_model_name, args.shutdown_timeout,
               args.metrics_without_api_key, args.request_body_timeout)


def _bench_serve(args: argparse.Namespace) -> None:
    from pagoda.entrypoints.serve_bench import run_and_print

    run_and_print(args.base_url, args.num_clients, args.num_requests, args.prompt_len, args.max_tokens,
                  args.api_key)


def _add_bench_parser(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="benchmarks against a running server")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    serve = kinds.add_parser("serve", help="the serving reference workload: N streaming clients, token-id prompts")
    serve.add_argument("--base-url", default="http://127.0.0.1:8000")
    serve.add_argument("--num-clients", type=int, default=8, help="each keeps one request in flight")
    serve.add_argument("--num-requests", type=int, default=32)
    serve.add_argument("--prompt-len", type=int, default=256, help="BOS + random token ids")
    serve.add_argument("--max-tokens", type=int, default=128, help="exactly this many new tokens per request")
    serve.add_argument("--api-key", default=None)
    serve.set_defaults(handler=_bench_serve)


def _convert(args: argparse.Namespace) -> None:
    from pagoda.models.resolve import resolve_model

    print(resolve_model(args.model))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagoda", description="Pagoda LLM inference engine")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate text for a few prompts")
    _add_engine_flags(generate)
    generate.add_argument("--prompt", action="append", help="a prompt (repeatable); default: a few examples")
    generate.add_argument("--max-tokens", type=int, default=48)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    generate.set_defaults(handler=_generate)
    serve = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    _add_engine_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    serve.add_argument("--metrics-without-api-key", action="store_true",
                       help="let /metrics answer without the API key (for scrapers that send none)")
    serve.add_argument("--served-model-name", default=None, help="the model name clients use (default: MODEL)")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="on SIGTERM or Ctrl-C, new requests get 503 and running ones this long to finish "
                            "before they are aborted (finish_reason abort); a second signal stops at once")
    serve.add_argument("--request-body-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="a request body not all received within this time gets 408 (slow clients)")
    serve.set_defaults(handler=_serve)
    _add_bench_parser(commands)
    convert = commands.add_parser("convert", help="convert a GGUF model once into the cache and print its folder")
    convert.add_argument("model")
    convert.set_defaults(handler=_convert)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=envs.log_level(), format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except ValueError as error:
        print(f"pagoda: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
