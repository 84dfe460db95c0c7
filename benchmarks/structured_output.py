"""Structured-output benchmark: the reference offline workload with a JSON schema on every request vs none.

Gemma 3 270M in `--dtype` (auto), 64 × 256 → 128, greedy, end-of-sequence
ignored, each configuration in a fresh process after a warm-up, in
interleaved rounds. The schema keeps every request inside the grammar for
all 128 tokens (a short title, up to five tags from an enum, then a body
string of at least 4,000 characters), so each of its steps pays for a mask
on every row. Goal: ≤ 10% slower than without a schema. The engine's own
time in grammar work (bitmasks before the step, matcher updates after) is
timed inside the constrained run and reported as a share of it.

    python benchmarks/structured_output.py [--num-requests 64] [--prompt-len 256] [--max-tokens 128]
        [--repeats 2] [--dtype auto] [--no-write]
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

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "tags": {"type": "array", "maxItems": 5, "items": {"enum": ["news", "sport", "science", "art", "travel"]}},
    "body": {"type": "string", "minLength": 4000}}, "required": ["title", "tags", "body"]}
CONFIGS = ("no schema", "JSON schema")
VLLM_CONFIGS = ("vLLM no schema", "vLLM JSON schema")
ROOT = Path(__file__).resolve().parent.parent
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "4"}


def vllm_child(args: argparse.Namespace) -> None:
    """The same workload through vLLM-cpu (its default structured-output backend, xgrammar)."""
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    constrained = args.child == "vLLM JSON schema"
    prompts = [TokensPrompt(prompt_token_ids=p) for p in random_prompts(args.num_requests, args.prompt_len, seed=0)]
    llm = LLM(args.model, dtype=args.dtype, max_model_len=4096, max_num_seqs=len(prompts))
    extra = {"structured_outputs": StructuredOutputsParams(json=SCHEMA)} if constrained else {}
    warmup = [TokensPrompt(prompt_token_ids=p) for p in warmup_prompts(args.prompt_len)]
    llm.generate(warmup, exact_params(SamplingParams, 4, **extra), use_tqdm=False)
    started = time.perf_counter()
    outputs = llm.generate(prompts, exact_params(SamplingParams, args.max_tokens, **extra), use_tqdm=False)
    elapsed = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    full = sum(o.outputs[0].finish_reason == "length" for o in outputs)
    print("RESULT " + json.dumps({"elapsed": elapsed, "tokens": tokens, "full_length": full,
                                  "grammar_seconds": None}), flush=True)


def child(args: argparse.Namespace) -> None:
    if args.child in VLLM_CONFIGS:
        vllm_child(args)
        return
    from pagoda import LLM, SamplingParams, StructuredOutputsParams

    constrained = args.child == "JSON schema"
    prompts = random_prompts(args.num_requests, args.prompt_len, seed=0)
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=len(prompts), max_model_len=4096)
    extra = {"structured_outputs": StructuredOutputsParams(json=SCHEMA)} if constrained else {}
    llm.generate(warmup_prompts(args.prompt_len), exact_params(SamplingParams, 4, **extra), use_tqdm=False)
    manager = llm.llm_engine.engine_core.engine_core.structured_output
    grammar_seconds = [0.0]

    def timed(method):
        def call(*call_args):
            started = time.perf_counter()
            try:
                return method(*call_args)
            finally:
                grammar_seconds[0] += time.perf_counter() - started
        return call

    manager.bitmask, manager.accept = timed(manager.bitmask), timed(manager.accept)
    started = time.perf_counter()
    outputs = llm.generate(prompts, exact_params(SamplingParams, args.max_tokens, **extra), use_tqdm=False)
    elapsed = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    full = sum(o.outputs[0].finish_reason == "length" for o in outputs)
    llm.shutdown()
    print("RESULT " + json.dumps({"elapsed": elapsed, "tokens": tokens, "full_length": full,
                                  "grammar_seconds": grammar_seconds[0]}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_arguments(parser, repeats=2)
    parser.add_argument("--child", choices=CONFIGS + VLLM_CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--vllm-venv", default=str(ROOT / ".venv-vllm"),
                        help="vLLM-cpu's venv (../shared/anchors/setup-vllm-cpu.sh); skipped when absent")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    resolve_workload(args)
    vllm_python = Path(args.vllm_venv) / "bin" / "python"
    configs = CONFIGS + (VLLM_CONFIGS if vllm_python.exists() else ())
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for round_index in range(args.repeats):
        # Alternate which goes first: this machine's speed drifts by more than the difference measured.
        for name in configs if round_index % 2 == 0 else configs[::-1]:
            peer = name in VLLM_CONFIGS
            result, error = run_child(__file__, name, args, round_index, str(vllm_python) if peer else sys.executable,
                                      VLLM_ENV if peer else None)
            if result is None:
                raise SystemExit(f"{name} failed:\n{error}")
            runs[name].append(result)
    rates = {name: [r["tokens"] / r["elapsed"] for r in results] for name, results in runs.items()}
    rows = ["| engine, requests | output tok/s, median (min–max) | ÷ same engine without schema | requests at full "
            "length | grammar work, share of the run |", "|---|---|---|---|---|"]
    for name in configs:
        rate = statistics.median(rates[name])
        base = statistics.median(rates["vLLM no schema" if name in VLLM_CONFIGS else "no schema"])
        shares = [r["grammar_seconds"] / r["elapsed"] for r in runs[name] if r["grammar_seconds"] is not None]
        full = min(r["full_length"] for r in runs[name])
        label = name if name in VLLM_CONFIGS else f"pagoda {name}"
        rows.append(f"| {label} | {rate:.1f} ({min(rates[name]):.1f}–{max(rates[name]):.1f}) | {rate / base:.3f} | "
                    f"{full}/{args.num_requests} | {f'{statistics.median(shares):.1%}' if shares else '–'} |")
    if vllm_python.exists():
        median = {name: statistics.median(values) for name, values in rates.items()}
        with_schema = median["JSON schema"] / median["vLLM JSON schema"]
        without = median["no schema"] / median["vLLM no schema"]
        peer_note = (f"Pagoda ÷ vLLM-cpu with the schema: **{with_schema:.2f}×** (without: {without:.2f}×); "
                     "vLLM-cpu 0.32 with both cores bound and its default backend (xgrammar).")
    else:
        peer_note = f"vLLM-cpu not run: no {vllm_python}."
    body = (f"Gemma 3 270M, {args.dtype}, {args.num_requests} × {args.prompt_len} → {args.max_tokens} (greedy, "
            f"end-of-sequence ignored), each configuration in a fresh process after a warm-up, {args.repeats} "
            "interleaved rounds. The constrained run puts the same JSON schema on every request (a title, tags "
            "from an enum, a body of at least 4,000 characters), so every row of every step is masked; grammar "
            "work is the engine loop's time in llguidance (bitmasks and matcher updates). Goal: ≤ 10% slower. "
            f"{peer_note}\n\n" + "\n".join(rows))
    print(body)
    if not args.no_write:
        write_section(f"Structured output: a JSON schema on every request ({args.dtype})", body,
                      "python benchmarks/structured_output.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
