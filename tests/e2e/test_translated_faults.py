"""Faults on the translated routes (/v1/responses, /v1/messages) through a live gateway: an upstream answer whose
fields have the wrong types is a 502 in the route's own error shape (never a 500, never an empty 200), and stored
responses answer 503 while the state store (a real redis-server, killed) cannot be reached."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator

import pytest
from aiohttp import web

from tests.conftest import Process, free_port, http, start_gateway

ANTHROPIC = {"x-api-key": "none", "anthropic-version": "2023-06-01"}
BASE = {"id": "chatcmpl-odd", "object": "chat.completion", "created": 1, "model": "up"}
ODD = {
    "id an int": {**BASE, "id": 5, "choices": [{"index": 0, "message": {"content": "the answer"},
                                                 "finish_reason": "stop"}]},
    "finish_reason an int": {**BASE, "choices": [{"index": 0, "message": {"content": "the answer"},
                                                   "finish_reason": 5}]},
    "choices [1]": {**BASE, "choices": [1]},
    "message a string": {**BASE, "choices": [{"index": 0, "message": "hi", "finish_reason": "stop"}]},
}


class ScriptedUpstream:
    """A chat completions upstream, in a thread, that answers the JSON the prompt holds: `answer` as the plain
    body, `chunks` as the stream's payloads."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ScriptedUpstream:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _run(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    @staticmethod
    async def _models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    @staticmethod
    async def _chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        script = json.loads(body["messages"][-1]["content"])
        if not body.get("stream"):
            return web.json_response(script["answer"])
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for chunk in script["chunks"]:
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> Iterator[Process]:
    with ScriptedUpstream() as upstream:
        config = f"""
models:
  - {{id: ctl, backend: openai, base_url: "{upstream.url}", upstream_model: up}}
routing: {{health_check_s: 0}}
policies:
  budgets: [{{scope: global, period: day, max_tokens: 100000000}}]
"""
        gateway = start_gateway(tmp_path_factory.mktemp("translated"), config)
        yield gateway
        gateway.stop()


def _prompt(**script) -> str:
    return json.dumps(script)


@pytest.mark.parametrize("answer", ODD.values(), ids=ODD.keys())
def test_an_unreadable_answer_is_a_502_in_each_routes_shape(scripted, answer):
    prompt = _prompt(answer=answer)
    status, _, raw = http("POST", scripted.url + "/v1/messages", {
        "model": "ctl", "max_tokens": 5, "messages": [{"role": "user", "content": prompt}]}, ANTHROPIC)
    body = json.loads(raw)
    assert status == 502 and body["type"] == "error" and body["error"]["type"] == "api_error", body
    status, _, raw = http("POST", scripted.url + "/v1/responses", {"model": "ctl", "input": prompt})
    body = json.loads(raw)
    if answer["id"] == 5:  # the chat answer's id is not read for a Response (which has its own): served
        assert status == 200 and body["output"][0]["content"][0]["text"] == "the answer", body
    else:
        assert status == 502 and body["error"]["code"] == "upstream_invalid_response", body
    assert "Traceback" not in scripted.output()


def test_an_unreadable_answer_still_settles_its_reservation(scripted):
    """The 502 was raised before the answer's settle was set up: its budget reservation was never released."""
    def used() -> float:
        return json.loads(http("GET", scripted.url + "/v1/usage")[2])["budgets"][0]["used_tokens"]

    before = used()
    prompt = _prompt(answer=ODD["choices [1]"])
    status, _, _ = http("POST", scripted.url + "/v1/messages", {
        "model": "ctl", "max_tokens": 50, "messages": [{"role": "user", "content": prompt}]}, ANTHROPIC)
    assert status == 502 and used() == before  # the answer carried no usage: nothing is charged


def test_an_unreadable_chunk_fails_the_stream(scripted):
    chunk = {**BASE, "object": "chat.completion.chunk",
             "choices": [{"index": 0, "delta": {"content": [{"type": "text", "text": "hi"}]}, "finish_reason": 5}]}
    prompt = _prompt(chunks=[chunk])
    status, _, raw = http("POST", scripted.url + "/v1/responses", {"model": "ctl", "input": prompt, "stream": True})
    last = json.loads(raw.decode().rstrip().rsplit("\ndata: ", 1)[1])
    assert status == 200 and last["type"] == "response.failed"
    assert "could not be read" in last["response"]["error"]["message"]  # an upstream fault, not the gateway's own
    status, _, raw = http("POST", scripted.url + "/v1/messages", {
        "model": "ctl", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": prompt}]},
        ANTHROPIC)
    assert status == 200 and b"event: error" in raw and b"message_stop" not in raw


def test_content_parts_and_refusals_reach_the_client(scripted):
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world."}]
    answer = {**BASE, "choices": [{"index": 0, "message": {"content": parts}, "finish_reason": "stop"}]}
    status, _, raw = http("POST", scripted.url + "/v1/responses", {"model": "ctl", "input": _prompt(answer=answer)})
    assert status == 200 and json.loads(raw)["output"][0]["content"][0]["text"] == "Hello, world."
    refused = {**BASE, "choices": [{"index": 0, "message": {"content": None, "refusal": "No."},
                                    "finish_reason": "stop"}]}
    status, _, raw = http("POST", scripted.url + "/v1/messages", {
        "model": "ctl", "max_tokens": 5, "messages": [{"role": "user", "content": _prompt(answer=refused)}]},
        ANTHROPIC)
    body = json.loads(raw)
    assert status == 200 and body["content"] == [{"type": "text", "text": "No."}] and body["stop_reason"] == "refusal"


# ---- stored responses while the state store is down ------------------------------------------------------------


def test_stored_responses_answer_503_while_the_store_is_down(upstream, redis_server, tmp_path):
    config = f"""
models:
  - {{id: remote-a, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
routing: {{health_check_s: 0}}
storage: {{redis_url: "{redis_server.url}", database_url: "sqlite+aiosqlite:///{tmp_path}/usage.db"}}
"""
    gateway = start_gateway(tmp_path, config)
    try:
        status, _, raw = http("POST", gateway.url + "/v1/responses", {"model": "remote-a", "input": "hello"})
        assert status == 200
        rid = json.loads(raw)["id"]
        redis_server.kill()
        follow_up = {"model": "remote-a", "input": "and?", "previous_response_id": rid}
        for method, path, body in (("POST", "/v1/responses", follow_up),
                                   ("POST", "/v1/responses", {**follow_up, "stream": True}),
                                   ("GET", f"/v1/responses/{rid}", None),
                                   ("DELETE", f"/v1/responses/{rid}", None)):
            status, _, raw = http(method, gateway.url + path, body)
            assert status == 503, (method, path, status, raw)
            assert json.loads(raw)["error"]["code"] == "service_unavailable"
        assert "Traceback" not in gateway.output()
        assert "responses: stored responses cannot be read" in gateway.output()
    finally:
        gateway.stop()
