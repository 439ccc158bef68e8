"""API keys end to end: created with a secret shown once and stored as a digest, each role against each family of
endpoints, allowed models binding routing, a key's own limits, expiry, and a revocation reaching a second replica
within a second over Redis."""

from __future__ import annotations

import hashlib
import sqlite3
import time
import uuid

import httpx
import openai
import pytest

from tests.conftest import redis_url, require_redis, start_gateway

REDIS = redis_url(14)  # a database of this xdist worker's own
ADMIN = "bootstrap-" + uuid.uuid4().hex
STATIC = "static-" + uuid.uuid4().hex
CHAT = {"messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture(scope="module")
def replicas(upstream, tmp_path_factory):
    require_redis(REDIS)
    tmp = tmp_path_factory.mktemp("keys")
    config = f"""
auth: {{api_keys: ["{STATIC}"]}}
models:
  - {{id: chat-a, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model, aliases: [smart]}}
  - {{id: chat-b, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
  - {{id: embed-a, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
routing: {{health_check_s: 0}}
metrics: {{enabled: true}}
storage: {{redis_url: "{REDIS}", database_url: "sqlite+aiosqlite:///{tmp}/keys.db"}}
"""
    env = {"POINTSMAN_ADMIN_KEY": ADMIN}
    first = start_gateway(tmp, config, env=env)
    second = start_gateway(tmp, config, env=env)  # the same database and Redis: a second replica
    yield first, second, tmp / "keys.db"
    first.stop()
    second.stop()


def _auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def _create(gateway, **spec) -> dict:
    answer = httpx.post(gateway.url + "/admin/keys", json=spec, headers=_auth(ADMIN))
    assert answer.status_code == 201, answer.text
    return answer.json()


def test_created_key_is_shown_once_and_stored_only_as_its_digest(replicas):
    first, _, database = replicas
    created = _create(first, role="user", team="t1", models=["*"], name="ci")
    secret = created["key"]
    assert secret.startswith("pm-") and len(secret) >= 3 + 43  # 32 random bytes, url-safe base64
    assert created["role"] == "user" and created["team"] == "t1" and created["id"].startswith("key_")
    listed = httpx.get(first.url + "/admin/keys", headers=_auth(ADMIN)).json()["data"]
    mine = next(k for k in listed if k["id"] == created["id"])
    assert "key" not in mine and secret not in str(listed) and mine["hint"].startswith("pm-")
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT * FROM api_keys WHERE id = ?", (created["id"],)).fetchall()
    assert secret not in str(rows) and hashlib.sha256(secret.encode()).hexdigest() in str(rows)
    # the key works through the openai SDK, and its usage row names it and its team
    client = openai.OpenAI(base_url=first.url + "/v1", api_key=secret)
    assert client.chat.completions.create(model="chat-a", **CHAT).choices[0].message.content


def test_bad_key_specs_are_400_naming_the_field(replicas):
    """An unknown field, both expiries and one past the year 9999 were 400s whose `param` was null."""
    first, _, _ = replicas
    for spec, param in (({"role": "root"}, "role"), ({"models": []}, "models"), ({"rate_limit": {}}, "rate_limit"),
                        ({"expires_at": "2020-01-01T00:00:00Z"}, "expires_at"),
                        ({"role": "user", "colour": "red"}, "colour"),
                        ({"rate_limit": {"rpm": 1, "x": 2}}, "rate_limit.x"),
                        ({"expires_at": "2030-01-01T00:00:00Z", "expires_in_s": 60}, "expires_in_s"),
                        ({"expires_at": "9999-12-31T23:59:59-12:00"}, "expires_at"),
                        ({"expires_in_s": 10**12}, "expires_in_s")):
        answer = httpx.post(first.url + "/admin/keys", json=spec, headers=_auth(ADMIN))
        assert answer.status_code == 400, (spec, answer.text)
        error = answer.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, (spec, error)


# what each role gets from each family of endpoints (200-class: allowed, 403: a role that may not)
_FAMILIES = {
    "chat": ("POST", "/v1/chat/completions", {"model": "chat-a", **CHAT}),
    "completions": ("POST", "/v1/completions", {"model": "chat-a", "prompt": "hi"}),
    "embeddings": ("POST", "/v1/embeddings", {"model": "embed-a", "input": "hi"}),
    "route": ("POST", "/v1/route", {"prompt": "hello"}),
    "models": ("GET", "/v1/models", None),
    "usage": ("GET", "/v1/usage", None),
    "metrics": ("GET", "/metrics", None),
    "analytics": ("GET", "/admin/analytics", None),
    "admin_usage": ("GET", "/admin/usage", None),
    "admin_keys": ("GET", "/admin/keys", None),
    "admin_experiments": ("GET", "/admin/experiments", None),
    "admin_models": ("POST", "/admin/models/chat-a/load", None),
}
_ALLOWED = {
    "admin": set(_FAMILIES),
    "user": {"chat", "completions", "embeddings", "route", "models", "usage"},
    "readonly": {"models", "usage", "metrics", "analytics"},
}


@pytest.mark.parametrize("role", ["admin", "user", "readonly"])
def test_role_matrix(replicas, role):
    first, _, _ = replicas
    key = _create(first, role=role)["key"]
    for family, (method, path, body) in _FAMILIES.items():
        answer = httpx.request(method, first.url + path, json=body, headers=_auth(key))
        if family in _ALLOWED[role]:
            # allowed: whatever the endpoint itself answers (a remote model has nothing to load: 400), never 401/403
            assert answer.status_code not in (401, 403), (role, family, answer.text)
            if family != "admin_models":
                assert answer.status_code < 300, (role, family, answer.text)
        else:
            assert answer.status_code == 403, (role, family, answer.status_code, answer.text)
            error = answer.json()["error"]
            assert error["code"] == "permission_denied" and role in error["message"], error


def test_missing_wrong_and_static_keys(replicas):
    first, _, _ = replicas
    path = first.url + "/v1/chat/completions"
    body = {"model": "chat-a", **CHAT}
    assert httpx.post(path, json=body).json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.post(path, json=body, headers=_auth("pm-" + "x" * 43))
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "Incorrect API key provided."
    # Anthropic's x-api-key header is taken as the key too
    assert httpx.get(first.url + "/v1/models", headers={"x-api-key": STATIC}).status_code == 200
    # the static keys of the config are admins, and so is the bootstrap key
    for key in (STATIC, ADMIN):
        assert httpx.get(first.url + "/admin/keys", headers=_auth(key)).status_code == 200
    # the page and probes need no key
    assert httpx.get(first.url + "/health").status_code == 200


def test_allowed_models_bind_listing_manual_auto_and_chains(replicas):
    first, _, _ = replicas
    key = _create(first, role="user", models=["chat-b"])["key"]
    client = openai.OpenAI(base_url=first.url + "/v1", api_key=key, max_retries=0)
    assert [m.id for m in client.models.list()] == ["chat-b"]
    with pytest.raises(openai.NotFoundError) as hidden:
        client.models.retrieve("chat-a")
    # a 404 lists only the key's models (it listed every model, those the key may not use too)
    assert "chat-b" in hidden.value.body["message"] and "chat-a" not in hidden.value.body["message"].split("'", 2)[2]
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="nope", **CHAT)
    message = unknown.value.body["message"]
    assert "Available models: chat-b " in message and "chat-a" not in message
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(model="chat-a", **CHAT)
    assert refused.value.body["code"] == "permission_denied" and "chat-a" in refused.value.body["message"]
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="smart", **CHAT)  # an alias of a model it may not use
    # a chain moves past the model it may not use; automatic routing picks only among its models
    chained = client.chat.completions.with_raw_response.create(model="chat-a:chat-b", **CHAT)
    assert chained.headers["x-pointsman-model"] == "chat-b"
    for _ in range(3):
        auto = client.chat.completions.with_raw_response.create(model="auto", **CHAT)
        assert auto.headers["x-pointsman-model"] == "chat-b"
    explained = httpx.post(first.url + "/v1/route", json={"prompt": "hello"}, headers=_auth(key)).json()
    assert explained["model"] == "chat-b"
    barred = {c["model"]: c for c in explained["candidates"]}["chat-a"]
    assert not barred["eligible"] and "not allowed for this API key" in barred["reason"]
    # embeddings are bound too
    assert httpx.post(first.url + "/v1/embeddings", json={"model": "embed-a", "input": "x"},
                      headers=_auth(key)).status_code == 403


def test_a_keys_own_rate_limit_and_budget(replicas):
    first, second, _ = replicas
    created = _create(first, role="user", rate_limit={"rpm": 2})
    limited = created["key"]

    def own_limits(gateway) -> list[dict]:  # its /v1/usage showed only budgets (README: the rate_limit shows too)
        return httpx.get(gateway.url + "/v1/usage", headers=_auth(limited)).json()["rate_limits"]

    for gateway in (first, second, first):  # read, never charged: the two requests below still pass
        assert own_limits(gateway) == [{"scope": "key", "member": created["id"], "rpm": 2, "remaining_requests": 2}]
    body = {"model": "chat-a", **CHAT}
    statuses = [httpx.post(g.url + "/v1/chat/completions", json=body, headers=_auth(limited)).status_code
                for g in (first, second, first)]
    assert statuses == [200, 200, 429]  # one bucket for the key, across both replicas
    assert own_limits(second) == [{"scope": "key", "member": created["id"], "rpm": 2, "remaining_requests": 0}]
    # a budget of 20 tokens: a request that may use 64 cannot be reserved
    budgeted = _create(first, role="user", budget={"period": "day", "max_tokens": 20})
    refused = httpx.post(first.url + "/v1/chat/completions", json={**body, "max_tokens": 64},
                         headers=_auth(budgeted["key"]))
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "budget_exceeded"
    own = httpx.get(first.url + "/v1/usage", headers=_auth(budgeted["key"])).json()["budgets"]
    assert own == [{"scope": "key", "member": budgeted["id"], "period": "day", "resets_at": own[0]["resets_at"],
                    "limit_tokens": 20, "used_tokens": 0.0, "remaining_tokens": 20.0}]


def test_expired_key_is_refused(replicas):
    first, _, _ = replicas
    key = _create(first, role="user", expires_in_s=4)["key"]
    assert httpx.get(first.url + "/v1/models", headers=_auth(key)).status_code == 200  # checked and cached
    deadline = time.monotonic() + 20
    while (answer := httpx.get(first.url + "/v1/models", headers=_auth(key))).status_code == 200:
        assert time.monotonic() < deadline, "the key still worked 16 s after it expired"
        time.sleep(0.05)
    assert answer.status_code == 401 and "expired" in answer.json()["error"]["message"]


def test_revocation_reaches_the_other_replica_within_a_second(replicas):
    first, second, _ = replicas
    created = _create(first, role="user")
    key = created["key"]
    # both replicas have checked (and cached) the key
    for gateway in (first, second):
        assert httpx.get(gateway.url + "/v1/models", headers=_auth(key)).status_code == 200
    revoked = httpx.delete(first.url + f"/admin/keys/{created['id']}", headers=_auth(ADMIN))
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    revoked_at = time.monotonic()
    assert httpx.get(first.url + "/v1/models", headers=_auth(key)).status_code == 401  # at once where revoked
    while (answer := httpx.get(second.url + "/v1/models", headers=_auth(key))).status_code == 200:
        # the cache would keep the key for auth.cache_ttl_s (30 s): only the pub/sub message ends it this soon
        assert time.monotonic() - revoked_at < 1.0, "the other replica still accepted the key after 1 s"
    assert answer.status_code == 401 and "revoked" in answer.json()["error"]["message"]
    listed = httpx.get(first.url + "/admin/keys?revoked=true", headers=_auth(ADMIN)).json()["data"]
    assert next(k for k in listed if k["id"] == created["id"])["revoked_at"] is not None
    active = httpx.get(first.url + "/admin/keys", headers=_auth(ADMIN)).json()["data"]
    assert all(k["id"] != created["id"] for k in active)
    missing = httpx.delete(first.url + "/admin/keys/key_nope", headers=_auth(ADMIN))
    assert missing.status_code == 404
