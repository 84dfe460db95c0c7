"""`RayExecutor`: the ranks as Ray actors on a local Ray instance bound to loopback (usage stats off).

TP=2 (Gemma 3 270M) and TP=3 (SmolLM2) greedy tokens equal one rank's in float32, over shared memory and over
the TCP queues other nodes use, and so do two pipeline stages; a rank killed, stopped, or raising inside `execute_model` fails the engine within
seconds; shutdown leaves no actor behind.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from ghost_step import ghost_step

from pagoda import LLM, SamplingParams
from pagoda.worker.executor_errors import ExecutorFailedError

ray = pytest.importorskip("ray")
from pagoda.worker.ray_executor import LOCAL_RAY_IP, RayExecutor, _death_reason  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
GREEDY = SamplingParams(temperature=0, max_tokens=16)
FAIL_DEADLINE_S = 15.0


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """One Ray instance for the module (a start costs ~5 s); engines find it through RAY_ADDRESS."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # 4 CPUs of accounting on 2 cores: TP=3 asks for one each; the test pins one thread per rank anyway.
    context = ray.init(num_cpus=4, include_dashboard=False, _node_ip_address=LOCAL_RAY_IP, log_to_driver=False)
    address = context.address_info["gcs_address"]
    assert address.startswith("127."), f"Ray must stay on loopback, got {address}"
    os.environ["RAY_ADDRESS"] = address
    try:
        yield address
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        ray.shutdown()


def ray_llm(path: Path, tp: int, **kwargs: object) -> LLM:
    return LLM(str(path), dtype="float32", kv_cache_memory=64 << 20, max_model_len=512, tensor_parallel_size=tp,
               distributed_executor_backend="ray", **kwargs)


def executor_of(llm: LLM) -> RayExecutor:
    executor = llm.llm_engine.engine_core.engine_core.executor
    assert isinstance(executor, RayExecutor)
    return executor


def greedy_tokens(llm: LLM) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def one_rank_tokens(model_paths: dict[str, Path]) -> dict[str, list[list[int]]]:
    tokens = {}
    for model, path in model_paths.items():
        llm = LLM(str(path), dtype="float32", kv_cache_memory=64 << 20, max_model_len=512)
        tokens[model] = greedy_tokens(llm)
        llm.shutdown()
    return tokens


@pytest.mark.parametrize(("model", "tp", "transport"),
                         [("gemma3-270m", 2, "shm"), ("smollm2-135m", 3, "shm"), ("gemma3-270m", 2, "tcp")])
def test_ray_ranks_give_one_ranks_greedy_tokens(ray_cluster: str, model_paths: dict[str, Path],
                                                one_rank_tokens: dict[str, list[list[int]]], model: str, tp: int,
                                                transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if transport == "tcp":  # every rank treated as on another node: the multi-node queues
        monkeypatch.setenv("PAGODA_RAY_TCP_ONLY", "1")
    llm = ray_llm(model_paths[model], tp)
    executor = executor_of(llm)
    pids = [pid for pid in executor.worker_pids if pid is not None]
    try:
        if transport == "tcp":
            assert executor._broadcast.handle.num_remote_readers == tp
            assert executor._broadcast.handle.remote_address.startswith(f"tcp://{LOCAL_RAY_IP}:")
        else:
            assert executor._broadcast.handle.num_remote_readers == 0
        assert greedy_tokens(llm) == one_rank_tokens[model]
    finally:
        llm.shutdown()
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids):
        assert time.monotonic() < deadline, "a Ray actor outlived shutdown"
        time.sleep(0.2)


def test_ray_pipeline_stages_give_one_ranks_greedy_tokens(ray_cluster: str, model_paths: dict[str, Path],
                                                         one_rank_tokens: dict[str, list[list[int]]]) -> None:
    llm = ray_llm(model_paths["gemma3-270m"], 1, pipeline_parallel_size=2, max_num_batched_tokens=8)
    try:
        assert len(executor_of(llm).worker_pids) == 2
        assert greedy_tokens(llm) == one_rank_tokens["gemma3-270m"]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_ray_rank_killed_or_stopped_mid_generation_fails_the_engine_within_seconds(
        ray_cluster: str, gemma_path: Path, how: str) -> None:
    llm = ray_llm(gemma_path, 2)
    pid = executor_of(llm).worker_pids[1]
    outcome: list[BaseException] = []

    def generate() -> None:
        try:
            llm.generate(PROMPTS * 8, SamplingParams(max_tokens=400, ignore_eos=True), use_tqdm=False)
        except BaseException as error:  # the outcome under test
            outcome.append(error)

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    try:
        time.sleep(2.0)  # generation under way
        os.kill(pid, getattr(signal, how))
        thread.join(FAIL_DEADLINE_S)
        assert not thread.is_alive(), f"generate still running {FAIL_DEADLINE_S} s after {how} of a Ray rank"
        assert outcome and isinstance(outcome[0], ExecutorFailedError), outcome
        assert "worker 1" in str(outcome[0])
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGKILL)
        llm.shutdown()


def test_an_exception_inside_execute_model_on_a_ray_rank_fails_the_executor(ray_cluster: str,
                                                                          gemma_path: Path) -> None:
    llm = ray_llm(gemma_path, 2)
    executor = executor_of(llm)
    try:
        with pytest.raises(ExecutorFailedError, match="ghost"):
            executor.execute_model(ghost_step())
        with pytest.raises(ExecutorFailedError):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()


def test_a_rank_that_raised_is_reported_with_what_it_raised_not_rays_wrapper() -> None:
    # Whichever rank's failure the executor sees first, the user must read the actor's own exception.
    wrapped = ray.exceptions.RayTaskError("RayRank.serve", "Traceback ...\nKeyError: 'ghost'", KeyError("ghost"))
    assert _death_reason(wrapped) == "raised KeyError: 'ghost'"
    died = ray.exceptions.ActorDiedError()
    assert _death_reason(died).startswith("died: ActorDiedError: ")


def test_a_cluster_too_small_for_the_ranks_is_named(ray_cluster: str, smollm_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import pagoda.worker.ray_executor as ray_executor

    monkeypatch.setattr(ray_executor, "_PLACEMENT_TIMEOUT_S", 3.0)
    monkeypatch.setattr(os, "cpu_count", lambda: 12)  # 4 threads per rank x 3 ranks > the cluster's 4 CPUs
    with pytest.raises(RuntimeError, match=r"cannot place 3 ranks of 4 CPU\(s\) each .* it has 4 CPUs in all"):
        ray_llm(smollm_path, 3)
