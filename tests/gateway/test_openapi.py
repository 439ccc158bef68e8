"""The OpenAPI document describes every route's request body and error responses, and schemathesis, fuzzing
the live gateway from it (valid and invalid bodies), never gets a 5xx, nor an error the document leaves out or
shows in another shape."""

from __future__ import annotations

import json
import re

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.modes import GenerationMode

from config.loader import parse_config
from gateway.app import create_app
from tests.gateway.live import serve
from tests.spec.openai import validate

POSTS = ("/v1/chat/completions", "/v1/completions", "/v1/route", "/v1/models/recommend")


@pytest.fixture(scope="module")
def live_url(upstream):
    config = parse_config(f"""
models:
  - id: remote-a
    backend: openai
    base_url: {upstream.url}
    upstream_model: mock-model
routing: {{health_check_s: 0}}
storage: {{database_url: ''}}
""")
    with serve(create_app(config)) as url:
        yield url


@pytest.fixture(scope="module")
def document(live_url) -> dict:
    return httpx.get(live_url + "/openapi/openapi.json").json()


@pytest.fixture(scope="module")
def api_schema(live_url):
    return schemathesis.openapi.from_url(live_url + "/openapi/openapi.json")


def test_post_routes_document_their_body_and_errors(document):
    schemas = document["components"]["schemas"]
    assert {"ChatCompletionRequest", "CompletionRequest", "ErrorResponse"} <= set(schemas)
    assert "messages" in schemas["ChatCompletionRequest"]["required"]
    for path in POSTS:
        operation = document["paths"][path]["post"]
        assert operation["requestBody"]["required"] is True
        for status in ("400", "500", "503"):
            ref = operation["responses"][status]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/ErrorResponse"


def test_every_operation_documents_the_errors_any_route_may_answer(document):
    """400 everywhere, 401 and 403 (auth on) everywhere but the probes, 404 for a path naming something; each in
    OpenAI's error shape, none in Litestar's own {status_code, detail}."""
    assert "/admin/keys" in document["paths"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            wanted = {"400"} if path in ("/health", "/ready") else {"400", "401", "403"}
            if "{" in path:
                wanted.add("404")
            assert wanted <= set(responses), (method, path, sorted(responses))
            for status, response in responses.items():
                if status.startswith(("4", "5")) and not path.startswith("/v1/messages"):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, status)


def test_routes_that_read_a_body_document_it_and_every_reference_resolves(document):
    """The admin routes read their bodies themselves, so Litestar documents none: each names its schema."""
    for method, path, schema in (("post", "/admin/keys", "KeySpec"), ("post", "/admin/experiments", "ExperimentConfig"),
                                 ("post", "/admin/templates", "NewVersion"),
                                 ("post", "/admin/templates/{name}/versions/{version}/stage", "StageChange"),
                                 ("post", "/admin/models/{model_id}/versions", "ModelVersion"),
                                 ("post", "/admin/models/{model_id}/versions/{version}/stage", "_StageChange"),
                                 ("post", "/v1/feedback", "Feedback")):
        body = document["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{schema}"}, (method, path, body)
    for method, path in (("patch", "/admin/experiments/{name}"), ("post", "/admin/experiments/{name}/promote")):
        assert document["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    references = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(document)))
    assert references <= set(document["components"]["schemas"]), references - set(document["components"]["schemas"])


def test_options_lists_every_method_of_a_path(live_url):
    """Litestar 2 listed only the first handler's methods on a path with several (litestar-org/litestar#4169)."""
    for path, allowed in (("/admin/keys", "GET, OPTIONS, POST"), ("/admin/keys/k1", "DELETE, GET, OPTIONS"),
                          ("/admin/experiments/e1", "GET, OPTIONS, PATCH"), ("/v1/models", "GET, OPTIONS")):
        answer = httpx.request("OPTIONS", live_url + path)
        assert (answer.status_code, answer.headers["allow"]) == (204, allowed), path


def test_the_error_schema_is_openais(live_url):
    response = httpx.post(live_url + "/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
    assert response.status_code == 400
    validate(response.json(), "ErrorResponse")


def _operations(api_schema) -> list:
    return [result.ok() for result in api_schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_never_get_a_5xx(api_schema, mode):
    """Every documented operation, with bodies that fit its schema and bodies that don't."""
    operations = _operations(api_schema)
    assert {op.path for op in operations if op.method.upper() == "POST"} >= set(POSTS)
    if mode == GenerationMode.NEGATIVE:  # only a request body can be made invalid (any string is a valid path id)
        operations = [op for op in operations if op.method.upper() == "POST" and op.body]
    for operation in operations:
        documented = operation.definition.raw["responses"]

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def call(case) -> None:
            response = case.call(timeout=30)
            assert response.status_code < 500, (case.method, case.path, case.body, response.status_code,
                                                response.text)
            if response.status_code >= 400:
                assert str(response.status_code) in documented, (  # noqa: B023 (called in this iteration)
                    case.method, case.path, response.status_code, response.text)
                if not case.path.startswith("/v1/messages"):  # Anthropic's shape there, as documented
                    validate(response.json(), "ErrorResponse")

        call()


def test_the_document_needs_a_key_when_auth_is_on_and_unknown_paths_get_the_json_404():
    config = parse_config("""
models: [{id: m, backend: openai, base_url: "http://127.0.0.1:9/v1"}]
routing: {health_check_s: 0}
auth: {api_keys: ["sk-openapi"]}
storage: {database_url: ''}
""")
    pages = ("/openapi", "/openapi/openapi.json", "/openapi/openapi.yaml", "/openapi/swagger", "/openapi/redoc")
    with serve(create_app(config)) as url:
        for path in pages:
            for headers in ({}, {"authorization": "Bearer sk-wrong"}):
                refused = httpx.get(url + path, headers=headers)
                assert refused.status_code == 401, (path, refused.text[:200])
                validate(refused.json(), "ErrorResponse")
            assert httpx.get(url + path, headers={"authorization": "Bearer sk-openapi"}).status_code == 200, path
        unknown = httpx.get(url + "/openapi/foo", headers={"authorization": "Bearer sk-openapi"})
        assert unknown.status_code == 404 and unknown.headers["content-type"].startswith("application/json")
        validate(unknown.json(), "ErrorResponse")
        assert unknown.json()["error"]["message"] == "Unknown route: GET /openapi/foo"
        assert unknown.headers["x-request-id"]
