"""Structured output in the offline engine: constraints honoured, free requests untouched, compilation off the loop.

The default chat-sized model (SmolLM2 135M, float32) so every constraint has
a real vocabulary and real, sometimes wayward, logits to tame.
"""

from __future__ import annotations

import json
import re
import threading
import time

import jsonschema
import pytest
from structured_schemas import SCHEMAS

from pagoda import SamplingParams, StructuredOutputsParams

pytestmark = pytest.mark.slow

FREE_PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]


def _core(llm):
    return llm.llm_engine.engine_core.engine_core


def _tokens(outputs) -> list[list[int]]:
    return [list(output.outputs[0].token_ids) for output in outputs]


def test_free_requests_get_the_same_tokens_beside_constrained_ones(smollm_llm):
    greedy = SamplingParams(max_tokens=24, temperature=0)
    seeded = SamplingParams(max_tokens=24, temperature=1.0, seed=7)
    alone = smollm_llm.generate(FREE_PROMPTS, [greedy, seeded, greedy], use_tqdm=False)
    constrained = [SamplingParams(max_tokens=120, temperature=1.0, seed=i,
                                  structured_outputs=StructuredOutputsParams(json=SCHEMAS[i])) for i in range(4)]
    mixed = smollm_llm.generate(["Some JSON:"] * 4 + FREE_PROMPTS, constrained + [greedy, seeded, greedy],
                                use_tqdm=False)
    assert _tokens(mixed[4:]) == _tokens(alone)
    for index, output in enumerate(mixed[:4]):
        jsonschema.validate(json.loads(output.outputs[0].text), SCHEMAS[index])


def test_regex_choice_and_grammar_are_honoured_at_temperature_one(smollm_llm):
    kinds = [
        (StructuredOutputsParams(regex=r"[A-Z][a-z]{2,8} [0-9]{2}"), lambda t: re.fullmatch(r"[A-Z][a-z]{2,8} [0-9]{2}", t)),
        (StructuredOutputsParams(choice=["left", "right", "straight on"]), lambda t: t in {"left", "right", "straight on"}),
        (StructuredOutputsParams(grammar='root ::= "(" [0-9]+ ("+" [0-9]+)* ")"'),
         lambda t: re.fullmatch(r"\([0-9]+(\+[0-9]+)*\)", t)),
    ]
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=seed, structured_outputs=constraint)
              for constraint, _ in kinds for seed in range(4)]
    outputs = smollm_llm.generate(["Answer:"] * len(params), params, use_tqdm=False)
    for index, output in enumerate(outputs):
        text = output.outputs[0].text
        assert kinds[index // 4][1](text), (index, text)
        assert output.outputs[0].finish_reason == "stop"


def test_a_schema_sent_many_times_compiles_once_and_every_matcher_is_freed(smollm_llm):
    manager = _core(smollm_llm).structured_output
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "title": "compiled-once"}
    before = len(manager._compiled)
    params = SamplingParams(max_tokens=30, temperature=1.0, structured_outputs=StructuredOutputsParams(json=schema))
    outputs = smollm_llm.generate(["A digit as JSON:"] * 6, params, use_tqdm=False)
    assert all(0 <= json.loads(output.outputs[0].text)["n"] <= 9 for output in outputs)
    assert len(manager._compiled) == before + 1
    assert manager.num_matchers == 0


def test_ignore_eos_under_a_grammar_stops_where_the_grammar_ends(smollm_llm):
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(choice=["alpha", "beta"]))
    (output,) = smollm_llm.generate(["Pick one:"], params, use_tqdm=False)
    assert output.outputs[0].text in {"alpha", "beta"} and output.outputs[0].finish_reason == "stop"
    assert _core(smollm_llm).structured_output.num_matchers == 0


def test_a_slow_compilation_holds_only_its_own_request(smollm_llm, monkeypatch: pytest.MonkeyPatch):
    manager = _core(smollm_llm).structured_output
    compile_one = manager._compile
    released = threading.Event()

    def slow_compile(params):
        released.wait(30)
        return compile_one(params)

    monkeypatch.setattr(manager, "_compile", slow_compile)
    engine = smollm_llm.llm_engine
    engine.add_request("slow", "Pick:", SamplingParams(
        max_tokens=10, temperature=0, structured_outputs=StructuredOutputsParams(choice=["slow-compiled"])))
    engine.add_request("free", "Hello", SamplingParams(max_tokens=8, temperature=0))
    finished: dict[str, str] = {}
    deadline = time.monotonic() + 60
    while "free" not in finished and time.monotonic() < deadline:
        finished |= {output.request_id: output.outputs[0].text for output in engine.step() if output.finished}
    assert "free" in finished and "slow" not in finished  # the free request ran while the grammar compiled
    released.set()
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        finished |= {output.request_id: output.outputs[0].text for output in engine.step() if output.finished}
    assert finished["slow"] == "slow-compiled"


def test_aborting_a_request_that_waits_for_its_grammar_forgets_it(smollm_llm, monkeypatch: pytest.MonkeyPatch):
    core = _core(smollm_llm)
    released = threading.Event()
    compile_one = core.structured_output._compile
    monkeypatch.setattr(core.structured_output, "_compile", lambda params: (released.wait(30), compile_one(params))[1])
    engine = smollm_llm.llm_engine
    engine.add_request("waiting", "Hi", SamplingParams(
        max_tokens=5, structured_outputs=StructuredOutputsParams(regex="[a-z]{3}-aborted")))
    assert core.has_unfinished_requests()
    engine.abort_request(["waiting"])
    released.set()
    assert not core.has_unfinished_requests() and not engine.has_unfinished_requests()


def test_a_bad_constraint_is_refused_before_it_is_queued(smollm_llm):
    with pytest.raises(ValueError, match=r"structured_outputs\.regex: "):
        smollm_llm.generate(["Hi"], SamplingParams(structured_outputs=StructuredOutputsParams(regex="(")),
                            use_tqdm=False)
    assert not smollm_llm.llm_engine.has_unfinished_requests()


def test_a_constraint_the_vocabulary_cannot_carry_fails_as_the_requests_own_error(smollm_llm):
    constrained = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(
        grammar='start: <|no_such_token|> "a"'))
    free = SamplingParams(max_tokens=4, temperature=0)
    refused, fine = smollm_llm.generate(["Hi", "Hello"], [constrained, free], use_tqdm=False)
    assert refused.outputs[0].finish_reason == "error" and refused.invalid_request
    assert "structured_outputs.grammar" in refused.error and "unknown special token" in refused.error
    assert fine.error is None and not fine.invalid_request and len(fine.outputs[0].token_ids) == 4


class PanicException(BaseException):
    """Stands in for pyo3's: a Rust panic crosses into Python as a BaseException of this name."""


def test_a_matcher_that_panics_fails_its_request_alone(smollm_llm, monkeypatch: pytest.MonkeyPatch):
    import llguidance.numpy

    def panic(*_args):
        raise PanicException("a bug in llguidance")

    free = SamplingParams(max_tokens=8, temperature=0)
    (expected,) = smollm_llm.generate(["Hello"], free, use_tqdm=False)
    monkeypatch.setattr(llguidance.numpy, "fill_next_token_bitmask", panic)
    constrained = SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(regex="[a-z]{3} panics"))
    broken, fine = smollm_llm.generate(["Hi", "Hello"], [constrained, free], use_tqdm=False)
    assert broken.outputs[0].finish_reason == "error" and "a bug in llguidance" in broken.error
    assert not broken.invalid_request  # a failure of the engine's, not the request's
    assert fine.outputs[0].token_ids == expected.outputs[0].token_ids
    assert _core(smollm_llm).structured_output.num_matchers == 0
