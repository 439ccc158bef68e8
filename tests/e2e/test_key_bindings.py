"""How an API key's allowed models bind routing, errors and model cards."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.conftest import start_gateway

ADMIN = "hunt-admin-" + uuid.uuid4().hex
HELLO = [{"role": "user", "content": "hello"}]
LONG = [{"role": "user", "content": "word " * 4000}]  # ~5,000 tokens: more than chat-b's window of 200


@pytest.fixture(scope="module")
def gateway(upstream, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hunt-keys")
    config = f"""
models:
  - {{id: chat-a, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
  - {{id: chat-b, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model, context_window: 200}}
  - {{id: chat-c, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
  - id: ver
    backend: openai
    base_url: "{upstream.url}"
    upstream_model: mock-model
    versions:
      - {{version: 1.0.0, stage: production}}
      - {{version: 2.0.0, stage: staging}}
experiments:
  - name: exp-c
    target: chat-c
    traffic: 1.0
    status: running
    variants:
      - {{name: control, model: chat-a, weight: 1}}
      - {{name: other, model: chat-a, weight: 1}}
routing: {{health_check_s: 0}}
storage: {{database_url: "sqlite+aiosqlite:///{tmp}/keys.db"}}
"""
    server = start_gateway(tmp, config, env={"POINTSMAN_ADMIN_KEY": ADMIN})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def windowed(upstream, tmp_path_factory):
    """Every model has a context window: a prompt can be too long for all of them."""
    tmp = tmp_path_factory.mktemp("hunt-windowed")
    config = f"""
models:
  - {{id: w-a, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model, context_window: 300}}
  - {{id: w-b, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model, context_window: 200}}
routing: {{health_check_s: 0}}
"""
    server = start_gateway(tmp, config)
    yield server
    server.stop()


def _key(gateway, **spec) -> str:
    answer = httpx.post(gateway.url + "/admin/keys", json=spec, headers={"authorization": f"Bearer {ADMIN}"})
    assert answer.status_code == 201, answer.text
    return answer.json()["key"]


def _post(gateway, key: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(gateway.url + path, json=body, headers={"authorization": f"Bearer {key}"}, timeout=30)


def test_experiment_arm_outside_the_keys_models_does_not_refuse_its_own_model(gateway):
    """A key allowed chat-c asks for chat-c, the target of an experiment whose arms route to chat-a. The key may
    use chat-c: it must be served (by chat-c, outside the experiment), not refused with a 403 that names chat-a,
    a model the key may not even know exists."""
    key = _key(gateway, models=["chat-c"])
    answer = _post(gateway, key, "/v1/chat/completions", {"model": "chat-c", "messages": HELLO})
    assert "chat-a" not in answer.text, answer.text
    assert answer.status_code == 200, answer.text


def test_unknown_model_card_lists_only_the_keys_models(gateway):
    """GET /v1/models/{unknown} with a restricted key: the 404 lists only the key's models, as chat completions'
    does (it listed every served model)."""
    key = _key(gateway, models=["chat-b"])
    answer = httpx.get(gateway.url + "/v1/models/no-such-model", headers={"authorization": f"Bearer {key}"})
    assert answer.status_code == 404
    message = answer.json()["error"]["message"]
    assert "chat-b" in message
    assert "chat-a" not in message and "chat-c" not in message, message


def test_route_requirements_error_names_only_the_keys_models(gateway):
    """`route: {min_quality}` nothing meets, with a restricted key: the 400 lists only the key's models'
    shortfalls (it listed those the key may not use too)."""
    key = _key(gateway, models=["chat-b"])
    answer = _post(gateway, key, "/v1/chat/completions",
                   {"model": "auto", "route": {"min_quality": 0.99}, "messages": HELLO})
    assert answer.status_code == 400, answer.text
    message = answer.json()["error"]["message"]
    assert "chat-b" in message
    assert "chat-a" not in message and "chat-c" not in message, message


def test_prompt_too_long_for_the_keys_models_is_400_not_403(gateway):
    """`auto` with a key allowed only chat-b (a 200-token window) and a prompt longer than that: the request is
    at fault (context_length_exceeded, 400), the key is not refused permission (403)."""
    key = _key(gateway, models=["chat-b"])
    answer = _post(gateway, key, "/v1/chat/completions", {"model": "auto", "messages": LONG})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "context_length_exceeded", answer.text


def test_auto_prompt_too_long_for_every_model_is_400_not_503(windowed):
    """`auto` with a prompt no model's context window holds: OpenAI's 400 context_length_exceeded (as the same
    prompt sent to a named model gets), not a 503 that SDKs retry as an outage."""
    named = httpx.post(windowed.url + "/v1/chat/completions", json={"model": "w-a", "messages": LONG}, timeout=30)
    assert named.status_code == 400 and named.json()["error"]["code"] == "context_length_exceeded", named.text
    auto = httpx.post(windowed.url + "/v1/chat/completions", json={"model": "auto", "messages": LONG}, timeout=30)
    assert auto.status_code == 400, auto.text
    assert auto.json()["error"]["code"] == "context_length_exceeded", auto.text


def test_feedback_on_another_keys_answer_is_refused(gateway):
    """Key A's answer, scored by key B (by the answer's x-request-id): B gets 404 (another key's stored response
    is 404 too), where a 201 told B A's experiment arm and took A's one score for that metric."""
    owner, stranger = _key(gateway, models=["chat-a"]), _key(gateway, models=["*"])
    served = _post(gateway, owner, "/v1/chat/completions", {"model": "chat-a", "messages": HELLO})
    assert served.status_code == 200, served.text
    request_id = served.headers["x-request-id"]
    foreign = _post(gateway, stranger, "/v1/feedback", {"id": request_id, "score": 0.0, "metric": "quality"})
    own = _post(gateway, owner, "/v1/feedback", {"id": request_id, "score": 1.0, "metric": "quality"})
    assert (foreign.status_code, own.status_code) == (404, 201), (foreign.text, own.text)


@pytest.mark.parametrize("glob", ["ver@2.0.0", "ver@*"])
def test_a_version_glob_is_either_refused_or_honoured(gateway, glob):
    """`models: ["ver@2.0.0"]` was accepted (201), yet matching stripped the version before the glob saw it, so
    the key could use nothing. Either creation refuses such a glob (400 naming `models`) or it matches."""
    created = httpx.post(gateway.url + "/admin/keys", json={"models": [glob]},
                         headers={"authorization": f"Bearer {ADMIN}"})
    if created.status_code == 400:
        assert created.json()["error"]["param"] == "models", created.text
        return
    assert created.status_code == 201, created.text
    answer = _post(gateway, created.json()["key"], "/v1/chat/completions", {"model": "ver@2.0.0", "messages": HELLO})
    assert answer.status_code == 200, answer.text


def test_a_query_parameter_the_framework_cannot_convert_is_named(gateway):
    """Litestar's own validation error said only "Validation failed for GET ..." with `param: null`."""
    answer = httpx.get(gateway.url + "/admin/keys?revoked=maybe", headers={"authorization": f"Bearer {ADMIN}"})
    error = answer.json()["error"]
    assert answer.status_code == 400 and error["param"] == "revoked" and "'revoked'" in error["message"], answer.text
