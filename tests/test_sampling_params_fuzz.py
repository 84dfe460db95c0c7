"""Hypothesis fuzzing of `SamplingParams`: any value for any field is either refused with a ValueError naming
the field, or accepted with every field of its declared type; and accepted parameters, run through a real
engine (next to a reference request), either fail alone with a ValueError or generate, never breaking it."""

from __future__ import annotations

import math

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pagoda import SamplingParams
from pagoda.sampling_params import RequestOutputKind, StructuredOutputsParams

FIELDS = msgspec.structs.fields(SamplingParams)
NAMES = [field.name for field in FIELDS]

anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-(2**70), 2**70) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.integers(-3, 300) | st.text(max_size=3), inner,
                                                                 max_size=3),
    max_leaves=6,
)
values = st.dictionaries(st.sampled_from(NAMES), anything, max_size=4)

# Values of each field's own type, in and out of range: most get past the type checks to the range checks.
edge_ints = st.integers(-3, 300) | st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**9])
edge_floats = st.floats(-3, 3) | st.sampled_from([math.nan, math.inf, -math.inf, 1e300])
token_ids = st.integers(-2, 60_000)
NEAR = {
    **dict.fromkeys(["n", "top_k", "min_tokens"], edge_ints),
    **dict.fromkeys(["seed", "max_tokens", "logprobs", "prompt_logprobs"], st.none() | edge_ints),
    **dict.fromkeys(["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"], edge_floats),
    **dict.fromkeys(["ignore_eos", "include_stop_str_in_output", "skip_special_tokens"], st.booleans()),
    "stop": st.lists(st.text(max_size=4), max_size=3),
    "stop_token_ids": st.lists(token_ids, max_size=3),
    "logit_bias": st.none() | st.dictionaries(token_ids, st.floats(-200, 200), max_size=3),
    "output_kind": st.sampled_from(RequestOutputKind),
    "structured_outputs": st.none() | st.sampled_from([
        StructuredOutputsParams(regex="[a-z]{1,8}"), StructuredOutputsParams(choice=["yes", "no"]),
        StructuredOutputsParams(json_object=True)]),
}
assert set(NEAR) == set(NAMES)
near_values = st.fixed_dictionaries({}, optional={name: strategy for name, strategy in NEAR.items()})


def _build(kwargs: dict) -> SamplingParams | None:
    try:
        return SamplingParams(**kwargs)
    except ValueError as error:
        assert str(error).startswith("SamplingParams"), error
        return None


@settings(max_examples=600, deadline=None, database=None, derandomize=True)
@given(values | near_values)
def test_any_value_is_refused_naming_the_field_or_accepted_with_its_type(kwargs: dict) -> None:
    params = _build(kwargs)
    if params is None:
        return
    # Accepted means well-typed: a strict round trip through msgpack (as to the engine process) agrees.
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=SamplingParams)
    assert decoded == params
    assert isinstance(params.temperature, float) and type(params.n) is int and params.n >= 1


@pytest.fixture(scope="module")
def engine(smollm_path):
    from pagoda import LLM

    llm = LLM(str(smollm_path), dtype="float32", max_model_len=256, kv_cache_memory=32 << 20)
    yield llm
    llm.shutdown()


@pytest.mark.slow
def test_accepted_parameters_never_break_the_engine(engine) -> None:
    reference_params = SamplingParams(temperature=0.0, max_tokens=4)
    reference = engine.generate(["Hello"], reference_params, use_tqdm=False)[0].outputs[0].token_ids
    ran = refused = 0

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(near_values)
    def run(kwargs: dict) -> None:
        nonlocal ran, refused
        params = _build(kwargs)
        if params is None:
            return
        # Short runs: the fuzz is about the parameters, not about generating long texts.
        max_tokens = min(params.max_tokens or 4, 4)
        params = params.clone(max_tokens=max_tokens, min_tokens=min(params.min_tokens, max_tokens),
                              n=min(params.n, 3), output_kind=RequestOutputKind.FINAL_ONLY)
        try:
            outputs = engine.generate(["Hello", "Hi"], [reference_params, params], use_tqdm=False)
        except ValueError:
            refused += 1
            return
        ran += 1
        assert outputs[0].outputs[0].token_ids == reference
        assert all(o.finish_reason in ("stop", "length") for o in outputs[1].outputs)

    run()
    assert ran + refused > 10
    assert engine.generate(["Hello"], reference_params, use_tqdm=False)[0].outputs[0].token_ids == reference
