"""Entrypoints layer: `pagoda bench throughput` and `pagoda bench latency`, the offline engine measured with
vLLM's flag names and vLLM's printed lines.

Prompts are random token ids (seeded, BOS first), every request generates
exactly `--output-len` tokens (end-of-sequence ignored), and a short warm-up
runs first. Throughput submits `--num-prompts` requests at once; latency
times `--num-iters` batches of `--batch-size` requests one after another.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

from pagoda.entrypoints.cli_flags import add_engine_flags, engine_kwargs

LATENCY_PERCENTILES = (10, 25, 50, 75, 90, 99)


def add_throughput_parser(kinds: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    parser, workload = _bench_parser(kinds, formatter, "throughput", "offline throughput: many requests at once "
                                     "through the engine", "Offline throughput of the engine on random token-id "
                                     "prompts, flags as in `vllm bench throughput`.", input_len=256)
    workload.add_argument("--num-prompts", type=int, default=64, help="requests, all submitted at once")
    _add_common(parser, workload)
    parser.set_defaults(handler=run_throughput)


def add_latency_parser(kinds: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    parser, workload = _bench_parser(kinds, formatter, "latency", "offline latency: one batch at a time, timed end "
                                     "to end", "End-to-end latency of one batch through the engine, flags as in "
                                     "`vllm bench latency`.", input_len=32)
    workload.add_argument("--batch-size", type=int, default=8, help="requests per batch")
    workload.add_argument("--num-iters-warmup", type=int, default=3, help="batches run before timing")
    workload.add_argument("--num-iters", type=int, default=10, help="batches timed")
    _add_common(parser, workload)
    parser.set_defaults(handler=run_latency)


def _bench_parser(kinds: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter], name: str,
                  summary: str, description: str, input_len: int
                  ) -> tuple[argparse.ArgumentParser, argparse._ArgumentGroup]:
    """A bench kind's parser and its workload group, holding the prompt and output lengths."""
    parser = kinds.add_parser(name, formatter_class=formatter, help=summary, description=description)
    workload = parser.add_argument_group("workload")
    workload.add_argument("--input-len", type=int, default=input_len, help="prompt tokens per request")
    workload.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    return parser, workload


def _add_common(parser: argparse.ArgumentParser, workload: argparse._ArgumentGroup) -> None:
    workload.add_argument("--n", type=int, default=1, help="sequences per request")
    workload.add_argument("--random-seed", type=int, default=0, help="seed of the random prompts")
    workload.add_argument("--output-json", default=None, metavar="PATH",
                          help="also write the results to this JSON file (default: none)")
    add_engine_flags(parser, model_flag=True)


def _prompts(llm: Any, count: int, length: int, seed: int) -> list[list[int]]:
    special = llm.get_tokenizer().encode("", add_special_tokens=True)  # BOS, for models that start with one
    vocab = llm.llm_engine.config.model_config.vocab_size
    rng = random.Random(seed)
    # Ids well inside the vocabulary, clear of the special tokens at its ends.
    low, high = min(1000, vocab // 4), vocab - min(1000, vocab // 4)
    return [special + [rng.randrange(low, high) for _ in range(length - len(special))] for _ in range(count)]


def _engine(args: argparse.Namespace) -> Any:
    from pagoda import LLM

    return LLM(args.model, **engine_kwargs(args))


def _params(args: argparse.Namespace) -> Any:
    from pagoda import SamplingParams

    return SamplingParams(n=args.n, temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=args.output_len)


def run_throughput(args: argparse.Namespace) -> None:
    llm = _engine(args)
    prompts = _prompts(llm, args.num_prompts, args.input_len, args.random_seed)
    llm.generate(prompts[: min(4, len(prompts))], _params(args).clone(max_tokens=4), use_tqdm=False)
    started = time.perf_counter()
    outputs = llm.generate(prompts, _params(args), use_tqdm=False)
    elapsed = time.perf_counter() - started
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    total_tokens = output_tokens + sum(len(o.prompt_token_ids) for o in outputs)
    results = {"elapsed_time": elapsed, "num_requests": len(prompts), "total_num_tokens": total_tokens,
               "requests_per_second": len(prompts) / elapsed, "tokens_per_second": total_tokens / elapsed,
               "output_tokens_per_second": output_tokens / elapsed}
    print(f"Throughput: {results['requests_per_second']:.2f} requests/s, {results['tokens_per_second']:.2f} "
          f"total tokens/s, {results['output_tokens_per_second']:.2f} output tokens/s")
    print(f"Total num prompt tokens: {total_tokens - output_tokens}\nTotal num output tokens: {output_tokens}")
    _write_json(args.output_json, results)
    llm.shutdown()


def run_latency(args: argparse.Namespace) -> None:
    llm = _engine(args)
    prompts = _prompts(llm, args.batch_size, args.input_len, args.random_seed)
    params = _params(args)
    for _ in range(args.num_iters_warmup):
        llm.generate(prompts, params, use_tqdm=False)
    latencies = []
    for _ in range(args.num_iters):
        started = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        latencies.append(time.perf_counter() - started)
    average = statistics.fmean(latencies)
    ordered = sorted(latencies)
    percentiles = {str(p): ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]
                   for p in LATENCY_PERCENTILES}
    print(f"Avg latency: {average} seconds")
    for p, value in percentiles.items():
        print(f"{p}% percentile latency: {value} seconds")
    _write_json(args.output_json, {"avg_latency": average, "latencies": latencies, "percentiles": percentiles})
    llm.shutdown()


def _write_json(path: str | None, results: dict[str, Any]) -> None:
    if path is not None:
        with open(path, "w") as file:
            json.dump(results, file, indent=2)
