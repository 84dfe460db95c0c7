"""Bad input gets a ValueError naming the problem, and the engine keeps serving the next call."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams

pytestmark = pytest.mark.slow

OK = SamplingParams(temperature=0.0, max_tokens=4)


@pytest.mark.parametrize(
    "make_params, message",
    [
        (lambda: SamplingParams(max_tokens=0), "max_tokens"),
        (lambda: SamplingParams(temperature=-0.5), "temperature"),
        (lambda: SamplingParams(top_p=0.0), "top_p"),
        (lambda: SamplingParams(top_p=1.5), "top_p"),
        (lambda: SamplingParams(top_k=-2), "top_k"),
        (lambda: SamplingParams(n=0), "n"),
    ],
)
def test_invalid_sampling_params_name_the_field(make_params, message):
    with pytest.raises(ValueError, match=message):
        make_params()


def test_top_k_zero_and_minus_one_mean_all_tokens(smollm_llm):
    for top_k in (0, -1):
        out = smollm_llm.generate("Hi", SamplingParams(top_k=top_k, max_tokens=2, seed=1), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 2


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ("", OK, "prompt is empty"),
        ([], OK, "prompt is empty"),
        ([1, 10**9], OK, "outside the vocabulary"),
        ([1, -3], OK, "outside the vocabulary"),
        ([1] * 9000, OK, "max_model_len"),
        ("Hello", SamplingParams(stop_token_ids=[10**9]), "stop_token_ids"),
        ("Hello", SamplingParams(logprobs=1000), "logprobs"),
    ],
)
def test_bad_requests_fail_alone_and_the_engine_keeps_working(smollm_llm, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        smollm_llm.generate(["A fine prompt", prompt], [OK, params], use_tqdm=False)
    assert not smollm_llm.llm_engine.has_unfinished_requests()
    out = smollm_llm.generate(["A fine prompt"], OK, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_duplicate_request_id_is_refused(smollm_llm):
    engine = smollm_llm.llm_engine
    engine.add_request("dup", "Hello", OK)
    with pytest.raises(ValueError, match="dup"):
        engine.add_request("dup", "Hello again", OK)
    while engine.has_unfinished_requests():
        engine.step()


def test_a_request_id_colliding_with_another_requests_sequence_id_is_refused(smollm_llm):
    engine = smollm_llm.llm_engine
    engine.add_request("x", "Hello", SamplingParams(n=2, max_tokens=4, seed=0))
    with pytest.raises(ValueError, match="0_x"):
        engine.add_request("0_x", "Hello again", OK)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["x"] and len(finished[0].outputs) == 2


def test_unknown_model_and_missing_path(tmp_path):
    with pytest.raises(ValueError, match="no-such-model"):
        LLM("no-such-model")
    with pytest.raises(ValueError, match="missing"):
        LLM(str(tmp_path / "missing"))


def test_corrupt_gguf_is_refused(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(ValueError, match="broken.gguf"):
        LLM(str(bad))


def test_unknown_engine_argument():
    with pytest.raises(ValueError, match="max_num_seq"):
        LLM("gemma3-270m", max_num_seq=4)
