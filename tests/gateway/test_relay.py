"""The stream relay: continues a broken stream on another deployment under the original id, books each
deployment's lease once, counts tokens into the context, and books a cancellation when the client leaves."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from config.loader import parse_config
from gateway.pipeline import Pipeline
from gateway.service import Gateway
from policies.base import PolicyChain
from policies.context import RequestContext
from protocol.errors import UpstreamUnavailable
from protocol.openai import ChatCompletionRequest, ParsedRequest, decode_request

CONFIG = """
routing: {health_check_s: 0, load_balancing: round_robin}
models:
  - id: m
    backend: openai
    deployments: [{base_url: "http://127.0.0.1:1/v1"}, {base_url: "http://127.0.0.1:2/v1"}]
"""
WORDS = ["The", " quick", " brown", " fox"]


def chunk(cid: str, delta: dict, finish: str | None = None) -> bytes:
    return json.dumps({"id": cid, "object": "chat.completion.chunk", "created": 1, "model": "m",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}).encode()


class ScriptedBackend:
    """A Backend whose deployment 0 breaks after `breaks_after` words; deployment 1 continues the answer."""

    def __init__(self, model, breaks_after: int) -> None:
        self.model, self.breaks_after = model, breaks_after
        self.deployments = [("d0", 1.0), ("d1", 1.0)]
        self.continued: list[ParsedRequest] = []

    async def start(self) -> None: ...

    async def health(self) -> bool:
        return True

    async def aclose(self) -> None: ...

    async def complete(self, request, deployment=0, headers=None) -> bytes:
        raise NotImplementedError

    async def stream(self, request: ParsedRequest, deployment: int = 0, headers=None) -> AsyncIterator[bytes]:
        if deployment == 0:
            yield chunk("first", {"role": "assistant", "content": ""})
            for word in WORDS[: self.breaks_after]:
                yield chunk("first", {"content": word})
            raise UpstreamUnavailable("connection reset", code="upstream_stream_broken")
        self.continued.append(request)
        last = request.raw["messages"][-1]
        prefix = last["content"] if last["role"] == "assistant" else ""
        yield chunk("second", {"role": "assistant", "content": ""})
        for word in WORDS[len(prefix.split()) if prefix else 0:]:
            yield chunk("second", {"content": word})
        yield chunk("second", {}, "stop")


def _setup(breaks_after: int):
    config = parse_config(CONFIG)
    backend = ScriptedBackend(config.models[0], breaks_after)
    gateway = Gateway(config, {"m": backend})
    request = decode_request({"model": "m", "stream": True, "messages": [{"role": "user", "content": "go"}]},
                             ChatCompletionRequest)
    return gateway, backend, RequestContext(request, request_id="r1")


async def _collect(pipeline: Pipeline, ctx: RequestContext) -> list[dict]:
    started = await pipeline.stream(ctx)
    payloads = [started.first] if started.first is not None else []
    async for payload in started.rest:
        payloads.append(payload)
    return [json.loads(p) for p in payloads]


async def test_a_broken_stream_continues_on_the_other_deployment_as_one_stream():
    gateway, backend, ctx = _setup(breaks_after=2)
    chunks = await _collect(Pipeline(gateway, PolicyChain()), ctx)
    assert {c["id"] for c in chunks} == {"first"}  # one id for the client
    roles = [c for c in chunks if c["choices"][0]["delta"].get("role")]
    assert len(roles) == 1  # the continuation's role chunk is dropped
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "".join(WORDS) and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    sent = backend.continued[0].raw
    assert sent["continue_final_message"] is True and sent["messages"][-1] == {"role": "assistant",
                                                                              "content": "The quick"}
    assert [(a.deployment, a.ok, a.error) for a in ctx.attempts] == [
        ("d0", False, "upstream_stream_broken"), ("d1", True, None)]
    assert ctx.completion_tokens == 4 and ctx.model == "m"
    pool = gateway.pools["m"]
    assert [s.in_flight for s in pool.states] == [0, 0]
    assert pool.breakers[0].snapshot()["window_failures"] == 1


async def test_a_stream_closed_by_the_client_books_a_cancellation():
    gateway, _, ctx = _setup(breaks_after=4)
    started = await Pipeline(gateway, PolicyChain()).stream(ctx)
    await anext(started.rest)
    await started.rest.aclose()  # what the SSE response does when the client leaves
    assert [(a.ok, a.error) for a in ctx.attempts] == [(False, "cancelled")]
    assert gateway.pools["m"].states[0].in_flight == 0 and gateway.pools["m"].breakers[0].state == "closed"
    assert ctx.completion_tokens == 1


async def test_a_stream_broken_before_any_text_is_asked_again_on_the_other_deployment():
    gateway, backend, ctx = _setup(breaks_after=0)
    chunks = await _collect(Pipeline(gateway, PolicyChain()), ctx)
    assert {c["id"] for c in chunks} == {"first"}
    assert len([c for c in chunks if c["choices"][0]["delta"].get("role")]) == 1
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "".join(WORDS)
    assert backend.continued[0] is ctx.request  # nothing to continue from: the same request, not a continuation
    assert [(a.deployment, a.ok) for a in ctx.attempts] == [("d0", False), ("d1", True)]


@pytest.mark.parametrize("breaks_after", [0, 2])
async def test_a_stream_with_no_other_deployment_is_an_error(breaks_after):
    config = parse_config(CONFIG.replace(', {base_url: "http://127.0.0.1:2/v1"}', ""))
    backend = ScriptedBackend(config.models[0], breaks_after)
    backend.deployments = backend.deployments[:1]
    gateway = Gateway(config, {"m": backend})
    request = decode_request({"model": "m", "stream": True, "messages": [{"role": "user", "content": "go"}]},
                             ChatCompletionRequest)
    with pytest.raises(UpstreamUnavailable):
        await _collect(Pipeline(gateway, PolicyChain()), RequestContext(request, request_id="r1"))


class ToolCallBackend(ScriptedBackend):
    """Streams one tool call as OpenAI does: id, type and name first, the arguments in two pieces."""

    async def stream(self, request: ParsedRequest, deployment: int = 0, headers=None) -> AsyncIterator[bytes]:
        yield chunk("call", {"role": "assistant", "content": None})
        yield chunk("call", {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                             "function": {"name": "get_weather", "arguments": ""}}]})
        yield chunk("call", {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]})
        yield chunk("call", {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]})
        yield chunk("call", {}, "tool_calls")


async def test_a_streamed_tool_call_is_put_together_as_the_plain_answer():
    config = parse_config(CONFIG)
    gateway = Gateway(config, {"m": ToolCallBackend(config.models[0], 0)})
    request = decode_request({"model": "m", "stream": True, "messages": [{"role": "user", "content": "weather?"}],
                              "tools": [{"type": "function", "function": {"name": "get_weather"}}]},
                             ChatCompletionRequest)
    ctx = RequestContext(request, request_id="r2")
    started = await Pipeline(gateway, PolicyChain()).stream(ctx)
    async for _ in started.rest:
        pass
    answer = json.loads(started.assembled())  # what the cache stores, and replays to a plain request
    message = answer["choices"][0]["message"]
    assert message["content"] is None and answer["choices"][0]["finish_reason"] == "tool_calls"
    assert message["tool_calls"] == [{"id": "call_1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
