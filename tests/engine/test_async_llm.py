"""AsyncLLM over an engine process: streaming kinds, concurrency, aborts that free blocks, stats, engine death."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from pathlib import Path

import pytest
import pytest_asyncio

from pagoda.engine.arg_utils import EngineArgs
from pagoda.engine.async_llm import AsyncLLM
from pagoda.engine.exceptions import EngineDeadError
from pagoda.engine.iteration_stats import IterationStats
from pagoda.engine.messages import SchedulerStatsMessage
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import RequestOutputKind, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

ENGINE_KWARGS = {"dtype": "float32", "kv_cache_memory": 64 << 20, "max_model_len": 512}
PROMPT = "The capital of France is"


def greedy(kind: RequestOutputKind, max_tokens: int = 12, **kwargs: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, output_kind=kind, **kwargs)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(smollm_path: Path):
    engine = AsyncLLM.from_engine_args(EngineArgs(model=str(smollm_path), **ENGINE_KWARGS))
    yield engine
    engine.shutdown()


async def collect(
    engine: AsyncLLM, prompt: str | list[int], params: SamplingParams, request_id: str
) -> list[RequestOutput]:
    return [output async for output in engine.generate(prompt, params, request_id)]


async def wait_until_all_free(engine: AsyncLLM) -> SchedulerStatsMessage:
    """Aborts travel asynchronously; give them a moment to reach the engine."""
    for _ in range(100):
        stats = await engine.get_scheduler_stats()
        if stats.num_running_reqs == stats.num_waiting_reqs == 0 and stats.kv_cache_usage == 0.0:
            return stats
        await asyncio.sleep(0.05)
    raise AssertionError(f"blocks still held: {stats}")


async def test_delta_stream_concatenates_to_the_final_output(engine: AsyncLLM) -> None:
    deltas = await collect(engine, PROMPT, greedy(RequestOutputKind.DELTA), "delta")
    (final,) = await collect(engine, PROMPT, greedy(RequestOutputKind.FINAL_ONLY), "final")
    assert len(deltas) > 1 and deltas[-1].finished and not any(o.finished for o in deltas[:-1])
    assert "".join(o.outputs[0].text for o in deltas) == final.outputs[0].text
    assert [t for o in deltas for t in o.outputs[0].token_ids] == final.outputs[0].token_ids
    assert final.finished and final.outputs[0].finish_reason == "length"


async def test_cumulative_outputs_grow(engine: AsyncLLM) -> None:
    outputs = await collect(engine, PROMPT, greedy(RequestOutputKind.CUMULATIVE), "cumulative")
    texts = [o.outputs[0].text for o in outputs]
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    assert len(outputs[-1].outputs[0].token_ids) == 12


async def test_concurrent_requests_match_each_alone(engine: AsyncLLM) -> None:
    prompts = ["def fibonacci(n):", "Once upon a time", [1, 504, 3, 77, 1090, 42], "1, 2, 3,"]
    params = greedy(RequestOutputKind.FINAL_ONLY)
    alone = [(await collect(engine, p, params, f"alone-{i}"))[0].outputs[0].token_ids for i, p in enumerate(prompts)]
    together = await asyncio.gather(*(collect(engine, p, params, f"together-{i}") for i, p in enumerate(prompts)))
    assert [outputs[0].outputs[0].token_ids for outputs in together] == alone


async def test_n_sequences_fan_in(engine: AsyncLLM) -> None:
    params = SamplingParams(n=2, seed=1, max_tokens=6, output_kind=RequestOutputKind.FINAL_ONLY)
    (output,) = await collect(engine, PROMPT, params, "n2")
    assert [c.index for c in output.outputs] == [0, 1] and all(len(c.token_ids) == 6 for c in output.outputs)


async def test_stop_string_finishes_the_request_in_the_core(engine: AsyncLLM) -> None:
    params = greedy(RequestOutputKind.CUMULATIVE, max_tokens=40, stop=["8"])
    outputs = await collect(engine, "1, 2, 3, 4,", params, "stop")
    completion = outputs[-1].outputs[0]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", "8") and "8" not in completion.text
    await wait_until_all_free(engine)


async def test_bad_input_raises_before_anything_is_sent(engine: AsyncLLM) -> None:
    with pytest.raises(ValueError, match="prompt is empty"):
        await collect(engine, "", greedy(RequestOutputKind.DELTA), "bad-0")
    with pytest.raises(ValueError, match="max_model_len"):
        await collect(engine, [1] * 600, greedy(RequestOutputKind.DELTA), "bad-1")
    with pytest.raises(ValueError, match="logprobs"):
        await collect(engine, PROMPT, greedy(RequestOutputKind.DELTA, logprobs=50), "bad-2")
    assert not engine.output_processor.has_unfinished_requests()
    await wait_until_all_free(engine)


async def test_duplicate_request_id_is_refused(engine: AsyncLLM) -> None:
    first = engine.generate(PROMPT, greedy(RequestOutputKind.DELTA, max_tokens=200), "twice")
    await first.__anext__()
    with pytest.raises(ValueError, match="already in use"):
        await collect(engine, PROMPT, greedy(RequestOutputKind.DELTA), "twice")
    await first.aclose()
    await wait_until_all_free(engine)


async def test_cancelling_the_consumer_aborts_and_frees_blocks(engine: AsyncLLM) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(PROMPT, greedy(RequestOutputKind.DELTA, max_tokens=400), "cancelled"):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    stats = await engine.get_scheduler_stats()
    assert stats.num_running_reqs == 1 and stats.kv_cache_usage > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until_all_free(engine)


async def test_breaking_out_of_the_stream_aborts(engine: AsyncLLM) -> None:
    async for _ in engine.generate(PROMPT, greedy(RequestOutputKind.DELTA, max_tokens=400), "break"):
        break
    await wait_until_all_free(engine)


async def test_abort_ends_the_stream_with_finish_reason_abort(engine: AsyncLLM) -> None:
    outputs = []
    async for output in engine.generate(PROMPT, greedy(RequestOutputKind.DELTA, max_tokens=400), "aborted"):
        outputs.append(output)
        if len(outputs) == 2:
            await engine.abort("aborted")
    assert 3 <= len(outputs) < 400 and outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    assert outputs[-1].outputs[0].finish_reason == "abort"
    await wait_until_all_free(engine)
    assert await engine.reset_prefix_cache() is True


async def test_an_aborted_request_of_n_sequences_returns_what_each_had(engine: AsyncLLM) -> None:
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=400, output_kind=RequestOutputKind.FINAL_ONLY)
    stats: list[IterationStats] = []
    engine.add_stat_logger(lambda iteration, scheduler: stats.append(iteration))

    async def abort_soon() -> None:
        while engine.output_processor.request_states.get("0_n-aborted") is None or not (
                engine.output_processor.request_states["0_n-aborted"].output_token_ids):
            await asyncio.sleep(0.01)
        await engine.abort("n-aborted")

    aborter = asyncio.create_task(abort_soon())
    outputs = [output async for output in engine.generate(PROMPT, params, "n-aborted")]
    await aborter
    (final,) = outputs
    assert final.finished and [c.finish_reason for c in final.outputs] == ["abort", "abort"]
    assert final.outputs[0].token_ids and final.outputs[0].text
    assert [f.finish_reason for s in stats for f in s.finished_requests if f.request_id == "n-aborted"] == ["abort"]
    await wait_until_all_free(engine)


async def test_stat_logger_sees_latencies_and_finished_requests(engine: AsyncLLM) -> None:
    seen: list[tuple[IterationStats, SchedulerStatsMessage | None]] = []
    engine.add_stat_logger(lambda iteration, scheduler: seen.append((iteration, scheduler)))
    prompt_ids = engine.get_tokenizer().encode(PROMPT)
    await collect(engine, prompt_ids, greedy(RequestOutputKind.DELTA, max_tokens=8), "stats")
    assert sum(len(s.time_to_first_tokens) for s, _ in seen) == 1
    assert sum(s.num_generation_tokens for s, _ in seen) == 8
    assert sum(s.num_prompt_tokens for s, _ in seen) == len(prompt_ids)
    assert len([t for s, _ in seen for t in s.inter_token_latencies if t >= 0]) == 7
    (finished,) = [f for s, _ in seen for f in s.finished_requests]
    assert (finished.request_id, finished.finish_reason, finished.num_generation_tokens) == ("stats", "length", 8)
    assert finished.num_prompt_tokens == len(prompt_ids) and finished.e2e_latency > 0
    assert seen[-1][1] is not None and engine.scheduler_stats is not None


async def test_engine_death_fails_pending_and_new_requests(smollm_path: Path) -> None:
    engine = AsyncLLM.from_engine_args(EngineArgs(model=str(smollm_path), **ENGINE_KWARGS))
    try:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.generate(PROMPT, greedy(RequestOutputKind.DELTA, max_tokens=400), "doomed"):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        assert engine.is_running and not engine.errored
        await engine.check_health()
        os.kill(engine.engine_core.engine.process.pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(EngineDeadError, match="killed by SIGKILL"):
            await asyncio.wait_for(task, timeout=10)
        assert time.monotonic() - killed < 5
        assert engine.errored and not engine.is_running
        with pytest.raises(EngineDeadError):
            await collect(engine, PROMPT, greedy(RequestOutputKind.DELTA), "after")
        with pytest.raises(EngineDeadError):
            await engine.check_health()
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(engine.get_scheduler_stats(), timeout=10)
    finally:
        engine.shutdown()
    assert not os.path.exists(engine.engine_core.engine.ipc_dir)
