"""Data parallelism: two engine cores behind one front end give DP=1's tokens, route a repeated prefix to the
core that holds it, report stats summed and per core, and die together.

The router alone is tested without processes; the end-to-end tests start
two engine processes of SmolLM2 135M (one core each here).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pagoda import LLM, SamplingParams
from pagoda.engine.dp_router import AFFINITY_SLACK, AFFINITY_TOKENS, DPRouter
from pagoda.engine.messages import SchedulerStatsMessage

GREEDY = SamplingParams(temperature=0, max_tokens=10)
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The best way to learn is"]


def stats(running: int, waiting: int) -> SchedulerStatsMessage:
    return SchedulerStatsMessage(num_running_reqs=running, num_waiting_reqs=waiting, kv_cache_usage=0.1,
                                 prefix_cache_queries=10, prefix_cache_hits=5, num_preemptions=0)


def test_router_balances_load_and_keeps_a_prefix_on_its_core() -> None:
    router = DPRouter(2)
    shared = list(range(100, 100 + AFFINITY_TOKENS))
    first = router.route("a", shared + [1])
    assert router.route("b", [7, 8, 9]) != first, "the idle core takes the next unrelated request"
    assert router.route("c", shared + [2]) == first, "the same prefix goes where its blocks are"
    router.in_flight[first] += int(AFFINITY_SLACK) + 2
    assert router.route("d", shared + [3]) != first, "an overloaded core loses its affinity"
    router.finished("a")
    assert router.engine_of("a") is None


def test_router_sums_stats_over_cores() -> None:
    router = DPRouter(2)
    router.stats = [stats(2, 1), stats(3, 0)]
    summed = router.summed_stats()
    assert summed is not None and summed.num_running_reqs == 5 and summed.num_waiting_reqs == 1
    assert summed.prefix_cache_hits == 10 and summed.kv_cache_usage == pytest.approx(0.1)


@pytest.mark.slow
def test_two_engine_cores_give_one_cores_tokens_and_honour_prefix_affinity(smollm_path: Path, smollm_llm) -> None:
    llm = LLM(str(smollm_path), dtype="float32", kv_cache_memory=64 << 20, max_model_len=512, data_parallel_size=2)
    try:
        client = llm.llm_engine.engine_core
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        assert {client.router.engine_of(str(i)) for i in range(len(PROMPTS))} == {None}
        long_prefix = " ".join(["a long shared document about rivers and mountains"] * 12)
        llm.generate(long_prefix + " Question one?", GREEDY, use_tqdm=False)
        affine_before = client.router.num_affine
        repeat = llm.generate(long_prefix + " Question two?", GREEDY, use_tqdm=False)[0]
        metrics = llm.get_metrics()
    finally:
        llm.shutdown()
    assert got == [o.outputs[0].token_ids for o in smollm_llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert client.router.num_affine == affine_before + 1
    assert repeat.num_cached_tokens >= AFFINITY_TOKENS, "the repeat landed on the core holding its prefix"
    assert metrics["dp0.num_running_reqs"] == 0 and "dp1.prefix_cache_queries" in metrics


@pytest.mark.slow
def test_async_llm_serves_through_two_engine_cores(smollm_path: Path, smollm_llm) -> None:
    from pagoda.engine.arg_utils import EngineArgs
    from pagoda.engine.async_llm import AsyncLLM
    from pagoda.sampling_params import RequestOutputKind

    args = EngineArgs.from_kwargs(str(smollm_path), dtype="float32", kv_cache_memory=64 << 20, max_model_len=512,
                                  data_parallel_size=2)
    engine = AsyncLLM.from_engine_args(args)
    params = GREEDY.clone(output_kind=RequestOutputKind.FINAL_ONLY)

    async def one(index: int, prompt: str) -> list[int]:
        async for output in engine.generate(prompt, params, f"r{index}"):
            if output.finished:
                return output.outputs[0].token_ids
        raise AssertionError("no final output")

    async def main() -> list[list[int]]:
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS)))

    try:
        got = asyncio.run(main())
    finally:
        engine.shutdown()
    assert got == [o.outputs[0].token_ids for o in smollm_llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.mark.slow
def test_the_server_answers_through_two_engine_cores(tmp_path_factory: pytest.TempPathFactory, smollm_llm) -> None:
    import httpx
    from entrypoints.openai_server_helpers import API_KEY, start_server

    server = start_server(tmp_path_factory, "--api-key", API_KEY, "--metrics-without-api-key",
                          "--data-parallel-size", "2")
    try:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        answers = [httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=120,
                              json={"model": "smollm2-135m", "prompt": prompt, "max_tokens": 10, "temperature": 0})
                   for prompt in PROMPTS]
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    finally:
        server.stop()
    expected = [o.outputs[0].text for o in smollm_llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert [a.status_code for a in answers] == [200] * len(PROMPTS)
    assert [a.json()["choices"][0]["text"] for a in answers] == expected
    assert "pagoda:num_requests_running" in metrics
