"""Property-based tests over /openapi.json (Schemathesis, in-process ASGI): no request a client can make
gets a 5xx, and every response matches the schema the app publishes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance
from schemathesis.python.asgi import get_client, shutdown_lifespans

from app.api import create_app
from tests.api.conftest import png_b64, save_tiny, server_settings

pytestmark = pytest.mark.service

EXAMPLES_PER_OPERATION = 25
IMAGES = [png_b64(1), png_b64(2)]  # 8×8 grayscale: what the model takes


@dataclass
class Api:
    schema: Any
    job_ids: list[str]  # finished jobs: a sample (2 images) and a likelihood (none)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory):
    # T = 10, so whatever a generated request may ask for (with ?wait=true too) ends at once.
    model = save_tiny(tmp_path_factory.mktemp("models") / "tiny10", timesteps=10, variance_type="fixed_small")
    app = create_app(
        server_settings([str(model)], max_images=4, max_batch=4, max_steps=10, heartbeat_seconds=0.2)
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the app's lifespan
    with get_client(app) as client:  # the same in-process app, on Schemathesis's own event loop
        jobs = [
            client.post("/sample?wait=true", json={"n": 2, "steps": 2, "stream_every": 1}).json(),
            client.post("/likelihood?wait=true", json={"images": IMAGES[:1]}).json(),
        ]
    assert [job["status"] for job in jobs] == ["succeeded", "succeeded"]
    yield Api(schema, [job["id"] for job in jobs])
    shutdown_lifespans()  # stops the engine threads


def _realistic(case: schemathesis.Case, draw, job_ids: list[str]) -> None:
    """Sometimes swap generated ids and image strings for real ones, so that generated requests also
    reach finished jobs, decoded images and the engine, not only the validation in front of them."""
    if "job_id" in case.path_parameters and draw(st.booleans()):
        case.path_parameters["job_id"] = draw(st.sampled_from(job_ids))
        if "index" in case.path_parameters:
            case.path_parameters["index"] = draw(st.integers(0, 2))
    if not isinstance(case.body, dict):
        return
    for holder in [case.body, *(v for k, v in case.body.items() if k in ("a", "b") and isinstance(v, dict))]:
        if isinstance(holder.get("image"), str) and draw(st.booleans()):
            holder["image"] = draw(st.sampled_from(IMAGES))
        if isinstance(holder.get("job"), str) and draw(st.booleans()):
            holder["job"] = draw(st.sampled_from(job_ids))
    images = case.body.get("images")
    if isinstance(images, list) and draw(st.booleans()):
        case.body["images"] = [draw(st.sampled_from(IMAGES)) for _ in images]


def test_no_request_gets_a_server_error_and_every_response_matches_the_schema(api):
    # A loop rather than `schema.parametrize()`: its lazy (fixture) form does not run on pytest 9.
    failures: list[str] = []
    operations = [result.ok() for result in api.schema.get_all_operations()]
    assert len(operations) >= 14  # every route of API.md is in the schema
    for operation in operations:
        cases = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)
        )

        @given(case=cases, data=st.data())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case, data: st.DataObject) -> None:
            _realistic(case, data.draw, api.job_ids)
            case.call_and_validate(checks=[not_a_server_error, response_schema_conformance], timeout=30)

        try:
            check()
        except Exception as e:  # one report for every operation that fails, not only the first
            failures.append(f"{operation.label}: {e}")
    assert not failures, "\n\n".join(failures)
