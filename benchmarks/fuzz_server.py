"""Reliability run: thousands of fuzzed requests against a real `pagoda serve`, written to docs/reliability.md.

The same generator and verdict as tests/entrypoints/test_openai_fuzz.py
(tests/entrypoints/openai_fuzz.py: schemathesis over the server's own OpenAPI
schema, positive and negative bodies, hostile JSON fragments, wrong content
types), but random rather than derandomized and many more cases. The server
is smollm2-135m in float32 with a 256 MiB KV cache on a free loopback port.
The run stops at `--cases` requests or `--max-seconds`, whichever comes first,
then checks that a reference greedy completion returns the text it returned
before, that `/health` is 200, and that no request is left in the engine.

    python benchmarks/fuzz_server.py [--cases 3000] [--max-seconds 290]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
# The tests' fuzzer and server launcher serve the benchmark too.
sys.path.insert(0, str(ROOT / "tests" / "entrypoints"))

import httpx  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from openai_fuzz import (  # noqa: E402
    FuzzRequest,
    FuzzTally,
    engine_gauges,
    fuzz_requests,
    fuzz_schema,
    reference_completion,
    send,
)
from openai_server_helpers import RemoteServer  # noqa: E402
from report import write_section  # noqa: E402

DOC = ROOT / "docs" / "reliability.md"
HEADER = ("# Reliability\n\nEach section is rewritten by the benchmark named in it: hostile and fuzzed input "
          "against a real server, and what the server answered.\n")
# Cases per Hypothesis run; runs repeat (each with a fresh random seed) until the budget is spent.
_BATCH = 250


class _OutOfTime(Exception):
    pass


def fuzz(client: httpx.Client, cases: int, max_seconds: float) -> tuple[FuzzTally, float]:
    schema = fuzz_schema()
    tally = FuzzTally()
    started = time.monotonic()

    @settings(max_examples=_BATCH, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(fuzz_requests(schema))
    def batch(request: FuzzRequest) -> None:
        if tally.sent >= cases or time.monotonic() - started > max_seconds:
            raise _OutOfTime
        send(client, request, tally)

    try:
        while True:
            batch()
    except _OutOfTime:
        pass
    return tally, time.monotonic() - started


def report(tally: FuzzTally, seconds: float, same_text: bool, healthy: bool, idle: bool) -> str:
    rows = "\n".join(f"| {status} | {count} |" for status, count in sorted(tally.statuses.items()))
    answered = ", ".join(f"{path} {count}" for path, count in sorted(tally.answered.items()))
    failures = "\n".join(f"- {failure[:400]}" for failure in tally.failures[:10]) or "none"
    return (
        f"Fuzzed requests sent: **{tally.sent}** in {seconds:.0f} s, over every route of the server's OpenAPI "
        f"schema. **5xx answers: {tally.server_errors}.** Answers that broke the rules (5xx, a 4xx without "
        f"OpenAI's error body, a server error inside a stream): {len(tally.failures)}.\n\n"
        f"| status | requests |\n| --- | --- |\n{rows}\n\n"
        f"2xx answers by route: {answered}.\n\nSlowest request ({tally.slowest[0]:.1f} s): "
        f"`{tally.slowest[1][:300].replace('`', chr(39))}`\n\n"
        f"Afterwards: reference greedy completion unchanged: {'yes' if same_text else 'NO'}; "
        f"`/health` 200: {'yes' if healthy else 'NO'}; no request left running or waiting, KV cache empty: "
        f"{'yes' if idle else 'NO'}.\n\nFailures (first 10): {failures}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=3000)
    parser.add_argument("--max-seconds", type=float, default=290.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as log_dir:
        server = RemoteServer(Path(log_dir) / "server.log")
        try:
            server.wait_ready()
            with httpx.Client(base_url=server.url, timeout=120) as client:
                before = reference_completion(client)
                tally, seconds = fuzz(client, args.cases, args.max_seconds)
                same_text = reference_completion(client) == before
                healthy = client.get("/health").status_code == 200
                idle = False
                for _ in range(50):  # aborts of streams reach the engine asynchronously
                    gauges = engine_gauges(client)
                    idle = gauges.get("num_requests_running") == 0 and gauges.get("num_requests_waiting") == 0 \
                        and gauges.get("kv_cache_usage_perc") == 0
                    if idle:
                        break
                    time.sleep(0.2)
        finally:
            server.stop()
    body = report(tally, seconds, same_text, healthy, idle)
    print(body)
    write_section("Fuzzed requests against the OpenAI server", body, " ".join(["python"] + sys.argv), DOC, HEADER,
                  plot=False)
    if tally.failures or not (same_text and healthy and idle):
        sys.exit(1)


if __name__ == "__main__":
    main()
