"""Where policies meet, through one live gateway and the openai SDK: the exact cache beside rate limits, budgets,
experiments, templates, model versions, API keys and teams; budgets beside fallbacks, versions and experiments;
a refusal by a later policy after an earlier one counted; a stream left midway with every policy on."""

from __future__ import annotations

import json
import socket
import sqlite3
import time
import uuid

import httpx
import openai
import pytest

from tests.conftest import start_gateway
from tests.gateway.live import wait_for
from tests.spec.openai import validate

ADMIN = "admin-interplay"
C_TOKENS = 60  # remote-c's own budget in tokens, for all time


@pytest.fixture(scope="module")
def gateway(upstream, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interplay")
    db = tmp / "usage.db"
    config = f"""
auth: {{api_keys: [{ADMIN}]}}
models:
  - {{id: remote-a, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model, aliases: [ra],
      pricing: {{input_per_mtok: 1.0, output_per_mtok: 2.0}}}}
  - {{id: remote-b, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model,
      pricing: {{input_per_mtok: 10.0, output_per_mtok: 20.0}}}}
  - {{id: remote-c, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model,
      pricing: {{input_per_mtok: 10.0, output_per_mtok: 20.0}}}}
  - id: chat
    backend: openai
    base_url: "{upstream.url}"
    upstream_model: mock-model
    pricing: {{input_per_mtok: 1.0, output_per_mtok: 2.0}}
    versions:
      - {{version: 1.0.0, stage: production}}
      - {{version: 2.0.0, stage: staging, upstream_model: mock-v2}}
routing: {{health_check_s: 0}}
templates:
  - name: greet
    versions:
      - version: 1.0.0
        stage: production
        messages: [{{role: system, content: "Be brief."}}]
      - version: 1.1.0
        stage: staging
        messages: [{{role: system, content: "Be very brief."}}]
experiments:
  - name: arms
    target: chat-default
    variants:
      - {{name: control, model: remote-a, weight: 50}}
      - {{name: treatment, model: remote-b, weight: 50}}
  - name: spend
    target: chat-spend
    variants:
      - {{name: control, model: remote-a, weight: 50}}
      - {{name: pricey, model: remote-c, weight: 50}}
  - name: wording
    target: chat-wording
    variants:
      - {{name: v1, model: remote-a, weight: 50, template: {{name: greet, version: 1.0.0}}}}
      - {{name: v2, model: remote-a, weight: 50, template: {{name: greet, version: 1.1.0}}}}
storage: {{database_url: "sqlite+aiosqlite:///{db}"}}
policies:
  cache: {{mode: deterministic, ttl_s: 600}}
  budgets:
    - {{scope: model, match: remote-c, period: total, max_tokens: {C_TOKENS}}}
"""
    server = start_gateway(tmp, config)
    server.extra["db"] = db
    yield server
    server.stop()


def _key(gateway, **spec) -> str:
    answer = httpx.post(gateway.url + "/admin/keys", json={"role": "user", **spec},
                        headers={"authorization": f"Bearer {ADMIN}"})
    assert answer.status_code == 201, answer.text
    return answer.json()["key"]


def _client(gateway, key: str = ADMIN) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


def _ask(client: openai.OpenAI, content: str, model: str = "remote-a", **extra):
    return client.chat.completions.with_raw_response.create(
        model=model, temperature=0, messages=[{"role": "user", "content": content}], **extra)


def _cached(gateway, key: str, content: str, model: str = "remote-a", **extra):
    """Ask once (a miss), then until a hit: the entry is stored right after the answer that made it was sent."""
    client = _client(gateway, key)
    first = _ask(client, content, model, **extra)
    assert first.headers["x-pointsman-cache"] == "miss"
    return first, wait_for(lambda: (r := _ask(client, content, model, **extra)).headers["x-pointsman-cache"] == "hit"
                         and r, what="a cache hit")


def _used(gateway, key: str) -> float:
    """The tokens the key's own budget has used (reserved or settled), from /v1/usage."""
    budgets = httpx.get(gateway.url + "/v1/usage", headers={"authorization": f"Bearer {key}"}).json()["budgets"]
    return next(b["used_tokens"] for b in budgets if b["scope"] == "key")


def _row(gateway, request_id: str) -> dict:
    def read():
        with sqlite3.connect(gateway.extra["db"]) as conn:
            conn.row_factory = sqlite3.Row
            found = conn.execute("SELECT * FROM usage_rows WHERE request_id = ?", (request_id,)).fetchall()
        return [dict(r) for r in found]
    rows = wait_for(read, 10.0, f"the usage row of {request_id}")
    assert len(rows) == 1, rows
    return rows[0]


# ---- the cache beside budgets and rate limits ----

def test_a_hit_charges_no_budget_and_no_tokens_per_minute_but_counts_as_a_request(gateway):
    """A hit serves no model: nothing is charged to budgets or to a tpm limit (tokens a model read or wrote), but
    it is a request (rpm). Its usage row says hit, costs 0."""
    team = uuid.uuid4().hex
    warm = _key(gateway, team=team)
    prompt = f"hit charges {uuid.uuid4().hex}"
    _cached(gateway, warm, prompt, max_tokens=20)
    # the same team shares entries: this key only ever gets hits, 30 of them, against 100 tokens a minute
    key = _key(gateway, team=team, budget={"period": "day", "max_tokens": 1000},
               rate_limit={"rpm": 31, "tpm": 100})
    client = _client(gateway, key)
    began = time.monotonic()
    for _ in range(30):
        hit = _ask(client, prompt, max_tokens=20)
        assert hit.headers["x-pointsman-cache"] == "hit"
    # rpm: every hit was a request (31 a minute, 30 spent; what refilled meanwhile, 31/60 a second, comes back)
    refilled = int((time.monotonic() - began) * 31 / 60)
    assert 1 <= int(hit.headers["x-ratelimit-remaining-requests"]) <= 1 + refilled
    assert _used(gateway, key) == 0
    row = _row(gateway, hit.headers["x-request-id"])
    assert (row["status"], row["cache"], row["cost_usd"], row["model_served"]) == ("answered", "hit", 0, "remote-a")


# ---- what must keep cached answers apart ----

def test_experiment_arms_never_share_an_entry(gateway):
    prompt = f"arms {uuid.uuid4().hex}"
    client = _client(gateway)
    arms: dict[str, str] = {}
    for i in range(40):
        user = f"arm-user-{i}"
        answer = _ask(client, prompt, "chat-default", user=user)
        arms.setdefault(answer.headers["x-pointsman-experiment"], user)
        if len(arms) == 2:
            break
    assert set(arms) == {"arms=control", "arms=treatment"}
    for tag, user in arms.items():  # each arm's own entry, its own model
        hit = wait_for(lambda u=user: (r := _ask(client, prompt, "chat-default", user=u)).headers[
            "x-pointsman-cache"] == "hit" and r, what="a hit in the arm")
        assert hit.headers["x-pointsman-experiment"] == tag
        assert hit.headers["x-pointsman-model"] == {"arms=control": "remote-a", "arms=treatment": "remote-b"}[tag]


def test_template_versions_never_share_an_entry(gateway):
    prompt = f"wording {uuid.uuid4().hex}"
    client = _client(gateway)
    seen: dict[str, str] = {}
    for i in range(40):
        answer = _ask(client, prompt, "chat-wording", user=f"w-{i}")
        if answer.headers["x-pointsman-experiment"] not in seen:
            assert answer.headers["x-pointsman-cache"] == "miss"  # the other arm's entry is not this one's
            seen[answer.headers["x-pointsman-experiment"]] = answer.headers["x-pointsman-template"]
    assert seen == {"wording=v1": "greet@1.0.0", "wording=v2": "greet@1.1.0"}
    # and a client's own template: another version, another entry
    body = {"template": {"name": "greet", "version": "1.1.0"}}
    first = _ask(client, f"own {prompt}", extra_body=body)
    other = _ask(client, f"own {prompt}", extra_body={"template": {"name": "greet", "version": "1.0.0"}})
    assert first.headers["x-pointsman-cache"] == other.headers["x-pointsman-cache"] == "miss"


def test_model_versions_never_share_an_entry(gateway):
    prompt = f"versions {uuid.uuid4().hex}"
    first, hit = _cached(gateway, ADMIN, prompt, "chat")
    assert hit.headers["x-pointsman-model"] == "chat@1.0.0"
    staged = _ask(_client(gateway), prompt, "chat@2.0.0")
    assert staged.headers["x-pointsman-cache"] == "miss" and staged.headers["x-pointsman-model"] == "chat@2.0.0"


def test_keys_and_teams_see_only_entries_they_may_use(gateway):
    team = uuid.uuid4().hex
    prompt = f"keys {uuid.uuid4().hex}"
    _cached(gateway, _key(gateway, team=team), prompt, "remote-b")
    only_a = _key(gateway, team=team, models=["remote-a"])
    with pytest.raises(openai.PermissionDeniedError):  # never the team's entry for a model it may not use
        _ask(_client(gateway, only_a), prompt, "remote-b")
    other_team = _key(gateway, team=uuid.uuid4().hex)
    assert _ask(_client(gateway, other_team), prompt, "remote-b").headers["x-pointsman-cache"] == "miss"


def test_a_restricted_key_outside_its_arm_goes_where_unenrolled_units_go(gateway):
    """A key that may not use its arm's model is not enrolled; when the target is no model of its own, it is served
    as any unit outside the experiment is: by the control (README, Experiments)."""
    only_a = _key(gateway, models=["remote-a"])
    client = _client(gateway, only_a)
    for i in range(30):
        answer = _ask(client, f"restricted {i}", "chat-default", user=f"restricted-{i}")
        assert answer.headers["x-pointsman-model"] == "remote-a"


# ---- streamed hits ----

def _sse(gateway, body: dict) -> tuple[dict, list[str]]:
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {ADMIN}"}, timeout=30) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
        return dict(response.headers), lines


def test_a_streamed_hit_is_a_valid_openai_stream(gateway):
    prompt = f"replay {uuid.uuid4().hex}"
    _cached(gateway, ADMIN, prompt)
    body = {"model": "remote-a", "temperature": 0, "stream": True, "messages": [{"role": "user", "content": prompt}]}
    for include_usage in (False, True):
        asked = {**body, "stream_options": {"include_usage": True}} if include_usage else body
        headers, lines = _sse(gateway, asked)
        assert headers["x-pointsman-cache"] == "hit" and headers["content-type"].startswith("text/event-stream")
        assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        for chunk in chunks:
            validate(chunk, "CreateChatCompletionStreamResponse")
        assert len({c["id"] for c in chunks}) == 1
        with_usage = [c for c in chunks if c.get("usage")]
        if include_usage:
            assert len(with_usage) == 1 and chunks[-1] is with_usage[0] and chunks[-1]["choices"] == []
            assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
        else:
            assert not with_usage and all("usage" not in c for c in chunks)
        assert chunks[-1 - include_usage]["choices"][0]["finish_reason"] == "stop"
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == (
            f"echo: {prompt}")


# ---- budgets beside experiments, fallbacks and versions ----

def test_the_served_models_budget_binds_an_experiment_arm_and_a_chain(gateway):
    """remote-c's own budget holds whether remote-c is reached as an experiment's arm or as the first model of a
    chain; what it serves is charged to it, and once it is spent the chain's fallback serves (charged to itself)."""
    client = _client(gateway)
    served = {"remote-a": 0, "remote-c": 0}
    for i in range(40):
        try:
            answer = _ask(client, f"c {i}", "chat-spend", user=f"c-user-{i}", max_tokens=5)
        except openai.RateLimitError as exc:
            assert exc.body["code"] == "budget_exceeded"
            continue
        served[answer.headers["x-pointsman-model"]] += answer.parse().usage.total_tokens
        chained = _ask(client, f"chain {i}", "remote-c:remote-a", max_tokens=5)
        served[chained.headers["x-pointsman-model"]] += chained.parse().usage.total_tokens
    assert 0 < served["remote-c"] <= C_TOKENS and served["remote-a"] > 0
    last = _ask(client, "chain after", "remote-c:remote-a", max_tokens=5)
    assert (last.headers["x-pointsman-model"], last.headers["x-pointsman-route"]) == ("remote-a", "fallback")


def test_a_budget_refusal_is_no_exposure_of_the_arm(gateway):
    """A request refused by a budget after its arm was chosen never reached the arm's model: its usage row is in
    no experiment (the results count served and failed answers of each arm)."""
    client = _client(gateway)
    for i in range(200):
        try:
            _ask(client, f"spend {i}", "remote-c", max_tokens=5)
        except openai.RateLimitError:
            break  # remote-c's budget is spent
    refused = None
    for i in range(40):
        try:
            _ask(client, f"refused {i}", "chat-spend", user=f"late-{i}", max_tokens=5)
        except openai.RateLimitError as exc:
            refused = exc
            break
    assert refused is not None and refused.body["code"] == "budget_exceeded"
    row = _row(gateway, refused.response.headers["x-request-id"])
    assert (row["status"], row["http_status"], row["experiment"], row["variant"]) == ("error", 429, None, None)


# ---- a stream left midway with every policy on ----

def test_a_stream_left_midway_settles_once(gateway):
    key = _key(gateway, team=uuid.uuid4().hex, budget={"period": "day", "max_tokens": 100000},
               rate_limit={"rpm": 100, "tpm": 100000})
    words = " ".join(f"w{i}" for i in range(200))
    body = json.dumps({"model": "chat-default", "user": "leaver", "stream": True, "temperature": 0,
                       "max_tokens": 500, "messages": [{"role": "user", "content": f"gap:0.05 {words}"}],
                       "template": {"name": "greet"}}).encode()
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"authorization: Bearer " + key.encode() + b"\r\nx-request-id: left-" + uuid.uuid4().hex.encode()
                     + b"\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        received = b""
        while b"w3" not in received:
            piece = sock.recv(65536)
            assert piece, received.decode(errors="replace")
            received += piece
        request_id = next(line.split(b":", 1)[1].strip().decode() for line in received.split(b"\r\n")
                          if line.lower().startswith(b"x-request-id:"))
    row = _row(gateway, request_id)
    assert row["status"] == "cancelled" and row["experiment"] == "arms" and row["variant"] in ("control", "treatment")
    charged = (row["prompt_tokens"] or 0) + (row["completion_tokens"] or 0)
    assert 0 < charged < 500
    # the worst case reserved (prompt plus 500) is released down to what was used, once
    wait_for(lambda: _used(gateway, key) == charged, what="the budget settled to the usage")
