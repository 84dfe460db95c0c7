"""Every message that crosses the engine-process boundary survives msgpack, and is plain msgpack on the wire."""

from __future__ import annotations

import msgspec
import pytest

from pagoda.config import CacheConfig, ModelConfig, PagodaConfig, SchedulerConfig
from pagoda.core.model_runner_output import LogprobsLists
from pagoda.core.outputs import EngineCoreOutput, FinishReason
from pagoda.engine.messages import (
    EngineCoreHandshake,
    EngineCoreOutputs,
    EngineCoreRequest,
    SchedulerStatsMessage,
    UtilityOutput,
    UtilityRequest,
)
from pagoda.sampling_params import RequestOutputKind, SamplingParams

STATS = SchedulerStatsMessage(
    num_running_reqs=2, num_waiting_reqs=1, kv_cache_usage=0.25,
    prefix_cache_queries=40, prefix_cache_hits=16, num_preemptions=3,
)
LOGPROBS = LogprobsLists(token_ids=[[5, 6, 7]], logprobs=[[-0.1, -2.5, -3.0]], ranks=[1])

MESSAGES = [
    EngineCoreRequest(
        request_id="req-1",
        prompt_token_ids=[1, 2, 3],
        sampling_params=SamplingParams(
            temperature=0.7, top_p=0.9, top_k=20, seed=3, max_tokens=8, stop=["\n"], stop_token_ids=[7],
            logprobs=2, output_kind=RequestOutputKind.DELTA,
        ),
        eos_token_id=2,
        arrival_time=12.5,
        priority=-1,
        cache_salt="salt",
    ),
    EngineCoreRequest(
        request_id="req-2", prompt_token_ids=[4], sampling_params=SamplingParams(), eos_token_id=None, arrival_time=0.0
    ),
    UtilityRequest(call_id=7, method="get_stats"),
    UtilityOutput(call_id=7, result=True),
    UtilityOutput(call_id=8, error="ValueError: no"),
    EngineCoreHandshake(num_kv_blocks=91),
    EngineCoreHandshake(error="ValueError: the KV cache is too small"),
    STATS,
    EngineCoreOutputs(),
    EngineCoreOutputs(
        outputs=[
            EngineCoreOutput(request_id="a", new_token_ids=[5], new_logprobs=LOGPROBS, new_prompt_logprobs=LOGPROBS),
            EngineCoreOutput(request_id="b", new_token_ids=[9, 2], finish_reason=FinishReason.STOP, stop_reason=2,
                             num_cached_tokens=16),
            EngineCoreOutput(request_id="c", new_token_ids=[], finish_reason=FinishReason.ERROR, error="boom"),
        ],
        scheduler_stats=STATS,
    ),
    EngineCoreOutputs(utility_output=UtilityOutput(call_id=1, result=False)),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: msgspec.Struct) -> None:
    data = msgspec.msgpack.encode(message)
    assert msgspec.msgpack.decode(data, type=type(message)) == message


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_wire_bytes_are_plain_msgpack(message: msgspec.Struct) -> None:
    data = msgspec.msgpack.encode(message)
    # A schema-free decoder reads them back as builtins, and no pickle stream (PROTO opcode 0x80) starts here.
    assert msgspec.msgpack.decode(data) == msgspec.to_builtins(message)
    assert data[:1] != b"\x80"


def test_utility_result_struct_converts_back() -> None:
    answer = msgspec.msgpack.decode(msgspec.msgpack.encode(UtilityOutput(call_id=1, result=STATS)), type=UtilityOutput)
    assert msgspec.convert(answer.result, SchedulerStatsMessage) == STATS


def test_config_tree_round_trip() -> None:
    config = PagodaConfig(
        ModelConfig(model="m", path="/tmp/m", architecture="LlamaForCausalLM", dtype="float32",
                    max_model_len=512, vocab_size=100, eos_token_ids=(2, 7), identity="llama-0123456789abcdef",
                    seed=1),
        CacheConfig(block_size=32, kv_cache_memory=1 << 20),
        SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=512, policy="priority"),
    )
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(config), type=PagodaConfig) == config
