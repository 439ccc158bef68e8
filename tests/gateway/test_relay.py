"""The stream relay: continues a broken stream on another deployment under the original id, books each
deployment's lease once, counts tokens into the context, and books a cancellation when the client leaves. An
upstream's error event midway is a failure like a broken stream; a continuation that is no chunk is an upstream
error; usage figures no answer has are dropped, not computed with."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from config.loader import parse_config
from gateway.pipeline import Pipeline
from gateway.service import Gateway
from policies.base import PolicyChain
from policies.budget import estimate_prompt_tokens
from policies.context import RequestContext
from protocol.errors import UpstreamInvalidResponse, UpstreamStatusError, UpstreamUnavailable
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


class CountingBackend(ScriptedBackend):
    """Deployment 0 streams at `created` 1 and breaks after two words; deployment 1 continues at `created` 2 and
    ends with a usage chunk that counts only its own two words (as vLLM counts a continuation)."""

    async def stream(self, request: ParsedRequest, deployment: int = 0, headers=None) -> AsyncIterator[bytes]:
        async for payload in super().stream(request, deployment, headers):
            yield payload.replace(b'"created": 1', b'"created": 2') if deployment else payload
        yield json.dumps({"id": "second", "object": "chat.completion.chunk", "created": 2, "model": "m",
                          "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                                   "total_tokens": 5}}).encode()


async def test_a_continued_stream_keeps_its_created_and_counts_the_words_before_the_break():
    config = parse_config(CONFIG)
    gateway = Gateway(config, {"m": CountingBackend(config.models[0], breaks_after=2)})
    request = decode_request({"model": "m", "stream": True, "stream_options": {"include_usage": True},
                              "messages": [{"role": "user", "content": "go"}]}, ChatCompletionRequest)
    ctx = RequestContext(request, request_id="r1")
    chunks = await _collect(Pipeline(gateway, PolicyChain()), ctx)
    assert {(c["id"], c["created"]) for c in chunks} == {("first", 1)}  # one stream: each chunk the same timestamp
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert ctx.completion_tokens == 4  # what budgets and the usage row count


class VendorEventBackend(ScriptedBackend):
    """The continuation sends a vendor's own event (JSON, but no chunk) after its first word."""

    async def stream(self, request: ParsedRequest, deployment: int = 0, headers=None) -> AsyncIterator[bytes]:
        words = 0
        async for payload in super().stream(request, deployment, headers):
            yield payload
            if deployment and b'"content": "' in payload and (words := words + 1) == 1:
                yield b'{"id": 1, "type": "ping"}'


async def test_a_continuation_relays_an_event_that_is_no_chunk_as_the_first_deployment_would():
    config = parse_config(CONFIG)
    gateway = Gateway(config, {"m": VendorEventBackend(config.models[0], breaks_after=2)})
    request = decode_request({"model": "m", "stream": True, "messages": [{"role": "user", "content": "go"}]},
                             ChatCompletionRequest)
    chunks = await _collect(Pipeline(gateway, PolicyChain()), RequestContext(request, request_id="r1"))
    assert {"id": 1, "type": "ping"} in chunks  # relayed as it is, not an upstream fault that ends the stream
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
    assert text == "".join(WORDS) and chunks[-1]["choices"][0]["finish_reason"] == "stop"


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
    # nothing to continue from: the same request the first deployment got (asking for the usage), no prefix
    assert backend.continued[0].raw == {**ctx.request.raw, "stream_options": {"include_usage": True}}
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


class ErrorEventBackend(ScriptedBackend):
    """Deployment 0 streams two words, then an error event (as vLLM and OpenAI report a failure mid-stream) and
    [DONE]; deployment 1 continues the answer."""

    async def stream(self, request: ParsedRequest, deployment: int = 0, headers=None) -> AsyncIterator[bytes]:
        if deployment == 1:
            async for payload in super().stream(request, 1):
                yield payload
            return
        yield chunk("first", {"role": "assistant", "content": ""})
        for word in WORDS[:2]:
            yield chunk("first", {"content": word})
        yield b'{"error": {"message": "engine died", "type": "server_error", "param": null, "code": "engine"}}'


async def test_an_error_event_midway_is_a_failure_continued_on_the_other_deployment():
    config = parse_config(CONFIG)
    gateway = Gateway(config, {"m": ErrorEventBackend(config.models[0], 2)})
    _, _, ctx = _setup(2)
    chunks = await _collect(Pipeline(gateway, PolicyChain()), ctx)
    assert all("error" not in c for c in chunks)  # it was relayed as if it were a chunk, the stream "ok"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "".join(WORDS)
    assert [(a.deployment, a.ok, a.error) for a in ctx.attempts] == [("d0", False, "engine"), ("d1", True, None)]


async def test_an_error_event_with_no_other_deployment_ends_the_stream_as_that_error():
    config = parse_config(CONFIG.replace(', {base_url: "http://127.0.0.1:2/v1"}', ""))
    backend = ErrorEventBackend(config.models[0], 2)
    backend.deployments = backend.deployments[:1]
    gateway = Gateway(config, {"m": backend})
    _, _, ctx = _setup(2)
    with pytest.raises(UpstreamStatusError) as caught:  # SSEStream writes it as the error event, then [DONE]
        await _collect(Pipeline(gateway, PolicyChain()), ctx)
    assert caught.value.status == 502 and json.loads(caught.value.body())["error"]["message"] == "engine died"
    assert [(a.ok, a.error) for a in ctx.attempts] == [(False, "engine")]


class BadContinuationBackend(ScriptedBackend):
    """Deployment 1 continues with a payload that is no JSON (one that is JSON but no chunk is relayed as it is,
    as from the first deployment: see VendorEventBackend)."""

    async def stream(self, request: ParsedRequest, deployment: int = 0, headers=None) -> AsyncIterator[bytes]:
        if deployment == 0:
            async for payload in super().stream(request, 0):
                yield payload
            return
        yield b'{"id": "second", "choices": [{"index": 0, "delta": {"content": " fox"'


async def test_a_continuation_that_is_no_json_is_an_upstream_error():
    config = parse_config(CONFIG)
    gateway = Gateway(config, {"m": BadContinuationBackend(config.models[0], 2)})
    _, _, ctx = _setup(2)
    with pytest.raises(UpstreamInvalidResponse):  # was msgspec's ValidationError: "the stream failed inside the
        await _collect(Pipeline(gateway, PolicyChain()), ctx)  # gateway", with a traceback in the log
    assert [(a.deployment, a.ok) for a in ctx.attempts] == [("d0", False), ("d1", False)]


HUGE = 10**400  # an integer JSON allows, past float's range


class HugeUsageBackend(ScriptedBackend):
    """Answers (plain or streamed) whose usage counts are past any answer's size, or negative."""

    def __init__(self, model, usage: dict) -> None:
        super().__init__(model, 0)
        self.usage = usage

    async def complete(self, request, deployment=0, headers=None) -> bytes:
        return json.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                        "finish_reason": "stop"}], "usage": self.usage}).encode()

    async def stream(self, request: ParsedRequest, deployment: int = 0, headers=None) -> AsyncIterator[bytes]:
        yield chunk("u", {"role": "assistant", "content": ""})
        yield chunk("u", {"content": "hi"})
        yield json.dumps({"id": "u", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
                          "usage": self.usage}).encode()


@pytest.mark.parametrize("usage", [{"prompt_tokens": HUGE, "completion_tokens": HUGE},
                                   {"prompt_tokens": -5, "completion_tokens": -1_000_000},
                                   {"prompt_tokens": 2**64, "completion_tokens": 2**31}])
async def test_usage_no_answer_has_is_not_believed(usage):
    """10**400 failed the float arithmetic of throughput and cost (OverflowError: a 500 for a plain request, an
    internal_error event after a finished stream); a negative count credited budgets; past 2**31 - 1 the
    usage row was refused. Such figures are dropped: the stream's own count (and the prompt's estimate) stand in."""
    config = parse_config(CONFIG.replace("backend: openai", "backend: openai\n    pricing: {input_per_mtok: 1}"))
    gateway = Gateway(config, {"m": HugeUsageBackend(config.models[0], usage)})
    pipeline = Pipeline(gateway, PolicyChain())
    plain = decode_request({"model": "m", "messages": [{"role": "user", "content": "go"}]}, ChatCompletionRequest)
    ctx = RequestContext(plain, request_id="plain")
    served = await pipeline.complete(ctx)
    assert json.loads(served.body)["choices"][0]["message"]["content"] == "hi"
    assert (ctx.prompt_tokens, ctx.completion_tokens, ctx.cost_usd) == (None, None, None)
    streamed = decode_request({"model": "m", "stream": True, "stream_options": {"include_usage": True},
                               "messages": [{"role": "user", "content": "go"}]}, ChatCompletionRequest)
    ctx = RequestContext(streamed, request_id="streamed")
    chunks = await _collect(pipeline, ctx)
    assert chunks[-1]["usage"] == usage  # relayed as it came: the client's to judge
    # the prompt as budgets estimate it, the stream's own count of its tokens
    assert (ctx.prompt_tokens, ctx.completion_tokens) == (estimate_prompt_tokens(streamed), 1) and ctx.attempts[-1].ok
