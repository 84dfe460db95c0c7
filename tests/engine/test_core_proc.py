"""EngineCore in its own process: plain msgpack on the sockets, same tokens as in-process, errors, shutdown."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import msgspec
import pytest
import zmq

from pagoda import LLM, SamplingParams
from pagoda.child_allocator import jemalloc_library
from pagoda.core.outputs import FinishReason
from pagoda.engine.arg_utils import EngineArgs
from pagoda.engine.core_client import SyncMPClient
from pagoda.engine.core_proc import run_engine_core
from pagoda.engine.exceptions import EngineDeadError
from pagoda.engine.messages import EngineCoreRequest, EngineCoreRequestType, UtilityRequest

pytestmark = pytest.mark.slow

# 91 blocks of 16 fp32 tokens: a few 512-token requests at once, light on memory.
ENGINE_KWARGS = {"dtype": "float32", "kv_cache_memory": 64 << 20, "max_model_len": 512}
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def mp_llm(smollm_path: Path):
    llm = LLM(str(smollm_path), engine_mode="mp", **ENGINE_KWARGS)
    yield llm
    llm.shutdown()


def _request(request_id: str, prompt_token_ids: list[int], max_tokens: int = 4) -> EngineCoreRequest:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return EngineCoreRequest(
        request_id=request_id, prompt_token_ids=prompt_token_ids, sampling_params=params,
        eos_token_id=2, arrival_time=0.0,
    )


def test_engine_speaks_plain_msgpack(smollm_path: Path, tmp_path: Path) -> None:
    """A hand-written client with a schema-free msgpack decoder drives a real engine process."""
    config = EngineArgs(model=str(smollm_path), **ENGINE_KWARGS).create_config()
    context = zmq.Context()
    input_socket = context.socket(zmq.ROUTER)
    input_socket.bind(f"ipc://{tmp_path}/input")
    output_socket = context.socket(zmq.PULL)
    output_socket.bind(f"ipc://{tmp_path}/output")
    process = multiprocessing.get_context("spawn").Process(
        target=run_engine_core,
        args=(msgspec.msgpack.encode(config), f"ipc://{tmp_path}/input", f"ipc://{tmp_path}/output"),
        daemon=True,
    )
    process.start()
    try:
        assert input_socket.poll(120_000), "no handshake from the engine process"
        identity, handshake = input_socket.recv_multipart()
        num_kv_blocks, error = msgspec.msgpack.decode(handshake)
        assert num_kv_blocks > 1 and error is None
        request = msgspec.to_builtins(_request("raw-0", [1, 504, 3, 77], max_tokens=5))
        input_socket.send_multipart([identity, bytes((EngineCoreRequestType.ADD,)), msgspec.msgpack.encode(request)])
        token_ids: list[int] = []
        while True:
            assert output_socket.poll(60_000)
            outputs, *_ = msgspec.msgpack.decode(output_socket.recv())
            (output,) = outputs
            assert output["request_id"] == "raw-0"
            token_ids += output["new_token_ids"]
            if "finish_reason" in output:
                break
        assert output["finish_reason"] == FinishReason.LENGTH and len(token_ids) == 5
        call = msgspec.msgpack.encode(msgspec.to_builtins(UtilityRequest(call_id=9, method="reset_prefix_cache")))
        input_socket.send_multipart([identity, bytes((EngineCoreRequestType.UTILITY,)), call])
        assert output_socket.poll(60_000)
        outputs, stats, utility_output, mm_cache_misses = msgspec.msgpack.decode(output_socket.recv())
        assert outputs == [] and stats is None and utility_output == [9, True, None] and mm_cache_misses is None
    finally:
        process.terminate()
        process.join(10)
        context.destroy(linger=0)
    assert process.exitcode == 0  # SIGTERM is a clean shutdown


def test_same_greedy_tokens_as_in_process(mp_llm: LLM, smollm_llm: LLM) -> None:
    prompts = ["The capital of France is", "def fibonacci(n):", [1, 504, 3, 77, 1090, 42]]
    expected = [o.outputs[0].token_ids for o in smollm_llm.generate(prompts, GREEDY, use_tqdm=False)]
    outputs = mp_llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert all(o.outputs[0].text for o in outputs)


def test_bad_requests_fail_alone_and_the_engine_keeps_serving(mp_llm: LLM, smollm_llm: LLM) -> None:
    client = mp_llm.llm_engine.engine_core
    assert isinstance(client, SyncMPClient)
    # Sent straight to the core, past the InputProcessor's checks: rejected by add_request ...
    client.add_request(_request("empty", []))
    (output,) = client.get_output().outputs
    assert (output.request_id, output.finish_reason) == ("empty", FinishReason.ERROR)
    assert "empty" in output.error
    # ... or failing inside the step (a token id outside the embedding table).
    client.add_request(_request("out-of-vocab", [1, 10**7]))
    (output,) = client.get_output().outputs
    assert (output.request_id, output.finish_reason) == ("out-of-vocab", FinishReason.ERROR)
    assert output.error.startswith("engine step failed")
    stats = client.get_stats()
    assert (stats.num_running_reqs, stats.num_waiting_reqs, stats.kv_cache_usage) == (0, 0, 0.0)
    prompt = ["The capital of France is"]
    assert mp_llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids == (
        smollm_llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    )


@pytest.mark.skipif(jemalloc_library() is None or bool(os.environ.get("LD_PRELOAD")),
                    reason="jemalloc is not installed, or the user preloads an allocator of their own")
def test_engine_process_runs_on_jemalloc(mp_llm: LLM) -> None:
    pid = mp_llm.llm_engine.engine_core.engine.process.pid
    assert "libjemalloc" in Path(f"/proc/{pid}/maps").read_text()
    assert "LD_PRELOAD" not in os.environ


def test_utility_calls(mp_llm: LLM) -> None:
    client = mp_llm.llm_engine.engine_core
    mp_llm.generate(["Once upon a time, in a land far away, there lived"], GREEDY, use_tqdm=False)
    stats = client.get_stats()
    assert stats.kv_cache_usage == 0.0 and stats.prefix_cache_queries > 0
    assert mp_llm.reset_prefix_cache() is True
    with pytest.raises(RuntimeError, match="unknown utility method 'nope'"):
        client._call_utility("nope", bool)


def test_start_up_failure_reports_the_engine_error(smollm_path: Path) -> None:
    with pytest.raises(RuntimeError, match="failed to start: ValueError: kv_cache_memory"):
        LLM(str(smollm_path), engine_mode="mp", dtype="float32", kv_cache_memory=1 << 20, max_model_len=512)


def test_engine_death_fails_requests_then_shutdown_cleans_up(mp_llm: LLM) -> None:
    client = mp_llm.llm_engine.engine_core
    engine = client.engine
    assert sorted(os.listdir(engine.ipc_dir)) == ["input", "output"]
    client.add_request(_request("doomed", [1, 504, 3], max_tokens=400))
    client.get_output()
    os.kill(engine.process.pid, signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(EngineDeadError, match="killed by SIGKILL"):
        while True:  # outputs already on their way may still arrive first
            client.get_output()
    assert time.monotonic() - killed < 5
    with pytest.raises(EngineDeadError):
        mp_llm.generate(["Hello"], GREEDY, use_tqdm=False)
    mp_llm.shutdown()
    assert not engine.process.is_alive()
    assert not os.path.exists(engine.ipc_dir)
