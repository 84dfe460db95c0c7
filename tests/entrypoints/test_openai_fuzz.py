"""Property-based fuzzing of a real `pagoda serve` from its own OpenAPI schema: no input gets a 5xx.

Every route of the schema, bodies that fit it and bodies that break it, plus
hostile JSON the schema cannot describe (see openai_fuzz.py). Afterwards the
engine must be as it was: a reference greedy completion returns the same
text, `/health` is 200, and no request is left holding the engine. The run is
derandomized, so a failure here replays; benchmarks/fuzz_server.py runs a
larger, random one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from openai_fuzz import FuzzRequest, FuzzTally, engine_gauges, fuzz_requests, fuzz_schema, reference_completion, send
from openai_server_helpers import RemoteServer, start_server

pytestmark = pytest.mark.slow

FUZZ_EXAMPLES = 300
IDLE = {"kv_cache_usage_perc": 0.0, "num_requests_running": 0.0, "num_requests_waiting": 0.0}


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A server of its own (no API key): the fuzz must not disturb the other tests' server."""
    server: RemoteServer = start_server(tmp_path_factory)
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client
    server.stop()


def test_the_served_schema_is_the_fuzzed_one(fuzz_client):
    assert fuzz_client.get("/openapi.json").json() == fuzz_schema().raw_schema


def test_no_request_gets_a_5xx_and_the_engine_is_unchanged(fuzz_client):
    schema = fuzz_schema()
    before = reference_completion(fuzz_client)
    tally = FuzzTally()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(fuzz_requests(schema))
    def fuzz(request: FuzzRequest) -> None:
        send(fuzz_client, request, tally)

    fuzz()
    print(f"fuzz: {tally.sent} requests, statuses {dict(tally.statuses)}, 2xx {dict(tally.answered)}, "
          f"slowest {tally.slowest[0]:.1f} s: {tally.slowest[1][:200]}")
    assert tally.failures == [], "\n".join(tally.failures)
    assert tally.server_errors == 0 and tally.sent >= FUZZ_EXAMPLES
    # The engine did generate: schema-valid requests reached it on both generating routes.
    assert tally.answered["/v1/completions"] > 0 and tally.answered["/v1/chat/completions"] > 0, tally.answered
    assert reference_completion(fuzz_client) == before
    assert fuzz_client.get("/health").status_code == 200
    for _ in range(50):  # aborts of streams the fuzz left reach the engine asynchronously
        if engine_gauges(fuzz_client) == IDLE:
            break
        time.sleep(0.2)
    assert engine_gauges(fuzz_client) == IDLE
