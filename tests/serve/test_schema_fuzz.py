"""A property-based run against the served OpenAPI schema (schemathesis): whatever a client sends,
valid or not, the server answers without a 5xx, and every 4xx is an OpenAI-style error object.

Bounded (a few dozen examples per operation) so the run takes well under a minute on a CPU."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402  (schemathesis brings hypothesis)

from .conftest import Live, lm_server  # noqa: E402

KEY = "sk-fuzz"


@pytest.fixture(scope="module")
def fuzz_server(lm) -> Iterator[Live]:
    # small context and queue: big max_tokens / n / prompt batches are refused fast, not generated;
    # a key, so the schema and every operation go through the auth gate as in production
    with lm_server(lm, api_keys=[KEY], max_model_len=48, max_queue=32, request_timeout=20) as live:
        live.api_key = KEY
        yield live


@pytest.fixture(scope="module")
def served_schema(fuzz_server: Live):
    import httpx

    spec = httpx.get(fuzz_server.url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(spec["paths"])
    return schemathesis.openapi.from_dict(spec)


def _operations(spec) -> list:
    return [result.ok() for result in spec.get_all_operations()]


# schemathesis' pytest plugin (from_fixture) does not run under this pytest; its hypothesis
# strategies do: one bounded property per operation and generation mode.
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_5xx_and_openai_shaped_4xx(served_schema, fuzz_server: Live, mode: str) -> None:
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable

    seen: dict[str, int] = {}
    for op in _operations(served_schema):
        if op.path == "/metrics":
            continue  # text, not JSON; covered by the metrics tests

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        @given(case=op.as_strategy(schemathesis.GenerationMode(mode)))
        def prop(case) -> None:
            response = case.call(base_url=fuzz_server.url, headers={"Authorization": f"Bearer {KEY}"},
                                 timeout=60)
            seen[str(response.status_code)] = seen.get(str(response.status_code), 0) + 1
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            if 400 <= response.status_code < 500:
                err = response.json()["error"]
                assert set(err) == {"message", "type", "param", "code"}, response.text
                assert isinstance(err["message"], str) and err["message"]
                assert isinstance(err["type"], str) and err["type"]

        try:
            prop()
        except Unsatisfiable:  # negative mode on an operation without inputs: nothing to break
            assert mode == "negative" and op.body is None or not len(op.body), op.label
    assert seen, "no request was made"
    print(f"{mode}: responses by status {dict(sorted(seen.items()))}")
