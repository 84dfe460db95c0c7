"""Entrypoints layer: `pagoda bench serve` — the serving reference workload against a running server.

Workload (../shared/anchors/README.md): streaming `/v1/completions` with
token-id prompts, each BOS (id 2) followed by random ids drawn with
`random.Random(0)` from `range(1000, 200000)`; greedy; exactly `max_tokens`
new tokens (`ignore_eos` + `min_tokens`); N clients each keeping one request
in flight. Works against any OpenAI-compatible server (Pagoda's or vLLM's).
Time to first token is measured from sending to the first chunk with text;
inter-token latency is the gap between successive chunks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

BOS_TOKEN_ID = 2


def reference_prompts(num_requests: int, prompt_len: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[BOS_TOKEN_ID] + [rng.randrange(1000, 200000) for _ in range(prompt_len - 1)]
            for _ in range(num_requests)]


@dataclass
class RequestResult:
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    num_output_tokens: int = 0
    error: str | None = None


@dataclass(frozen=True)
class BenchResult:
    num_clients: int
    num_requests: int
    num_failed: int
    elapsed: float
    num_output_tokens: int
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float

    @property
    def request_throughput(self) -> float:
        return (self.num_requests - self.num_failed) / self.elapsed

    @property
    def output_throughput(self) -> float:
        return self.num_output_tokens / self.elapsed


def _headers(api_key: str | None) -> dict[str, str]:
    return {} if api_key is None else {"Authorization": f"Bearer {api_key}"}


async def served_model(client: httpx.AsyncClient, base_url: str) -> str:
    response = await client.get(f"{base_url}/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def stream_completion(client: httpx.AsyncClient, base_url: str, model: str, prompt: list[int],
                            max_tokens: int) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    result = RequestResult()
    started = last = time.perf_counter()
    async with client.stream("POST", f"{base_url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            return result
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                result.error = chunk["error"]["message"]
                return result
            if chunk.get("usage"):
                result.num_output_tokens = chunk["usage"]["completion_tokens"]
            if not any(choice["text"] for choice in chunk["choices"]):
                continue
            now = time.perf_counter()
            if result.ttft == 0.0:
                result.ttft = now - started
            else:
                result.itls.append(now - last)
            last = now
    return result


async def run_workload(base_url: str, num_clients: int, num_requests: int, prompt_len: int, max_tokens: int,
                       api_key: str | None = None) -> BenchResult:
    prompts = reference_prompts(num_requests, prompt_len)
    next_index = iter(range(num_requests))
    results: list[RequestResult] = []
    limits = httpx.Limits(max_connections=num_clients + 1)
    async with httpx.AsyncClient(timeout=None, limits=limits, headers=_headers(api_key)) as client:
        model = await served_model(client, base_url)

        async def client_loop() -> None:
            for index in next_index:
                results.append(await stream_completion(client, base_url, model, prompts[index], max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(num_clients)))
        elapsed = time.perf_counter() - started
    ok = [r for r in results if r.error is None]
    for failed in (r for r in results if r.error is not None):
        print(f"request failed: {failed.error}")
    ttfts = [r.ttft for r in ok] or [0.0]
    itls = [itl for r in ok for itl in r.itls] or [0.0]
    return BenchResult(
        num_clients=num_clients, num_requests=num_requests, num_failed=len(results) - len(ok), elapsed=elapsed,
        num_output_tokens=sum(r.num_output_tokens for r in ok),
        ttft_p50=float(np.percentile(ttfts, 50)), ttft_p99=float(np.percentile(ttfts, 99)),
        itl_p50=float(np.percentile(itls, 50)), itl_p99=float(np.percentile(itls, 99)),
    )


def format_result(result: BenchResult) -> str:
    return (f"{result.num_clients} clients, {result.num_requests} requests ({result.num_failed} failed) in "
            f"{result.elapsed:.1f} s: {result.request_throughput:.2f} req/s, {result.output_throughput:.1f} "
            f"output tok/s, TTFT p50/p99 {result.ttft_p50:.3f}/{result.ttft_p99:.3f} s, "
            f"ITL p50/p99 {result.itl_p50 * 1000:.0f}/{result.itl_p99 * 1000:.0f} ms")


def run_and_print(base_url: str, num_clients: int, num_requests: int, prompt_len: int, max_tokens: int,
                  api_key: str | None) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the result
    result = asyncio.run(run_workload(base_url.rstrip("/"), num_clients, num_requests, prompt_len, max_tokens,
                                      api_key))
    print(format_result(result))
