"""Schemathesis against the served /openapi.json: generated requests for every operation, no 5xx.

The service runs under uvicorn on loopback with SQLite and the shared Ray head (so /readyz is
200), with its background loop off: the experiments that valid generated specs create stay
queued and nothing is dispatched.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.ray_head import EmbeddedHead
from tests.service.conftest import AUTH, TOKEN
from tests.service.server import ServiceProcess

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def api_server(tmp_path_factory: pytest.TempPathFactory, ray_head: EmbeddedHead) -> Iterator[ServiceProcess]:
    assert ray_head.info is not None
    tmp: Path = tmp_path_factory.mktemp("schemathesis")
    env = {
        "CDSP_DATA_DIR": str(tmp / "cdsp-data"),
        "CDSP_DATABASE_URL": f"sqlite:///{tmp / 'fuzz.db'}",
        "CDSP_STORAGE": str(tmp / "artifacts"),
        "CDSP_RAY_ADDRESS": ray_head.info.dashboard_url,
        "CDSP_RAY_TOKEN": ray_head.info.token,
        "CDSP_BACKGROUND": "false",
        "CDSP_API_TOKENS": TOKEN,
    }
    proc = ServiceProcess(env, tmp, tmp / "service.log")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        server_errors = [line for line in (tmp / "service.log").read_text().splitlines() if "Traceback" in line]
        assert not server_errors, "the service logged tracebacks during the fuzzing"


@pytest.fixture(scope="module")
def api_schema(api_server: ServiceProcess) -> Any:
    return schemathesis.openapi.from_url(f"{api_server.url}/openapi.json", headers=AUTH, timeout=10)


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"])
def test_no_server_errors_and_answers_match_the_schema(api_schema: Any, mode: GenerationMode) -> None:
    """Every operation, data that fits the schema and data that does not: no 5xx, answers as documented.

    (Operations are walked here rather than with `schema.parametrize()`, whose lazy-fixture loader
    does not run under this pytest version.)
    """
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 12
    fuzzed = 0
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)  # fmt: skip
        def run(case: Any) -> None:
            case.call_and_validate(headers=AUTH, timeout=15, checks=CHECKS)

        try:
            run()
            fuzzed += 1
        except Unsatisfiable:  # negative mode, an operation without inputs (GET /healthz): nothing to break
            assert mode is GenerationMode.NEGATIVE
    assert fuzzed >= (len(operations) if mode is GenerationMode.POSITIVE else 8)


def test_stateful_sequences_over_the_schema_links(api_server: ServiceProcess) -> None:
    """Call sequences that follow the published links (create -> get / cancel / retry / logs / ...
    -> cancel -> retry ...) with ids of experiments made in the sequence: no 5xx, answers as
    documented, and the chains really reach the state changes (not only 404s for made-up ids).
    Valid data (the stateless test above sends the invalid), so that the chains get going."""
    schema = schemathesis.openapi.from_url(f"{api_server.url}/openapi.json", headers=AUTH, timeout=10)
    schema.config.generation.update(modes=[GenerationMode.POSITIVE])
    seen: set[tuple[str, str, int]] = set()

    class Machine(schema.as_state_machine()):  # type: ignore[misc]
        def before_call(self, case: Any) -> None:
            # `logs?follow=true` on an experiment made in the sequence streams until it ends, with a
            # keep-alive byte every few seconds: no read timeout ever fires, and these never end here.
            if case.query and case.query.get("follow") in (True, "true", "True", 1, "1"):
                case.query["follow"] = False

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"headers": AUTH, "timeout": 15}

        def after_call(self, response: Any, case: Any) -> None:
            seen.add((case.method.upper(), case.path, response.status_code))

        def validate_response(self, response: Any, case: Any, additional_checks: Any = None, **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)

    Machine.run(
        settings=settings(max_examples=40, stateful_step_count=6, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck))
    )  # fmt: skip
    one = "/v1/experiments/{experiment_id}"
    assert ("POST", "/v1/experiments", 201) in seen
    for reached in [("GET", one, 200), ("POST", f"{one}/cancel", 200)]:
        assert reached in seen, "\n".join(map(str, sorted(seen)))
    # retry reached with the id of an experiment made in the sequence: queued again (200), or refused as an
    # illegal transition (409) - never only 404s for made-up ids
    assert {("POST", f"{one}/retry", 200), ("POST", f"{one}/retry", 409)} & seen, "\n".join(map(str, sorted(seen)))
