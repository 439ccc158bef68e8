"""The request pipeline's hook guarantees, proved on a live server with small test policies: fixed order,
admit may answer or refuse or rewrite, approve sees the decision, settle runs exactly once however it ends."""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace
from typing import ClassVar

import httpx
import pytest

from config.loader import parse_config
from gateway.app import create_app
from policies.base import PolicyChain, no_op
from policies.context import Outcome, Reply, RequestContext
from protocol.errors import GatewayError
from protocol.openai import ChatCompletionRequest, decode_request
from tests.conftest import http
from tests.gateway.live import serve, wait_for


class TooMany(GatewayError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class Recorder:
    """Records every hook call; refuses, answers or rewrites when the prompt asks it to."""

    name: ClassVar[str] = "recorder"
    stage: ClassVar[int] = 50

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def of(self, rid: str) -> list[tuple]:
        return [c for c in self.calls if c[1] == rid]

    async def admit(self, ctx: RequestContext) -> Reply | None:
        self.calls.append(("admit", ctx.request_id))
        prompt = ctx.request.raw["messages"][-1]["content"]
        if "refuse" in prompt:
            error = TooMany("slow down")
            error.headers = {"retry-after": "7"}
            raise error
        if "cached" in prompt:
            chunk = b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"remote-a","choices":[]}'
            return Reply(body=b'{"cached": true}', chunks=(chunk,), headers={"x-cache": "hit"})
        if "rewrite" in prompt:
            ctx.request.raw["model"] = "remote-b"
            ctx.request.body.model = "remote-b"
        return None

    async def approve(self, ctx: RequestContext, decision) -> None:
        self.calls.append(("approve", ctx.request_id, decision.attempts[0].model.id))

    async def settle(self, ctx: RequestContext, outcome: Outcome) -> None:
        self.calls.append(("settle", ctx.request_id, outcome, ctx))


class Broken:
    """A policy whose settle fails: the others must still settle."""

    name: ClassVar[str] = "broken"
    stage: ClassVar[int] = 10

    async def admit(self, ctx: RequestContext) -> None:
        return None

    async def approve(self, ctx: RequestContext, decision) -> None:
        return None

    async def settle(self, ctx: RequestContext, outcome: Outcome) -> None:
        raise RuntimeError("settle failed")


@pytest.fixture(scope="module")
def live(upstream):
    config = parse_config(f"""
models:
  - id: remote-a
    backend: openai
    base_url: {upstream.url}
    upstream_model: mock-model
    pricing: {{input_per_mtok: 1.0, output_per_mtok: 2.0}}
  - id: remote-b
    backend: openai
    base_url: {upstream.url}
  - id: dead
    backend: openai
    base_url: http://127.0.0.1:1/v1
    load: lazy
routing: {{health_check_s: 0}}
storage: {{database_url: ''}}
""")
    recorder = Recorder()
    app = create_app(config, policies=[recorder, Broken()])
    with serve(app) as url:
        yield url, recorder, app.state.gateway


def _post(url: str, rid: str, content: str, model: str = "remote-a", **extra):
    body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    return http("POST", url + "/v1/chat/completions", body, headers={"x-request-id": rid})


def _settles(recorder: Recorder, rid: str) -> list[tuple]:
    return [c for c in recorder.of(rid) if c[0] == "settle"]


def test_chain_runs_in_stage_order_whatever_the_registration_order():
    chain = PolicyChain([Recorder(), Broken()])
    assert [p.name for p in chain.policies] == ["broken", "recorder"]
    assert not PolicyChain()


async def test_chain_skips_hooks_marked_no_op():
    class Quiet(Recorder):  # admit and approve do nothing: the chain never calls them; settle still runs
        @no_op
        async def admit(self, ctx: RequestContext) -> Reply | None:
            raise AssertionError("a no-op admit was called")

        @no_op
        async def approve(self, ctx: RequestContext, decision) -> None:
            raise AssertionError("a no-op approve was called")

    quiet, loud = Quiet(), Recorder()
    chain = PolicyChain([quiet, loud])
    ctx = RequestContext(decode_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                                        ChatCompletionRequest), request_id="q")
    assert await chain.admit(ctx) is None
    await chain.approve(ctx, SimpleNamespace(attempts=[SimpleNamespace(model=SimpleNamespace(id="m"))]))
    await chain.settle(ctx, Outcome("ok"))
    assert [c[0] for c in quiet.calls] == ["settle"] and [c[0] for c in loud.calls] == ["admit", "approve", "settle"]


def test_success_settles_once_with_usage_and_cost(live):
    url, recorder, _ = live
    status, headers, raw = _post(url, "ok-1", "hello there")
    assert status == 200 and headers["x-request-id"] == "ok-1"
    wait_for(lambda: _settles(recorder, "ok-1"), what="settle")
    hooks = [c[0] for c in recorder.of("ok-1")]
    assert hooks == ["admit", "approve", "settle"]
    _, _, outcome, ctx = _settles(recorder, "ok-1")[0]
    assert outcome.status == "ok" and json.loads(outcome.body)["choices"]
    assert ctx.model == "remote-a" and (ctx.prompt_tokens, ctx.completion_tokens) == (2, 3)
    assert ctx.cost_usd == pytest.approx((2 * 1.0 + 3 * 2.0) / 1e6)
    assert [(a.ok, a.error) for a in ctx.attempts] == [(True, None)]


def test_upstream_error_settles_once_as_error(live):
    url, recorder, _ = live
    status, _, raw = _post(url, "err-1", "status:400")
    assert status == 400
    wait_for(lambda: _settles(recorder, "err-1"), what="settle")
    settles = _settles(recorder, "err-1")
    assert len(settles) == 1 and settles[0][2].status == "error" and settles[0][2].error.status == 400
    status, _, _ = _post(url, "err-2", "hi", model="dead")
    assert status == 502
    settles = wait_for(lambda: _settles(recorder, "err-2"), what="settle")
    ctx = settles[0][3]
    assert settles[0][2].error.code == "upstream_unavailable" and ctx.attempts and not ctx.attempts[0].ok


def test_admit_refusal_is_the_answer_and_still_settles(live):
    url, recorder, gateway = live
    requests_before = gateway.pools["remote-a"].states[0].in_flight
    status, headers, raw = _post(url, "no-1", "please refuse")
    assert status == 429 and headers["retry-after"] == "7" and headers["x-request-id"] == "no-1"
    assert json.loads(raw)["error"]["code"] == "rate_limit_exceeded"
    settles = wait_for(lambda: _settles(recorder, "no-1"), what="settle")
    assert [c[0] for c in recorder.of("no-1")] == ["admit", "settle"]  # no approve, no model ran
    assert settles[0][2].status == "error" and settles[0][3].attempts == []
    assert gateway.pools["remote-a"].states[0].in_flight == requests_before


def test_admit_reply_answers_plain_and_streamed(live):
    url, recorder, _ = live
    status, headers, raw = _post(url, "hit-1", "cached please")
    assert status == 200 and raw == b'{"cached": true}' and headers["x-cache"] == "hit"
    status, headers, raw = _post(url, "hit-2", "cached please", stream=True)
    assert status == 200 and raw.count(b"data: ") == 2 and raw.endswith(b"data: [DONE]\n\n")
    for rid in ("hit-1", "hit-2"):
        settles = wait_for(lambda rid=rid: _settles(recorder, rid), what="settle")
        assert [c[0] for c in recorder.of(rid)] == ["admit", "settle"] and settles[0][2].status == "answered"


def test_admit_may_rewrite_what_is_routed(live):
    url, recorder, _ = live
    status, headers, _ = _post(url, "rw-1", "rewrite me")
    assert status == 200 and headers["x-pointsman-model"] == "remote-b"
    assert ("approve", "rw-1", "remote-b") in recorder.calls


def test_stream_settles_once_after_the_last_chunk(live):
    url, recorder, _ = live
    status, _, raw = _post(url, "st-1", "one two three", stream=True, stream_options={"include_usage": True})
    assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
    settles = wait_for(lambda: _settles(recorder, "st-1"), what="settle")
    outcome, ctx = settles[0][2], settles[0][3]
    assert len(settles) == 1 and outcome.status == "ok"
    assert (ctx.prompt_tokens, ctx.completion_tokens) == (3, 4) and ctx.attempts[0].ttft_s is not None


def _open_and_leave(url: str, rid: str, body: dict, read_until: bytes | None) -> None:
    """Send a request on a raw socket, optionally read until `read_until` appears, then hang up."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"x-request-id: " + rid.encode() + b"\r\ncontent-length: %d\r\n\r\n" % len(data) + data)
        received = b""
        while read_until is not None and read_until not in received:
            received += sock.recv(65536)


def _upstream_active(upstream) -> int:
    return httpx.get(upstream.url.removesuffix("/v1") + "/stats").json()["active"]


def test_stream_cancelled_midway_settles_once_and_stops_the_upstream(live, upstream):
    url, recorder, gateway = live
    words = " ".join(f"w{i}" for i in range(200))
    body = {"model": "remote-a", "stream": True, "messages": [{"role": "user", "content": f"gap:0.05 {words}"}]}
    _open_and_leave(url, "cx-1", body, read_until=b"w3")
    settles = wait_for(lambda: _settles(recorder, "cx-1"), what="settle after the client left")
    outcome, ctx = settles[0][2], settles[0][3]
    assert outcome.status == "cancelled" and ctx.attempts[0].error == "cancelled"
    assert 3 <= ctx.completion_tokens < 200  # what was relayed so far counts
    wait_for(lambda: _upstream_active(upstream) == 0, what="the upstream request to stop")
    state, breaker = gateway.pools["remote-a"].states[0], gateway.pools["remote-a"].breakers[0]
    wait_for(lambda: state.in_flight == 0, what="in-flight back to zero")
    assert breaker.snapshot()["state"] == "closed"
    assert len(_settles(recorder, "cx-1")) == 1


def test_plain_client_that_leaves_cancels_its_upstream_request(live, upstream):
    url, recorder, gateway = live
    breaker = gateway.pools["remote-a"].breakers[0]
    failures = breaker.snapshot()["window_failures"]
    body = {"model": "remote-a", "messages": [{"role": "user", "content": "sleep:30 hi"}]}
    _open_and_leave(url, "cx-2", body, read_until=None)
    settles = wait_for(lambda: _settles(recorder, "cx-2"), what="settle after the client left")
    assert settles[0][2].status == "cancelled" and settles[0][3].attempts[0].error == "cancelled"
    wait_for(lambda: _upstream_active(upstream) == 0, what="the upstream request to be cancelled")
    assert gateway.pools["remote-a"].states[0].in_flight == 0
    # a client leaving is not the upstream's failure
    assert breaker.snapshot()["window_failures"] == failures


def test_a_prompt_too_long_for_every_model_names_the_field_it_came_in():
    """400 context_length_exceeded with `param` as OpenAI names it: `prompt` on /v1/completions (it said
    `messages` there too), `messages` on chat, `input` on /v1/responses (translated to a chat request)."""
    config = """
routing: {health_check_s: 0}
storage: {database_url: ""}
models:
  - {id: tiny, backend: openai, base_url: "http://127.0.0.1:1/v1", context_window: 40}
"""
    long = "word " * 400
    with serve(create_app(parse_config(config))) as url:
        for path, body, param in [("/v1/completions", {"model": "tiny", "prompt": long}, "prompt"),
                                  ("/v1/chat/completions",
                                   {"model": "tiny", "messages": [{"role": "user", "content": long}]}, "messages"),
                                  ("/v1/responses", {"model": "tiny", "input": long}, "input")]:
            status, _, raw = http("POST", url + path, body)
            error = json.loads(raw)["error"]
            assert (status, error["code"], error["param"]) == (400, "context_length_exceeded", param), raw
