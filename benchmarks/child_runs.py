"""Benchmark helper: the offline workload's flags, and one configuration run in a fresh child process.

Benchmarks that compare configurations of one engine (executors, a schema
on or off) run each in its own process, one after the other, and read the
child's last `RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD_TIMEOUT_S = 1800


def add_workload_arguments(parser: argparse.ArgumentParser, repeats: int) -> None:
    """--model, the workload's shape, --repeats, --dtype and --no-write."""
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=repeats, help="interleaved rounds over the configurations")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--no-write", action="store_true", help="print the tables only (for trial runs)")


def resolve_workload(args: argparse.Namespace) -> None:
    """The model alias to its folder and dtype auto to what this machine runs, for every child to share."""
    from pagoda.engine.auto_dtype import resolve_dtype
    from pagoda.models.resolve import resolve_model

    args.model = str(resolve_model(args.model))
    args.dtype = resolve_dtype(args.dtype)


def run_child(script: str, name: str, args: argparse.Namespace, round_index: int, python: str = sys.executable,
              env: dict[str, str] | None = None) -> tuple[dict | None, str]:
    """`script --child name` on the workload (in another venv's `python`, with `env` added, for a peer); its
    result, or None and the end of its stderr."""
    print(f"round {round_index + 1}: running {name} ...", file=sys.stderr, flush=True)
    command = [python, script, "--child", name, "--model", args.model, "--num-requests",
               str(args.num_requests), "--prompt-len", str(args.prompt_len), "--max-tokens", str(args.max_tokens),
               "--dtype", args.dtype]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                          env={**os.environ, **(env or {})})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return None, proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT ")), ""
