"""Pipeline parallelism through the engine: `LLM(..., pipeline_parallel_size=N)` splits the layers over N worker
processes (gloo, point to point), keeps a batch in flight per stage, and gives one rank's greedy tokens in float32
on the default models' real weights; a stage that dies fails the engine within seconds.

Each stage runs the same operations on the same rows as one rank does (no all-reduce changes a summation
order), so the tokens must be identical.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import pytest

from pagoda import LLM, SamplingParams
from pagoda.engine.exceptions import EngineDeadError

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Water boils at a temperature of",
           "The three primary colours are", "In 1969, the first person to walk on the Moon", "import numpy as np",
           "My favourite recipe for bread"]
GREEDY = SamplingParams(temperature=0, max_tokens=24)
# A small token budget splits the prompts over several batches, so the stages really overlap.
SETTINGS = dict(dtype="float32", kv_cache_memory=64 << 20, max_model_len=512, max_num_batched_tokens=24)
FAIL_DEADLINE_S = 15.0


def _tokens(llm: LLM, prompts: list[str], params: SamplingParams) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize(("model", "pp"), [("gemma3-270m", 2), ("smollm2-135m", 3)])
def test_pipeline_greedy_tokens_equal_one_rank_with_batches_in_flight(model: str, pp: int,
                                                                      model_paths: dict[str, Path]) -> None:
    one = LLM(str(model_paths[model]), **SETTINGS)
    want = _tokens(one, PROMPTS, GREEDY)
    one.shutdown()
    staged = LLM(str(model_paths[model]), pipeline_parallel_size=pp, **SETTINGS)
    core = staged.llm_engine.engine_core.engine_core
    in_flight: list[int] = []
    submit = core.executor.submit_step

    def counting_submit(scheduler_output):
        in_flight.append(len(core._batch_queue) + 1)  # this batch and those still out
        return submit(scheduler_output)

    core.executor.submit_step = counting_submit
    try:
        assert staged.config.parallel_config.executor_backend == "mp"
        assert staged.config.parallel_config.world_size == pp
        got = _tokens(staged, PROMPTS, GREEDY)
    finally:
        staged.shutdown()
    assert got == want
    assert max(in_flight) == pp, f"the batch queue never filled the {pp} stages: {sorted(set(in_flight))}"


def test_pipeline_seeded_sampling_and_greedy_under_preemption_equal_one_rank(gemma_path: Path) -> None:
    seeded = [SamplingParams(temperature=0.8, top_p=0.9, seed=seed, max_tokens=24) for seed in range(len(PROMPTS))]
    # A KV cache too small for every request at once (101 blocks; each request needs 18 at its end):
    # requests are preempted and resumed, some while a batch that holds them is in flight.
    small = dict(SETTINGS, kv_cache_memory=19 << 19, max_model_len=256, max_num_batched_tokens=64)
    long_greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    tokens, preempted = {}, {}
    for pp in (1, 2):
        llm = LLM(str(gemma_path), pipeline_parallel_size=pp, **SETTINGS)
        try:
            tokens["seeded", pp] = _tokens(llm, PROMPTS, seeded)
        finally:
            llm.shutdown()
        llm = LLM(str(gemma_path), pipeline_parallel_size=pp, **small)
        try:
            tokens["greedy", pp] = _tokens(llm, PROMPTS, long_greedy)
            preempted[pp] = llm.llm_engine.engine_core.engine_core.scheduler.num_preemptions
        finally:
            llm.shutdown()
    assert preempted[1] > 0 and preempted[2] > 0, f"the cache was big enough, nothing was preempted: {preempted}"
    assert tokens["seeded", 2] == tokens["seeded", 1]
    assert tokens["greedy", 2] == tokens["greedy", 1]


def test_a_stage_killed_mid_generation_fails_the_engine_within_seconds(gemma_path: Path) -> None:
    llm = LLM(str(gemma_path), pipeline_parallel_size=2, engine_mode="mp", **SETTINGS)
    engine = llm.llm_engine.engine_core.engine
    outcome: list[BaseException] = []

    def generate() -> None:
        try:
            llm.generate(PROMPTS * 4, SamplingParams(max_tokens=400, ignore_eos=True), use_tqdm=False)
        except BaseException as error:  # the outcome under test
            outcome.append(error)

    engine_proc = psutil.Process(engine.process.pid)
    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    stages: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 60
        while len(stages) < 2:
            assert time.monotonic() < deadline, "no worker processes"
            time.sleep(0.1)
            stages = [p for p in engine_proc.children() if "spawn_main" in " ".join(p.cmdline())]
        time.sleep(1.0)  # generation under way
        hit = time.monotonic()
        stages[0].kill()  # the first stage: the last one, which answers, is left waiting for its input
        thread.join(FAIL_DEADLINE_S)
        assert not thread.is_alive(), f"generate still running {FAIL_DEADLINE_S} s after the first stage died"
        assert outcome and isinstance(outcome[0], EngineDeadError), outcome
        engine.process.join(10)
        assert not engine.is_alive(), "the engine process outlived its stage"
        assert time.monotonic() - hit < FAIL_DEADLINE_S
    finally:
        for stage in stages:
            if psutil.pid_exists(stage.pid):
                stage.kill()
        llm.shutdown()


def test_settings_pipeline_stages_cannot_run_are_refused_up_front(smollm_path: Path) -> None:
    with pytest.raises(ValueError, match="exceeds the model's 30 layers"):
        LLM(str(smollm_path), pipeline_parallel_size=31)
    with pytest.raises(ValueError, match="--kv-store"):
        LLM(str(smollm_path), pipeline_parallel_size=2, kv_store="cpu:64MiB")
    with pytest.raises(ValueError, match="pipeline_parallel_size must be positive"):
        LLM(str(smollm_path), pipeline_parallel_size=0)
