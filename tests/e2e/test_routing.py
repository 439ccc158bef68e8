"""Routing against real upstream processes: chains, fallback, deployments, failover, /v1/route, recommend."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests.conftest import free_port, http, start_gateway, start_upstream
from tests.spec.openai import validate


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routing")
    a, b = start_upstream(tmp, "model-a"), start_upstream(tmp, "model-b")
    dead = f"http://127.0.0.1:{free_port()}/v1"
    config = f"""
routing:
  retries: 2
  health_check_s: 0.5
  circuit_breaker: {{failures: 3, cooldown_s: 30}}
  profiles:
    coding: {{quality: 1.0, cost: 0, latency: 0, load: 0}}
models:
  - id: coder
    backend: openai
    base_url: {a.url}
    capabilities: {{code: 0.95, reasoning: 0.7, chat: 0.4}}
    quality: 0.8
    pricing: {{input_per_mtok: 5.0, output_per_mtok: 15.0}}
    context_window: 8192
  - id: chatty
    backend: openai
    base_url: {b.url}
    capabilities: {{chat: 0.9, code: 0.2, creative: 0.8}}
    quality: 0.5
    pricing: {{input_per_mtok: 0.1, output_per_mtok: 0.2}}
    context_window: 64
  - id: pair
    backend: openai
    load_balancing: round_robin
    pricing: {{input_per_mtok: 10, output_per_mtok: 30}}
    deployments:
      - {{base_url: "{a.url}", weight: 1}}
      - {{base_url: "{b.url}", weight: 1}}
    load: lazy
  - id: half-dead
    backend: openai
    pricing: {{input_per_mtok: 10, output_per_mtok: 30}}
    deployments:
      - {{base_url: "{dead}"}}
      - {{base_url: "{b.url}"}}
    load: lazy
  - id: gone
    backend: openai
    base_url: {dead}
    pricing: {{input_per_mtok: 10, output_per_mtok: 30}}
    load: lazy
"""
    gateway = start_gateway(tmp, config)
    yield gateway, a, b
    gateway.stop()
    a.stop()
    b.stop()


def _chat(gateway, model: str | None = None, text: str = "hi", **extra):
    body = {"messages": [{"role": "user", "content": text}], **extra}
    if model is not None:
        body["model"] = model
    return http("POST", gateway.url + "/v1/chat/completions", body)


def _served(response) -> tuple[str, str]:
    status, headers, raw = response
    assert status == 200, raw
    body = json.loads(raw)
    assert body["model"] == headers["x-pointsman-model"]
    return headers["x-pointsman-model"], headers["x-pointsman-route"]


def test_manual_auto_and_task_header(pair):
    gateway, _, _ = pair
    assert _served(_chat(gateway, "coder")) == ("coder", "manual")
    status, headers, _ = _chat(gateway, "auto", "Write a Python function that reverses a linked list.")
    assert status == 200 and headers["x-pointsman-route"] == "auto" and headers["x-pointsman-task"] == "code"
    # chat goes to the cheap chat model under auto-cheap
    assert _served(_chat(gateway, "auto-cheap", "hey, how are you doing today?"))[0] == "chatty"


def test_chain_falls_back_before_first_byte(pair):
    gateway, _, _ = pair
    assert _served(_chat(gateway, "gone:chatty")) == ("chatty", "fallback")
    assert _served(_chat(gateway, "gone:auto-coding", "fix this bug: def f(: pass")) == ("coder", "fallback")
    # an upstream 5xx is retried on the next element; a 4xx is the client's problem and is relayed
    assert _served(_chat(gateway, "coder:chatty", "status:503@model-a"))[0] == "chatty"
    assert _served(_chat(gateway, "coder:chatty", "status:429@model-a"))[0] == "chatty"
    assert _chat(gateway, "coder:chatty", "status:400@model-a")[0] == 400
    status, headers, raw = _chat(gateway, "gone:chatty", stream=True)
    assert status == 200 and headers["x-pointsman-model"] == "chatty" and raw.endswith(b"data: [DONE]\n\n")


def test_legacy_fields(pair):
    gateway, _, _ = pair
    status, headers, _ = _chat(gateway, None, "Translate 'good morning' into Spanish.", auto_select=True)
    assert status == 200 and headers["x-pointsman-route"] == "auto"
    assert _served(_chat(gateway, None, preferred_model="gone", fallback_mode="chatty")) == ("chatty", "fallback")
    # without a fallback the dead model's error comes back: 502, or 503 once its breaker opened
    status, _, raw = _chat(gateway, None, preferred_model="gone", fallback_mode="none")
    assert (status, json.loads(raw)["error"]["code"]) in {(502, "upstream_unavailable"), (503, "service_unavailable")}
    assert _served(_chat(gateway, None, models=["gone", "coder"])) == ("coder", "fallback")
    # the routing fields are the gateway's: upstreams never see them
    sent = json.loads(_chat(gateway, "coder", route={"prefer": "cost"}, auto_select=False)[2])["x_received"]["body"]
    assert "route" not in sent and "auto_select" not in sent


def test_route_requirements_no_model_meets_are_the_clients_400(pair):
    gateway, _, _ = pair
    status, _, raw = _chat(gateway, "auto", "hey, how are you doing today?", route={"min_quality": 1.0})
    error = json.loads(raw)["error"]  # every model's quality is below 1.0: a 400 naming the field, not a 503
    assert (status, error["code"], error["param"]) == (400, "no_model_meets_requirements", "route"), raw
    assert "coder: quality 0.8 < min_quality 1.0" in error["message"]


def test_context_window_fallback(pair):
    gateway, _, _ = pair
    long_text = "word " * 400  # ~500 tokens: more than chatty's 64-token window
    assert _served(_chat(gateway, "chatty", long_text, max_tokens=16)) == ("coder", "fallback")


def test_deployments_round_robin_and_failover(pair):
    gateway, a, b = pair
    seen = [json.loads(_chat(gateway, "pair")[2])["x_received"] for _ in range(4)]
    assert len(seen) == 4  # both deployments answered
    before = json.loads(http("GET", b.url.removesuffix("/v1") + "/stats")[2])["requests"]
    for _ in range(6):  # the dead deployment is retried on the live one; the breaker then skips it
        assert _served(_chat(gateway, "half-dead"))[0] == "half-dead"
    after = json.loads(http("GET", b.url.removesuffix("/v1") + "/stats")[2])["requests"]
    assert after - before == 6


@pytest.mark.parametrize("words", [3, 0])  # 0: the upstream broke after its role chunk, before any text
def test_broken_stream_continues_on_another_deployment(pair, words):
    gateway, _, _ = pair
    text = f"one two three four five six break:{words}@model-a"
    body = {"model": "pair", "messages": [{"role": "user", "content": text}], "stream": True,
            "stream_options": {"include_usage": True}}
    for _ in range(2):  # round robin: one of the two runs starts on model-a, which breaks after 3 chunks
        status, _, raw = http("POST", gateway.url + "/v1/chat/completions", body)
        assert status == 200
        events = raw.decode().split("\n\n")
        assert events[-2] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
        assert all("error" not in c for c in chunks), chunks
        for chunk in chunks:
            validate(chunk, "CreateChatCompletionStreamResponse")
        assert len({c["id"] for c in chunks}) == 1
        roles = [c for c in chunks if c["choices"] and "role" in c["choices"][0]["delta"]]
        assert len(roles) == 1
        content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert content == f"echo: {text}"
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"] is not None


def test_route_explains_without_calling_a_model(pair):
    gateway, a, _ = pair
    before = json.loads(http("GET", a.url.removesuffix("/v1") + "/stats")[2])["requests"]
    prompt = "Prove that the square root of 2 is irrational."
    body = {"model": "auto", "messages": [{"role": "user", "content": prompt}]}
    status, _, raw = http("POST", gateway.url + "/v1/route", body)
    assert status == 200
    explained = json.loads(raw)
    assert explained["task"] == "reasoning" and explained["mode"] == "auto"
    assert set(explained) >= {"model", "mode", "task", "task_confidence", "complexity", "candidates", "chain"}
    gone = next(c for c in explained["candidates"] if c["model"] == "gone")
    assert set(gone["components"]) == {"quality", "cost", "latency", "load"}
    assert explained["chain"][0] == explained["model"]
    after = json.loads(http("GET", a.url.removesuffix("/v1") + "/stats")[2])["requests"]
    assert after == before
    status, _, raw = http("POST", gateway.url + "/v1/route", {"model": "coder", "messages": body["messages"]})
    assert json.loads(raw)["mode"] == "manual" and json.loads(raw)["model"] == "coder"


def test_recommend_shape(pair):
    gateway, _, _ = pair
    for path in ("/v1/models/recommend", "/models/recommend"):
        status, _, raw = http("POST", gateway.url + path, {"prompt": "Write a SQL query that counts users by country."})
        assert status == 200
        answer = json.loads(raw)
        assert set(answer) >= {"recommended_model", "confidence", "alternatives", "reasoning"}
        assert answer["recommended_model"] == "coder" and "code" in answer["reasoning"]
        assert all(set(alt) == {"model", "score"} for alt in answer["alternatives"])


async def _load(url: str, total: int, concurrency: int) -> list[int]:
    statuses: list[int] = []
    queue = iter(range(total))
    body = {"model": "pair", "messages": [{"role": "user", "content": "load"}]}
    async with aiohttp.ClientSession() as session:
        async def worker() -> None:
            for _ in queue:
                async with session.post(url + "/v1/chat/completions", json=body) as response:
                    payload = await response.json()
                    if response.status == 200:
                        validate(payload, "CreateChatCompletionResponse")
                    statuses.append(response.status)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def test_killing_a_deployment_under_load_fails_no_request(tmp_path):
    a, b = start_upstream(tmp_path, "a"), start_upstream(tmp_path, "b")
    config = f"""
models:
  - id: pair
    backend: openai
    deployments: [{{base_url: "{a.url}"}}, {{base_url: "{b.url}"}}]
"""
    gateway = start_gateway(tmp_path, config)
    try:
        async def scenario() -> list[int]:
            load = asyncio.create_task(_load(gateway.url, 600, 8))
            async with aiohttp.ClientSession() as session:  # wait until b has served a share of the load
                while (await (await session.get(b.url.removesuffix("/v1") + "/stats")).json())["requests"] < 50:
                    assert not load.done(), "the load ended before b served 50 requests"
            b.proc.kill()  # mid-run: in-flight and later requests on b must land on a
            return await load

        statuses = asyncio.run(scenario())
        assert len(statuses) == 600 and set(statuses) == {200}
    finally:
        gateway.stop()
        a.stop()
        b.stop()
