"""schemathesis against the gateway's own OpenAPI document: generated requests, valid and not,
must never get a 500, and every response must match the documented status codes and schemas."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks

from .test_gateway import KEY, Running, gateway_pool, start_gateway


@pytest.fixture(scope="module")
def live_gateway() -> Iterator[Running]:
    # A body limit of 1 MB, so that generated bodies reach validation rather than the 413.
    running, runner = start_gateway(gateway_pool(max_body_bytes=1_000_000))
    try:
        yield running
    finally:
        running.server.stop()
        runner.close()


CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]


def operations(base: str) -> list[schemathesis.APIOperation]:
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


# Built by hand rather than with schemathesis' pytest plugin, which does not load under pytest 9.
@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_gateway_conforms_to_its_openapi_document(
    live_gateway: Running, mode: GenerationMode
) -> None:
    tested = []
    for operation in operations(live_gateway.base):
        if mode is GenerationMode.NEGATIVE and not len(operation.body):
            continue  # nothing to get wrong: no body, and any string is a valid path segment

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=60,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            database=None,
        )
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(
                base_url=live_gateway.base,
                headers={"Authorization": f"Bearer {KEY}"},
                checks=CHECKS,
            )

        check()
        tested.append(operation.label)
    assert "POST /v1/chat/completions" in tested and "POST /v1/route" in tested
    # The other protocols (their errors in their own shapes: Anthropic's on /v1/messages).
    assert {"POST /v1/messages", "POST /v1/responses", "POST /v1/completions"} <= set(tested)
