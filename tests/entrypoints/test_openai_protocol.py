"""The OpenAI server's pieces that need no model: request parsing, error mapping, metrics, CLI defaults."""

from __future__ import annotations

import json
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from pagoda.engine.iteration_stats import FinishedRequestStats, IterationStats
from pagoda.engine.messages import SchedulerStatsMessage
from pagoda.engine.arg_utils import EngineArgs
from pagoda.entrypoints.cli import build_parser
from pagoda.entrypoints.openai.api_server import create_app
from pagoda.entrypoints.openai.errors import OpenAIError, from_value_error
from pagoda.entrypoints.openai.input_text import lone_surrogate_position
from pagoda.entrypoints.openai.metrics import ServerMetrics
from pagoda.entrypoints.openai.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from pagoda.entrypoints.openai.unsupported import log_unknown_fields, refuse_unsupported
from pagoda.sampling_params import RequestOutputKind


@pytest.mark.parametrize(("prompt", "expected"), [
    ("Hi", ["Hi"]),
    ([1, 2, 3], [[1, 2, 3]]),
    (["a", "b"], ["a", "b"]),
    ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_completion_prompt_batches(prompt, expected):
    assert CompletionRequest(prompt=prompt).prompts() == expected


def test_sampling_params_from_a_completion_request():
    request = CompletionRequest.model_validate_json(
        '{"prompt": "Hi", "stop": "\\n", "logit_bias": {"42": -100}, "stream": true, "top_k": 3, "seed": 7}'
    )
    params = request.to_sampling_params(max_tokens=5, num_logprobs=2, num_prompt_logprobs=None)
    assert params.stop == ["\n"] and params.logit_bias == {42: -100.0} and params.top_k == 3
    assert params.max_tokens == 5 and params.logprobs == 2 and params.seed == 7
    assert params.output_kind == RequestOutputKind.DELTA
    assert CompletionRequest(prompt="Hi").to_sampling_params(5, None, None).output_kind == RequestOutputKind.FINAL_ONLY


def test_chat_request_prefers_max_completion_tokens_and_maps_logprobs():
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=9,
                                    max_completion_tokens=4, logprobs=True)
    assert request.requested_max_tokens == 4 and request.num_logprobs == 0
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "Hi"}], top_logprobs=3).num_logprobs is None


def test_chat_content_parts():
    message = ChatMessage(role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
    assert message.to_template_message() == {"role": "user", "content": "ab"}
    with pytest.raises(ValueError, match="image_url"):
        ChatMessage(role="user", content=[{"type": "image_url"}]).to_template_message()


@pytest.mark.parametrize(("message", "param"), [
    ("SamplingParams.top_p must be in (0, 1], got 2", "top_p"),
    ("stop_token_ids: 99 is outside the vocabulary", "stop_token_ids"),
    ("prompt has 9000 tokens", "prompt"),
    ("this model has no chat template", None),
])
def test_engine_value_errors_name_their_field(message, param):
    error = from_value_error(ValueError(message))
    assert error.status == 400 and error.param == param
    assert error.body()["error"]["message"] == message


def _samples(metrics: ServerMetrics) -> dict[str, float]:
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
        if not sample.name.endswith("_created") and "le" not in sample.labels
    }


def test_metrics_follow_iteration_and_scheduler_stats():
    metrics = ServerMetrics("m")

    def stats(queries: int, hits: int) -> SchedulerStatsMessage:
        return SchedulerStatsMessage(num_running_reqs=2, num_waiting_reqs=1, kv_cache_usage=0.25,
                                     prefix_cache_queries=queries, prefix_cache_hits=hits, num_preemptions=0)

    finished = FinishedRequestStats("r", "length", 1.5, 10, 4, 0, queue_time=0.25)
    never_ran = FinishedRequestStats("s", "abort", 0.5, 10, 0, 0, queue_time=None)
    metrics(IterationStats(num_prompt_tokens=10, num_generation_tokens=2, time_to_first_tokens=[0.2],
                           inter_token_latencies=[0.05], finished_requests=[finished, never_ran]), stats(100, 40))
    metrics(IterationStats(num_generation_tokens=1, inter_token_latencies=[0.07]), stats(150, 60))
    samples = _samples(metrics)
    assert samples["pagoda:prompt_tokens_total"] == 10 and samples["pagoda:generation_tokens_total"] == 3
    assert samples["pagoda:prefix_cache_queries_total"] == 150 and samples["pagoda:prefix_cache_hits_total"] == 60
    assert samples["pagoda:num_requests_running"] == 2 and samples["pagoda:kv_cache_usage_perc"] == 0.25
    assert samples["pagoda:time_to_first_token_seconds_count"] == 1
    assert samples["pagoda:inter_token_latency_seconds_count"] == 2
    assert samples["pagoda:e2e_request_latency_seconds_sum"] == 2.0
    assert samples["pagoda:request_queue_time_seconds_count"] == 1
    assert samples["pagoda:request_queue_time_seconds_sum"] == 0.25
    by_reason = {sample.labels["finish_reason"]: sample.value
                 for family in text_string_to_metric_families(metrics.render().decode())
                 for sample in family.samples if sample.name == "pagoda:request_success_total"}
    assert by_reason == {"length": 1, "abort": 1}
    # A scrape's fresher figures and a later step's report never count the same hits twice.
    metrics.record_scheduler_stats(stats(150, 60))
    assert _samples(metrics)["pagoda:prefix_cache_hits_total"] == 60


def test_serve_binds_loopback_by_default():
    args = build_parser().parse_args(["serve", "smollm2-135m", "--api-key", "k", "--max-model-len", "512"])
    assert (args.host, args.port, args.api_key, args.max_model_len) == ("127.0.0.1", 8000, "k", 512)
    bench = build_parser().parse_args(["bench", "serve", "--num-clients", "4"])
    assert bench.num_clients == 4 and bench.base_url == "http://127.0.0.1:8000"


@pytest.mark.parametrize(("value", "position"), [
    ("fine \0 text \U0001F600", None),
    ("a\ud800", ""),
    (["ok", {"text": "\udfff"}], "[1].text"),
    ({"\ud800": 1}, "a key of the object"),
    ([[[["x"]]], "y"], None),
])
def test_lone_surrogates_are_found_wherever_they_are(value, position):
    assert lone_surrogate_position(value) == position


def test_lone_surrogate_search_survives_deep_nesting():
    value: list = ["\ud800"]
    for _ in range(100_000):
        value = [value]
    assert lone_surrogate_position(value) == "[0]" * 100_000 + "[0]"


def test_request_models_refuse_surrogates_and_non_finite_floats_by_field():
    with pytest.raises(ValidationError) as caught:
        CompletionRequest.model_validate({"prompt": "a\ud800"})
    assert caught.value.errors()[0]["loc"] == ("prompt",)
    with pytest.raises(ValidationError) as caught:
        CompletionRequest.model_validate({"prompt": "a", "temperature": float("nan")})
    assert caught.value.errors()[0]["loc"] == ("temperature",)


def test_unknown_fields_are_kept_aside_and_logged(caplog):
    request = CompletionRequest.model_validate({"prompt": "a", "zeta": 1, "alpha\0\u00e9": 2})
    assert set(request.model_extra) == {"zeta", "alpha\0\u00e9"}
    with caplog.at_level(logging.WARNING):
        log_unknown_fields(request, "/v1/completions")
    assert caplog.messages == ["/v1/completions: ignoring unknown fields 'alpha\\x00\\xe9', 'zeta'"]


@pytest.mark.parametrize(("body", "param"), [
    ({"suffix": " then"}, "suffix"),
    ({"best_of": 2}, "best_of"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
    ({"add_special_tokens": False}, "add_special_tokens"),
    ({"best_of": 1, "echo": False, "response_format": {"type": "text"}, "priority": 0}, None),
])
def test_unimplemented_parameters_are_refused_unless_harmless(body, param):
    request = CompletionRequest.model_validate({"prompt": "a", **body})
    if param is None:
        refuse_unsupported(request, {"best_of": request.n, "add_special_tokens": True})
        return
    with pytest.raises(OpenAIError) as caught:
        refuse_unsupported(request, {"best_of": request.n, "add_special_tokens": True})
    assert caught.value.status == 400 and caught.value.param == param


def test_error_bodies_carry_lone_surrogates_as_escapes():
    body = OpenAIError(400, "model `\ud800` does not exist", "model").response().body
    assert json.loads(body)["error"]["message"] == "model `\\ud800` does not exist"


def test_the_openapi_schema_declares_the_request_bodies_and_openai_errors():
    app = create_app(EngineArgs(model="smollm2-135m"), ["smollm2-135m"])
    schema = app.openapi()
    operation = schema["paths"]["/v1/chat/completions"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"}
    assert set(operation["responses"]) == {"200", "400"}
    chat = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert {"messages", "tools", "response_format", "user"} <= set(chat["properties"])
    assert chat["additionalProperties"] is True


def test_the_chat_page_route_exists_unless_turned_off():
    def paths(**kwargs) -> set[str]:
        app = create_app(EngineArgs(model="smollm2-135m"), ["m"], **kwargs)
        return {getattr(route, "path", None) for route in app.routes}

    assert "/" in paths() and "/" not in paths(chat_page=False)
    assert build_parser().parse_args(["serve", "--no-chat-page"]).chat_page is False
