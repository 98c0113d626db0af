"""The published OpenAPI schema states what the server really answers (the fuzzer in test_fuzz_openapi.py checks
the answers against it): OpenAI's error body for every error status, never FastAPI's 422, Prometheus text for
/metrics, the bearer key or the console's session cookie on /v1 (none on the routes that sign in)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

ERROR_REF = "#/components/schemas/ErrorResponse"
KEY = [{"bearerAuth": []}, {"sessionCookie": []}]
SIGN_IN = {
    ("GET", "/v1/auth/config"): [],
    ("POST", "/v1/auth/signup"): [],
    ("POST", "/v1/auth/login"): [],
    ("POST", "/v1/auth/logout"): [{}, *KEY],
    ("GET", "/v1/auth/session"): [{}, *KEY],
}
"""The routes one calls to get a key or cookie need none (logging out, and asking who is signed in, work
either way)."""


@pytest.fixture
def schema(client: TestClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m.upper(), path, op) for path, ops in schema["paths"].items() for m, op in ops.items()]


def test_no_operation_documents_a_422_and_every_error_has_openais_shape(schema: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for method, path, operation in _operations(schema):
        assert "422" not in operation["responses"], (method, path)
        if path.startswith("/v1/"):
            for status in ("400", "401", "500"):
                content = operation["responses"][status]["content"]["application/json"]
                assert content["schema"]["$ref"] == ERROR_REF, (method, path, status)
            assert operation["security"] == SIGN_IN.get((method, path), KEY), (method, path)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
def test_generation_routes_document_limits_sizes_and_loading(schema: dict[str, Any], path: str) -> None:
    responses = schema["paths"][path]["post"]["responses"]
    assert {"403", "404", "413", "429", "503"} <= set(responses)


def test_streaming_routes_document_their_events(schema: dict[str, Any]) -> None:
    for path, chunk in (("/v1/chat/completions", "ChatCompletionChunk"), ("/v1/completions", "Completion")):
        event = schema["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
        (done, data) = event["properties"]["data"]["anyOf"]
        assert done == {"const": "[DONE]"}
        assert data["contentSchema"]["$ref"] == f"#/components/schemas/{chunk}"
        assert chunk in schema["components"]["schemas"]


def test_metrics_are_documented_as_text(schema: dict[str, Any], client: TestClient) -> None:
    assert list(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_integer_fields_are_typed_and_bounded(schema: dict[str, Any]) -> None:
    request = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    (max_tokens, _) = request["max_tokens"]["anyOf"]
    assert max_tokens == {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}


def test_the_session_cookie_is_a_documented_security_scheme(schema: dict[str, Any]) -> None:
    schemes = schema["components"]["securitySchemes"]
    assert schemes["sessionCookie"] == {"type": "apiKey", "in": "cookie", "name": "tm_session"}
    assert schemes["bearerAuth"] == {"type": "http", "scheme": "bearer"}
    assert set(schema["paths"]["/v1/auth/signup"]["post"]["responses"]) >= {"201", "403", "409"}
    assert set(schema["paths"]["/v1/auth/login"]["post"]["responses"]) >= {"200", "401", "429"}
