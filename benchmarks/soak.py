"""Reliability run: many streaming clients for minutes against a real `pagoda serve`, faults injected, figures
written to docs/reliability.md.

Load: `--clients` clients (default 100) for `--minutes` (default 10), each
sending one request after another with mixed parameters (completions and
chat, streamed or not, n 1-2, temperature 0 or 0.8, seeds, stop strings,
logprobs, echo, JSON-schema output, prompts sharing long prefixes so the
prefix cache and the KV store are hit), and with random disconnects
mid-stream and client-side timeouts (aborts). Every answer is checked: a
200, every choice finished exactly once, one `[DONE]`, a response id never
seen before. A Redis tier is killed a third of the way in and restarted
later: requests must not fail. Afterwards the engine must be idle (no
request running or waiting, no KV block in use), and the server's RSS is
sampled throughout (flat means no leak). The KV cache is a fixed 256 MiB:
its pages are faulted in as blocks are first written, so RSS climbs until
every block has been used once (a few hundred answers), and only growth
after that could be a leak.

Then `--vision-clients` clients (default 16) for `--vision-minutes`
(default 2) send image chats, one or two images each from a pool larger
than the encoder cache holds (so entries are shared, evicted and encoded
again), with the same disconnects and aborts, to a random-weight Gemma 3
vision model: every answer checked as above, and afterwards no encoder-cache
entry may still be referenced.

Then two faults on purpose: SIGTERM under load (running requests finish,
new ones get 503, exit status 0) and the engine process killed with SIGKILL
(`/health` 503 and the running streams ended with an error within seconds,
never a hang). The server is smollm2-135m on a free loopback port.

    python benchmarks/soak.py [--minutes 10] [--clients 100] [--vision-minutes 2] [--vision-clients 16]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "entrypoints"))
sys.path.insert(0, str(ROOT / "tests" / "multimodal"))

import httpx  # noqa: E402
import psutil  # noqa: E402
from openai_server_helpers import RemoteServer  # noqa: E402
from redis_server import RedisServer  # noqa: E402
from report import write_section  # noqa: E402
from vision_engine_helpers import noise_image, png_bytes  # noqa: E402

DOC = ROOT / "docs" / "reliability.md"
HEADER = ("# Reliability\n\nEach section is rewritten by the benchmark named in it: hostile and fuzzed input "
          "against a real server, and what the server answered.\n")
MODEL = "smollm2-135m"
KV_CACHE_MEMORY = "256MiB"
# 4 encoder rows per image on the tiny vision model: the cache holds 10 of the pool's 32 images.
ENCODER_CACHE_ROWS, VISION_IMAGES = 40, 32
WORDS = ("river stone lantern orbit maple copper harbor violet summit quiet thunder meadow cipher amber "
         "falcon ember glacier willow prism canyon").split()
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                            "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    disconnected: int = 0  # on purpose, mid-stream
    aborted: int = 0  # on purpose, by a client-side timeout
    failures: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    duplicates: int = 0
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    failed_during_outage: int = 0
    outage: bool = False

    started: float = field(default_factory=time.monotonic)

    def fail(self, what: str) -> None:
        self.failures.append(f"at {time.monotonic() - self.started:.0f} s: {what[:300]}")
        if self.outage:
            self.failed_during_outage += 1

    def new_id(self, response_id: str) -> None:
        if response_id in self.ids:
            self.duplicates += 1
            self.fail(f"duplicate response id {response_id}")
        self.ids.add(response_id)


def shared_prefixes(rng: random.Random) -> list[str]:
    """A few long system texts (several 256-token chunks each), so prompts share KV the store can serve."""
    return [" ".join(rng.choice(WORDS) for _ in range(300)) for _ in range(6)]


def random_body(rng: random.Random, prefixes: list[str]) -> tuple[str, dict]:
    """A valid request with mixed parameters: (path, body)."""
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
    text = f"{rng.choice(prefixes)} {words}" if rng.random() < 0.3 else words
    common: dict = {"max_tokens": rng.randint(1, 16), "temperature": rng.choice([0.0, 0.8]),
                    "n": rng.choice([1, 1, 1, 2]), "stream": rng.random() < 0.7}
    if rng.random() < 0.3:
        common["seed"] = rng.randint(0, 2**31)
    if rng.random() < 0.2:
        common["stop"] = rng.sample(WORDS, rng.randint(1, 4))
    if common["stream"]:
        common["stream_options"] = {"include_usage": True}
    if rng.random() < 0.5:
        body = {**common, "prompt": text}
        if rng.random() < 0.2:
            body["logprobs"] = rng.randint(0, 3)
        if rng.random() < 0.1:
            body["echo"] = True
        return "/v1/completions", body
    body = {**common, "messages": [{"role": "user", "content": text}]}
    if rng.random() < 0.15:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
        body["max_tokens"] = 48
    if rng.random() < 0.2:
        body["logprobs"], body["top_logprobs"] = True, rng.randint(0, 3)
    return "/v1/chat/completions", body


def vision_body(rng: random.Random, images: list[str]) -> tuple[str, dict]:
    """An image chat with one or two images of the pool, mixed parameters: (path, body)."""
    content: list[dict] = [{"type": "text", "text": " ".join(rng.sample(WORDS, rng.randint(1, 6)))}]
    content += [{"type": "image_url", "image_url": {"url": url}} for url in rng.sample(images, rng.choice([1, 1, 2]))]
    body: dict = {"messages": [{"role": "user", "content": content}], "max_tokens": rng.randint(1, 12),
                  "temperature": rng.choice([0.0, 0.8]), "n": rng.choice([1, 1, 2]), "stream": rng.random() < 0.7}
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    return "/v1/chat/completions", body


async def run_stream(http: httpx.AsyncClient, path: str, body: dict, tally: Tally, rng: random.Random) -> None:
    disconnect_after = rng.randint(1, 6) if rng.random() < 0.12 else None
    started = time.monotonic()
    first_token: float | None = None
    finished: dict[int, int] = {}
    done = 0
    ids: set[str] = set()
    chunks = 0
    async with http.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            tally.fail(f"{path} {response.status_code}: {(await response.aread())[:200]!r}")
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if done:
                tally.fail(f"{path}: data after [DONE]")
            if line == "data: [DONE]":
                done += 1
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                tally.fail(f"{path}: error in stream: {chunk['error']}")
                return
            ids.add(chunk["id"])
            chunks += 1
            for choice in chunk["choices"]:
                index = choice["index"]
                if index in finished:
                    tally.fail(f"{path}: choice {index} got a chunk after its finish")
                if first_token is None and (choice.get("text") or (choice.get("delta") or {}).get("content")):
                    first_token = time.monotonic()
                if choice.get("finish_reason") is not None:
                    finished[index] = finished.get(index, 0) + 1
            if disconnect_after is not None and chunks >= disconnect_after:
                tally.disconnected += 1
                return  # leaving the block closes the connection mid-stream
    if done != 1 or sorted(finished) != list(range(body["n"])) or len(ids) != 1:
        tally.fail(f"{path}: incomplete stream ([DONE] x{done}, finished {finished}, ids {len(ids)})")
        return
    tally.new_id(ids.pop())
    tally.completed += 1
    tally.e2e.append(time.monotonic() - started)
    if first_token is not None:
        tally.ttft.append(first_token - started)


async def run_plain(http: httpx.AsyncClient, path: str, body: dict, tally: Tally, rng: random.Random) -> None:
    abort_after = rng.uniform(0.05, 1.0) if rng.random() < 0.08 else None
    started = time.monotonic()
    try:
        response = await asyncio.wait_for(http.post(path, json=body), abort_after)
    except TimeoutError:
        tally.aborted += 1
        return
    if response.status_code != 200:
        tally.fail(f"{path} {response.status_code}: {response.text[:200]}")
        return
    answer = response.json()
    reasons = [choice["finish_reason"] for choice in answer["choices"]]
    if len(reasons) != body["n"] or any(r not in ("stop", "length") for r in reasons):
        tally.fail(f"{path}: choices {reasons}")
        return
    tally.new_id(answer["id"])
    tally.completed += 1
    tally.e2e.append(time.monotonic() - started)


async def client(url: str, seed: int, deadline: float, tally: Tally,
                 make_body: Callable[[random.Random], tuple[str, dict]]) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        while time.monotonic() < deadline:
            path, body = make_body(rng)
            tally.sent += 1
            try:
                await (run_stream if body["stream"] else run_plain)(http, path, body, tally, rng)
            except httpx.HTTPError as error:
                tally.fail(f"{path}: {type(error).__name__}: {error}")


def server_rss(server: RemoteServer) -> tuple[int, int]:
    """RSS of the server process and of its children (the engine core), apart: a leak shows in one."""
    process = psutil.Process(server.process.pid)
    return process.memory_info().rss, sum(p.memory_info().rss for p in process.children(recursive=True))


def gauges(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("pagoda:") and "{" in line:
            name, value = line.split("{", 1)[0], line.rsplit(" ", 1)[1]
            values[name[len("pagoda:"):]] = values.get(name[len("pagoda:"):], 0.0) + float(value)
    return values


async def load(server: RemoteServer, redis: RedisServer, args: argparse.Namespace, tally: Tally,
               rss: list[tuple[float, int, int, int]]) -> tuple[float, float]:
    """The load phase; Redis is down from a third to a half of it. Returns the outage's start and end."""
    started = time.monotonic()
    seconds = args.minutes * 60
    deadline = started + seconds
    prefixes = shared_prefixes(random.Random(1))
    clients = [asyncio.create_task(client(server.url, seed, deadline, tally, lambda rng: random_body(rng, prefixes)))
               for seed in range(args.clients)]
    outage = (started + seconds / 3, started + seconds / 2)
    redis_down = False
    while time.monotonic() < deadline:
        await asyncio.sleep(5)
        now = time.monotonic()
        front, engine = server_rss(server)
        rss.append((now - started, tally.completed, front + engine, front))
        if not redis_down and outage[0] <= now < outage[1]:
            redis.stop()
            redis_down = tally.outage = True
        elif redis_down and now >= outage[1]:
            redis.start()
            redis_down = tally.outage = False
    await asyncio.gather(*clients)
    return outage[0] - started, outage[1] - started


async def vision_load(server: RemoteServer, args: argparse.Namespace, tally: Tally) -> None:
    images = ["data:image/png;base64," + base64.b64encode(png_bytes(noise_image(seed))).decode()
              for seed in range(VISION_IMAGES)]
    deadline = time.monotonic() + args.vision_minutes * 60
    await asyncio.gather(*(client(server.url, 1000 + seed, deadline, tally, lambda rng: vision_body(rng, images))
                           for seed in range(args.vision_clients)))


def vision_folder(directory: Path) -> Path:
    """A random-weight tiny Gemma 3 vision model with the real Gemma 3 tokenizer (as the vision tests build)."""
    from tiny_gemma3 import build_tiny_gemma3

    from pagoda.models.resolve import resolve_model

    return build_tiny_gemma3(directory / "gemma3-vision", tokenizer_source=resolve_model("gemma3-270m"))


def encoder_cache_counters(url: str) -> dict[str, float]:
    """The encoder cache's own counters (hits, evictions, entries, referenced, free rows) from `/metrics`."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("pagoda:mm_") and 'cache="encoder_cache"' in line:
            name = line.split("{", 1)[0][len("pagoda:mm_"):].removesuffix("_total")
            values[name] = float(line.rsplit(" ", 1)[1])
    return values


def wait_idle(url: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for _ in range(100):  # aborts reach the engine asynchronously
        values = gauges(url)
        if values.get("num_requests_running") == 0 and values.get("num_requests_waiting") == 0 \
                and values.get("kv_cache_usage_perc") == 0 and not values.get("mm_referenced_total"):
            break
        time.sleep(0.2)
    return values


async def drain_under_load(server: RemoteServer) -> dict[str, object]:
    """SIGTERM while 16 streams run: they finish, a new request gets 503, and the server exits 0."""
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
        streaming = asyncio.Event()
        reasons: list[str | None] = []

        async def one(i: int) -> None:
            body = {"prompt": f"Story {i}:", "max_tokens": 32, "ignore_eos": True, "stream": True}
            reason = None
            async with http.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        streaming.set()
                        reason = json.loads(line[6:])["choices"][0]["finish_reason"] or reason
            reasons.append(reason)

        tasks = [asyncio.create_task(one(i)) for i in range(16)]
        await streaming.wait()
        await asyncio.sleep(0.3)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        refused = (await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})).status_code
        await asyncio.gather(*tasks)
        code = await asyncio.to_thread(server.process.wait, 60)
        return {"finished": reasons.count("length"), "streams": len(tasks), "new_request": refused,
                "exit_code": code, "seconds": time.monotonic() - signalled}


async def engine_killed(server: RemoteServer) -> dict[str, object]:
    """SIGKILL the engine process under 8 streams: /health 503 and the streams end, within seconds."""
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
        streaming = asyncio.Event()
        endings: list[str] = []

        async def one(i: int) -> None:
            body = {"prompt": f"Story {i}:", "max_tokens": 1500, "ignore_eos": True, "stream": True}
            ending = "no end"
            async with http.stream("POST", "/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        streaming.set()
                        if '"error"' in line:
                            ending = "error event"
                    elif line == "data: [DONE]":
                        ending = ending if ending == "error event" else "[DONE] without error"
            endings.append(ending)

        tasks = [asyncio.create_task(one(i)) for i in range(8)]
        await streaming.wait()
        engine = server.engine_process()
        killed = time.monotonic()
        os.kill(engine.pid, signal.SIGKILL)
        health_503 = None
        while time.monotonic() - killed < 30:
            if (await http.get("/health")).status_code == 503:
                health_503 = time.monotonic() - killed
                break
            await asyncio.sleep(0.05)
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        streams_ended = time.monotonic() - killed
        new_request = (await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})).status_code
        return {"health_503_s": health_503, "streams_ended_s": streams_ended, "endings": endings,
                "new_request": new_request}


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) >= 2 else float("nan")


def vision_report(args, tally: Tally, seconds: float, idle: dict[str, float],
                  encoder: dict[str, float]) -> tuple[str, bool]:
    idle_ok = idle.get("num_requests_running") == 0 and idle.get("num_requests_waiting") == 0 \
        and idle.get("kv_cache_usage_perc") == 0
    encoder_ok = encoder.get("referenced") == 0 and encoder.get("hits", 0) > 0 and encoder.get("evictions", 0) > 0
    ok = not tally.failures and tally.completed > 0 and idle_ok and encoder_ok
    failures = "\n".join(f"- {f}" for f in tally.failures[:10]) or "none"
    body = f"""Images: **{tally.sent}** image chats (one or two of {VISION_IMAGES} images each, an encoder cache of \
{ENCODER_CACHE_ROWS} rows holding 10) from {args.vision_clients} concurrent clients in {seconds:.0f} s to a \
random-weight Gemma 3 vision model: **{tally.completed}** complete answers checked, {tally.disconnected} streams \
disconnected on purpose, {tally.aborted} requests abandoned by a client timeout. **Failed or incomplete answers: \
{len(tally.failures)}; duplicated response ids: {tally.duplicates}.** Latency end to end p50 \
{percentile(tally.e2e, 50):.2f} s, p99 {percentile(tally.e2e, 99):.2f} s.

Afterwards: running {idle.get('num_requests_running')}, waiting {idle.get('num_requests_waiting')}, KV cache in \
use {idle.get('kv_cache_usage_perc')}; encoder cache: {encoder.get('entries', float('nan')):.0f} entries cached, \
**{encoder.get('referenced', float('nan')):.0f} still referenced** \
({'all free' if encoder_ok else 'NOT FREE, or the cache was not exercised'}), {encoder.get('hits', 0):.0f} hits, \
{encoder.get('evictions', 0):.0f} evictions.

Failures (first 10): {failures}
"""
    return body, ok


def report(args, tally: Tally, seconds: float, outage: tuple[float, float], idle: dict[str, float],
           rss: list[tuple[float, int, int, int]], drain: dict, killed: dict) -> tuple[str, bool]:
    samples = [s for s in rss if s[1] > 0]
    base = next((s for s in samples if s[1] >= min(1000, tally.completed // 4)), samples[0] if samples else None)
    end = samples[-1] if samples else None
    growth = (end[2] - base[2]) / 2**20 if base and end else float("nan")
    middle = samples[len(samples) // 2] if samples else None
    late_growth = (end[2] - middle[2]) / 2**20 if middle and end else float("nan")
    idle_ok = idle.get("num_requests_running") == 0 and idle.get("num_requests_waiting") == 0 \
        and idle.get("kv_cache_usage_perc") == 0
    drain_ok = drain["finished"] == drain["streams"] and drain["new_request"] == 503 and drain["exit_code"] == 0
    killed_ok = killed["health_503_s"] is not None and killed["health_503_s"] < 5 \
        and all(e == "error event" for e in killed["endings"]) and killed["new_request"] == 503
    ok = not tally.failures and idle_ok and drain_ok and killed_ok
    rss_rows = "\n".join(f"| {t:.0f} | {done} | {size / 2**20:.0f} | {front / 2**20:.0f} |"
                         for t, done, size, front in rss[:: max(1, len(rss) // 12)])
    failures = "\n".join(f"- {f}" for f in tally.failures[:10]) or "none"
    store = {k: v for k, v in idle.items() if k.startswith("kv_store_")}
    body = f"""**{tally.sent}** requests from {args.clients} concurrent clients in {seconds:.0f} s ({args.minutes:g} \
minutes asked): **{tally.completed}** complete answers checked, {tally.disconnected} streams disconnected on \
purpose mid-way, {tally.aborted} non-streamed requests abandoned by a client timeout. **Failed or incomplete \
answers: {len(tally.failures)}; duplicated response ids: {tally.duplicates}.**

Latency of complete answers: end to end p50 {percentile(tally.e2e, 50):.2f} s, p99 {percentile(tally.e2e, 99):.2f} \
s; streamed time to first token p50 {percentile(tally.ttft, 50):.2f} s, p99 {percentile(tally.ttft, 99):.2f} s.

Redis tier killed at {outage[0]:.0f} s and restarted at {outage[1]:.0f} s: requests failed meanwhile: \
**{tally.failed_during_outage}** (the engine recomputes what the store cannot give, and reconnects).

Afterwards: running {idle.get('num_requests_running')}, waiting {idle.get('num_requests_waiting')}, KV cache \
in use {idle.get('kv_cache_usage_perc')} ({'all free' if idle_ok else 'NOT FREE'}); KV store counters: \
{', '.join(f'{k[len("kv_store_"):]} {v:.0f}' for k, v in sorted(store.items())) or 'none'}. \
The encoder cache is exercised by the image phase below.

Server RSS (server and engine processes; a KV cache of {KV_CACHE_MEMORY}, faulted in as its blocks are first \
used) from {base[1] if base else 0} to {end[1] if end else 0} answers: {growth:+.0f} MiB; over the second half \
(from {middle[1] if middle else 0} answers): {late_growth:+.0f} MiB.

| seconds | answers | RSS MiB, all | of which the server process |
| --- | --- | --- | --- |
{rss_rows}

SIGTERM with {drain['streams']} streams running: {drain['finished']} finished normally, a new request got \
{drain['new_request']}, the server exited with status {drain['exit_code']} {drain['seconds']:.1f} s after the \
signal ({'as required' if drain_ok else 'NOT AS REQUIRED'}).

Engine process killed (SIGKILL) under 8 streams: `/health` 503 after {killed['health_503_s'] or float('nan'):.2f} \
s, every stream ended ({', '.join(sorted(set(killed['endings'])))}) {killed['streams_ended_s']:.2f} s after the \
kill, a new request got {killed['new_request']} ({'as required' if killed_ok else 'NOT AS REQUIRED'}).

Failures (first 10): {failures}
"""
    return body, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--vision-minutes", type=float, default=2.0)
    parser.add_argument("--vision-clients", type=int, default=16)
    args = parser.parse_args()
    rss: list[tuple[float, int, int, int]] = []
    tally = Tally()
    # The servers' logs stay after the run (their tracebacks explain any failure).
    log_dir = tempfile.mkdtemp(prefix="pagoda-soak-")
    with RedisServer() as redis:
        # A small CPU tier fills within the first minute: RSS growth after that is not the tier filling up.
        store = f"cpu:32MiB,{redis.url}"
        server = RemoteServer(Path(log_dir) / "server.log", "--dtype", "auto", "--kv-store", store, model=MODEL)
        try:
            server.wait_ready()
            started = tally.started = time.monotonic()
            outage = asyncio.run(load(server, redis, args, tally, rss))
            seconds = time.monotonic() - started
            idle = wait_idle(server.url)
            drain = asyncio.run(drain_under_load(server))
        finally:
            server.stop()
        vision_tally = Tally()
        vision = RemoteServer(Path(log_dir) / "vision.log", "--max-model-len", "512", "--encoder-cache-size",
                              str(ENCODER_CACHE_ROWS), model=str(vision_folder(Path(log_dir))))
        try:
            vision.wait_ready()
            vision_started = vision_tally.started = time.monotonic()
            asyncio.run(vision_load(vision, args, vision_tally))
            vision_seconds = time.monotonic() - vision_started
            vision_idle = wait_idle(vision.url)
            encoder = encoder_cache_counters(vision.url)
        finally:
            vision.stop()
        second = RemoteServer(Path(log_dir) / "server2.log", "--dtype", "auto", model=MODEL)
        try:
            second.wait_ready()
            killed = asyncio.run(engine_killed(second))
        finally:
            second.stop()
    body, ok = report(args, tally, seconds, outage, idle, rss, drain, killed)
    vision_body_text, vision_ok = vision_report(args, vision_tally, vision_seconds, vision_idle, encoder)
    body += "\n" + vision_body_text
    print(body)
    print(f"server logs: {log_dir}", file=sys.stderr)
    write_section("Load, faults and drain", body, " ".join(["python"] + sys.argv), DOC, HEADER, plot=False)
    if not (ok and vision_ok):
        sys.exit(1)


if __name__ == "__main__":
    main()
