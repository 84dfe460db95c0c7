"""Parallel-execution benchmark, part 2: the reference offline workload on one process, one worker process, two
tensor-parallel ranks, two pipeline stages and two engine cores; and what one gloo all-reduce of a step's
activations costs here.

Each configuration runs in a fresh child process, one after the other
(never overlapping), Gemma 3 270M in `--dtype` (auto: bf16, or float32 on a CPU without native bf16) with
both cores: the in-process
worker (`uni`), the same single rank in a worker process (`mp`, TP=1: the
cost of the multiprocess executor; goal ≤ 3%), TP=2 (`mp`, a rank per core),
PP=2 (`mp`, two stages of 9 layers, a core each, two batches in flight),
and DP=2 (two engine cores, one core each, behind one front end). On a 2-core machine TP=2 cannot be faster: each rank gets one core
for half the work, and every step adds 1 + 2 × 18 + 1 = 38 all-reduces or
gathers on the critical path; the all-reduce table measures them.

    python benchmarks/parallel_throughput.py [--num-requests 64] [--prompt-len 256] [--max-tokens 128] [--repeats 3]
        [--dtype auto] [--config NAME ...] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from child_runs import add_workload_arguments, resolve_workload, run_child
from offline_throughput import exact_params, random_prompts, warmup_prompts
from report import write_section

# Name -> (executor backend, tensor-parallel size, data-parallel size, pipeline stages).
CONFIGS = {"uni, TP=1": ("uni", 1, 1, 1), "mp, TP=1": ("mp", 1, 1, 1), "mp, TP=2": ("mp", 2, 1, 1),
           "mp, PP=2": ("mp", 1, 1, 2), "DP=2": ("uni", 1, 2, 1)}
# Collectives per step of Gemma 3 270M at TP > 1: the embedding, two per layer (18), the logits gather.
COLLECTIVES_PER_STEP = 1 + 2 * 18 + 1


def child(args: argparse.Namespace) -> None:
    from pagoda import LLM, SamplingParams

    backend, tp, dp, pp = CONFIGS[args.child]
    prompts = random_prompts(args.num_requests, args.prompt_len, seed=0)
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=len(prompts), max_model_len=4096,
              tensor_parallel_size=tp, distributed_executor_backend=backend, data_parallel_size=dp,
              pipeline_parallel_size=pp)
    llm.generate(warmup_prompts(args.prompt_len), SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    started = time.perf_counter()
    outputs = llm.generate(prompts, exact_params(SamplingParams, args.max_tokens), use_tqdm=False)
    elapsed = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    llm.shutdown()
    print("RESULT " + json.dumps({"elapsed": elapsed, "tokens": tokens,
                                  "first": outputs[0].outputs[0].token_ids[:16]}), flush=True)


def all_reduce_rank(rank: int, port: int, sizes: list[int], repeats: int, dtype: str, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    timings = {}
    for rows in sizes:
        x = torch.randn(rows, 640, dtype=getattr(torch, dtype))
        for _ in range(5):
            dist.all_reduce(x)
        samples = []
        for _ in range(repeats):
            dist.barrier()
            started = time.perf_counter()
            dist.all_reduce(x)
            samples.append(time.perf_counter() - started)
        timings[rows] = statistics.median(samples)
    dist.destroy_process_group()
    if rank == 0:
        results.put(timings)


def measure_all_reduce(sizes: list[int], repeats: int, dtype: str) -> dict[int, float]:
    import multiprocessing
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    ranks = [context.Process(target=all_reduce_rank, args=(rank, port, sizes, repeats, dtype, results)) for rank in (0, 1)]
    for process in ranks:
        process.start()
    timings = results.get(timeout=600)
    for process in ranks:
        process.join(60)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser, repeats=3)
    parser.add_argument("--config", action="append", choices=list(CONFIGS),
                        help="run only these configurations (default: all; 'uni, TP=1' is always run: the base)")
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    resolve_workload(args)
    names = [name for name in CONFIGS if name == "uni, TP=1" or not args.config or name in args.config]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    # Interleaved rounds: this machine's speed drifts by more than the differences measured here.
    for round_index in range(args.repeats):
        for name in names:
            result, error = run_child(__file__, name, args, round_index)
            if result is not None:
                runs[name].append(result)
            else:
                print(f"{name} failed:\n{error}", file=sys.stderr)
    rates = {name: [r["tokens"] / r["elapsed"] for r in results] for name, results in runs.items()}
    base = statistics.median(rates["uni, TP=1"]) if rates["uni, TP=1"] else None
    base_first = runs["uni, TP=1"][0]["first"] if runs["uni, TP=1"] else None
    rows = ["| configuration | output tok/s, median (min–max) | ÷ uni TP=1 | first 16 tokens equal uni |",
            "|---|---|---|---|"]
    for name, values in rates.items():
        if not values:
            rows.append(f"| {name} | failed | | |")
            continue
        rate = statistics.median(values)
        ratio = f"{rate / base:.3f}" if base else ""
        same = "yes" if all(r["first"] == base_first for r in runs[name]) else "no"
        rows.append(f"| {name} | {rate:.1f} ({min(values):.1f}–{max(values):.1f}) | {ratio} | {same} |")
    sizes = [1, 64, 2048]
    timings = measure_all_reduce(sizes, repeats=50, dtype=args.dtype)
    reduces = [f"| rows × 640 {args.dtype} | one gloo all-reduce (2 ranks) | × 38 per step |", "|---|---|---|"]
    for rows_count in sizes:
        seconds = timings[rows_count]
        reduces.append(f"| {rows_count} | {seconds * 1e6:.0f} µs | {seconds * COLLECTIVES_PER_STEP * 1e3:.1f} ms |")
    body = (f"Gemma 3 270M, {args.dtype}, {args.num_requests} × {args.prompt_len} → {args.max_tokens} (greedy, exact "
            f"lengths), each configuration in a fresh process after a warm-up, {args.repeats} interleaved rounds. TP=2 gives each rank one of the two "
            f"cores, so it cannot beat one rank with both; every step also waits for {COLLECTIVES_PER_STEP} "
            f"collectives (the embedding, two per layer, the logits gather). PP=2 keeps two batches in flight, so each "
            f"stage's core works on one while the other stage works on the other; the batches are half as big "
            f"(smaller GEMMs) and each step sends its hidden states from stage to stage once:\n\n" + "\n".join(rows) +
            "\n\nOne all-reduce of a step's activations between 2 gloo ranks on loopback (median of 50; a decode "
            "step of 64 sequences reduces 64 rows, a prefill chunk up to 2048):\n\n" + "\n".join(reduces))
    print(body)
    if args.no_write:
        return
    # One section per dtype: a float32 run (a CPU without native bf16) must not replace the bf16 table.
    title = "Parallel: executors and tensor parallelism on the reference workload"
    write_section(title if args.dtype == "bfloat16" else f"{title} ({args.dtype})", body,
                  "python benchmarks/parallel_throughput.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
