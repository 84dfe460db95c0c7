"""`MultiprocExecutor`: the worker in its own process gives the same tokens; a dead, stopped or failing worker
makes the engine fail within seconds (never a hang), and shutdown leaves no process or shared memory behind."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from ghost_step import ghost_step

from pagoda import LLM, SamplingParams, StructuredOutputsParams
from pagoda.engine.exceptions import EngineDeadError
from pagoda.worker.executor_errors import ExecutorFailedError
from pagoda.worker.multiproc_executor import MultiprocExecutor

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
GREEDY = SamplingParams(temperature=0, max_tokens=12)
# A death or stop must end the engine well within this.
FAIL_DEADLINE_S = 15.0


def mp_llm(path: Path, **kwargs: object) -> LLM:
    return LLM(str(path), dtype="float32", kv_cache_memory=64 << 20, max_model_len=512,
               distributed_executor_backend="mp", **kwargs)


def worker_processes(llm: LLM) -> list[psutil.Process]:
    executor = llm.llm_engine.engine_core.engine_core.executor
    assert isinstance(executor, MultiprocExecutor)
    return [psutil.Process(worker.process.pid) for worker in executor._workers]


def shm_segments() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("psm_")}


def test_the_worker_process_gives_the_in_process_workers_tokens(smollm_path: Path, smollm_llm) -> None:
    before = shm_segments()
    llm = mp_llm(smollm_path)
    workers = worker_processes(llm)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    finally:
        llm.shutdown()
    want = [o.outputs[0].token_ids for o in smollm_llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert got == want
    assert not any(worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE for worker in workers)
    assert shm_segments() <= before, "shared memory left behind"


def test_the_engine_process_can_run_worker_processes(smollm_path: Path, smollm_llm) -> None:
    llm = mp_llm(smollm_path, engine_mode="mp")
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    finally:
        llm.shutdown()
    assert got == [o.outputs[0].token_ids for o in smollm_llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_worker_killed_or_stopped_mid_generation_fails_the_engine_within_seconds(smollm_path: Path,
                                                                                   how: str) -> None:
    llm = mp_llm(smollm_path, engine_mode="mp")
    engine = llm.llm_engine.engine_core.engine
    outcome: list[BaseException] = []

    def generate() -> None:
        try:
            llm.generate(PROMPTS * 8, SamplingParams(max_tokens=400, ignore_eos=True), use_tqdm=False)
        except BaseException as error:  # the outcome under test
            outcome.append(error)

    engine_proc = psutil.Process(engine.process.pid)
    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not [p for p in engine_proc.children() if "spawn_main" in " ".join(p.cmdline())]:
            assert time.monotonic() < deadline, "no worker process"
            time.sleep(0.1)
        time.sleep(1.0)  # generation under way
        (worker,) = [p for p in engine_proc.children() if "spawn_main" in " ".join(p.cmdline())]
        hit = time.monotonic()
        worker.send_signal(getattr(signal, how))
        thread.join(FAIL_DEADLINE_S)
        assert not thread.is_alive(), f"generate still running {FAIL_DEADLINE_S} s after {how} of the worker"
        assert outcome and isinstance(outcome[0], EngineDeadError), outcome
        engine.process.join(10)
        assert not engine.is_alive(), "the engine process outlived its worker"
        assert time.monotonic() - hit < FAIL_DEADLINE_S
    finally:
        if psutil.pid_exists(worker.pid):
            worker.kill()
        llm.shutdown()


def test_an_exception_inside_execute_model_fails_the_executor(smollm_path: Path) -> None:
    llm = mp_llm(smollm_path)
    executor = llm.llm_engine.engine_core.engine_core.executor
    (worker,) = worker_processes(llm)
    try:
        with pytest.raises(ExecutorFailedError, match="ghost"):
            executor.execute_model(ghost_step())
        worker.wait(10)  # a worker whose call raised ends
        with pytest.raises(ExecutorFailedError):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()


def test_a_constrained_request_is_honoured_through_the_worker_process(smollm_path: Path) -> None:
    # The grammar bitmask travels in the SchedulerOutput, through the shared-memory queue.
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 5}},
              "required": ["ok", "n"]}
    llm = mp_llm(smollm_path)
    try:
        outputs = llm.generate(["JSON:", "An answer:"], SamplingParams(
            max_tokens=40, temperature=1.0, seed=3, structured_outputs=StructuredOutputsParams(json=schema)),
            use_tqdm=False)
    finally:
        llm.shutdown()
    for output in outputs:
        value = json.loads(output.outputs[0].text)
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 1 <= value["n"] <= 5
