"""Entrypoints layer: the `pagoda` command (`generate`, `chat`, `serve`, `bench`, `convert`), flags named like
vLLM's, each with its help and default (cli_flags.py)."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from pagoda import envs
from pagoda.entrypoints.cli_flags import HelpFormatter, add_engine_flags, engine_kwargs

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Here is a short story about a lighthouse keeper:",
    "def fibonacci(n):",
    "The three primary colours are",
)


def _generate(args: argparse.Namespace) -> None:
    from pagoda import LLM, SamplingParams

    started = time.monotonic()
    llm = LLM(args.model, **engine_kwargs(args))
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

    engine_args = EngineArgs.from_kwargs(args.model, **engine_kwargs(args))
    run_server(engine_args, args.host, args.port, args.api_key, args.served_model_name, args.shutdown_timeout,
               args.metrics_without_api_key, args.request_body_timeout, args.chat_page)


def _bench_serve(args: argparse.Namespace) -> None:
    from pagoda.entrypoints.serve_bench import run_and_print

    run_and_print(args.base_url, args.num_clients, args.num_requests, args.prompt_len, args.max_tokens,
                  args.api_key)


def _convert(args: argparse.Namespace) -> None:
    from pagoda.models.resolve import resolve_model

    print(resolve_model(args.model))


def _add_generate_parser(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser("generate", formatter_class=HelpFormatter, help="generate text for a few prompts",
                                   description="Generate text for a few prompts with the offline engine.")
    add_engine_flags(generate)
    sampling = generate.add_argument_group("sampling")
    sampling.add_argument("--prompt", action="append", help="a prompt (repeatable; default: a few examples)")
    sampling.add_argument("--max-tokens", type=int, default=48, help="tokens to generate per prompt")
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    sampling.add_argument("--sampling-seed", type=int, default=None,
                          help="per-request sampling seed (default: none, i.e. unseeded)")
    generate.set_defaults(handler=_generate)


def _add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", formatter_class=HelpFormatter, help="run the OpenAI-compatible HTTP server",
                                description="Run the OpenAI-compatible HTTP server.")
    add_engine_flags(serve)
    server = serve.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (loopback only unless changed)")
    server.add_argument("--port", type=int, default=8000, help="port to listen on")
    server.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every route but /health (default: none)")
    server.add_argument("--metrics-without-api-key", action="store_true",
                        help="let /metrics answer without the API key (for scrapers that send none)")
    server.add_argument("--served-model-name", default=None, help="the model name clients use (default: MODEL)")
    server.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM or Ctrl-C, new requests get 503 and running ones this long to finish "
                             "before they are aborted (finish_reason abort); a second signal stops at once")
    server.add_argument("--request-body-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="a request body not all received within this time gets 408 (slow clients)")
    server.add_argument("--chat-page", action=argparse.BooleanOptionalAction, default=True,
                        help="serve a chat page at / (one static file; --no-chat-page turns it off)")
    serve.set_defaults(handler=_serve)


def _add_bench_parser(commands: argparse._SubParsersAction) -> None:
    from pagoda.entrypoints.offline_bench import add_latency_parser, add_throughput_parser

    bench = commands.add_parser("bench", formatter_class=HelpFormatter, help="benchmarks: serve, throughput, latency",
                                description="Benchmarks with vLLM's flag names: a running server, or the offline "
                                            "engine.")
    kinds = bench.add_subparsers(dest="bench_command", required=True, metavar="{serve,throughput,latency}")
    serve = kinds.add_parser("serve", formatter_class=HelpFormatter,
                             help="the serving reference workload: N streaming clients, token-id prompts",
                             description="Streams the serving reference workload to a running server.")
    serve.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server")
    serve.add_argument("--num-clients", type=int, default=8, help="each keeps one request in flight")
    serve.add_argument("--num-requests", type=int, default=32, help="requests in all")
    serve.add_argument("--prompt-len", type=int, default=256, help="BOS + random token ids")
    serve.add_argument("--max-tokens", type=int, default=128, help="exactly this many new tokens per request")
    serve.add_argument("--api-key", default=None, help="the server's API key (default: none)")
    serve.set_defaults(handler=_bench_serve)
    add_throughput_parser(kinds, HelpFormatter)
    add_latency_parser(kinds, HelpFormatter)


def _add_convert_parser(commands: argparse._SubParsersAction) -> None:
    convert = commands.add_parser("convert", formatter_class=HelpFormatter,
                                  help="convert a GGUF model once into the cache and print its folder",
                                  description="Convert a GGUF model once into ~/.cache/pagoda and print its folder.")
    convert.add_argument("model", help="alias (gemma3-270m, smollm2-135m) or .gguf file")
    convert.set_defaults(handler=_convert)


def build_parser() -> argparse.ArgumentParser:
    from pagoda.entrypoints.chat_cli import add_chat_parser

    parser = argparse.ArgumentParser(prog="pagoda", formatter_class=HelpFormatter,
                                     description="Pagoda LLM inference engine. `pagoda VERB --help` shows a verb's "
                                                 "flags.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{generate,chat,serve,bench,convert}")
    _add_generate_parser(commands)
    add_chat_parser(commands, HelpFormatter)
    _add_serve_parser(commands)
    _add_bench_parser(commands)
    _add_convert_parser(commands)
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
