"""What a continued stream keeps: the token limit (what is left of it), a tool call or finish in the continuation's
opening chunk, one role, a prefill's own message, the time to the first token, the tokens counted before the break;
and what the relay keeps from the client: the usage chunk it did not ask for."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from config.loader import parse_config
from gateway.pipeline import Pipeline
from gateway.service import Gateway
from policies.base import STAGES, PolicyChain
from policies.context import Outcome, RequestContext
from protocol.errors import UpstreamInvalidResponse, UpstreamStatusError, UpstreamUnavailable
from protocol.openai import ChatCompletionRequest, ParsedRequest, decode_request

CONFIG = """
routing: {health_check_s: 0, load_balancing: round_robin}
models:
  - id: m
    backend: openai
    deployments: [{base_url: "http://127.0.0.1:1/v1"}, {base_url: "http://127.0.0.1:2/v1"},
                  {base_url: "http://127.0.0.1:3/v1"}]
"""
BREAK = object()  # in a script: the connection breaks here
RATE_LIMITED = object()  # in a script: the upstream answers 429 with a Retry-After of 20 s


def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, **extra) -> dict:
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None, **extra}],
            **({"usage": usage} if usage is not None else {})}


def usage_chunk(prompt: int, completion: int) -> dict:
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


class Scripted:
    """A Backend whose deployment i streams scripts[i] (chunks, then BREAK or the end); it keeps what each got."""

    def __init__(self, model, scripts: list[list]) -> None:
        self.model, self.scripts = model, scripts
        self.deployments = [(f"d{i}", 1.0) for i in range(3)]
        self.got: list[tuple[int, ParsedRequest]] = []

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def stream(self, request: ParsedRequest, deployment: int = 0, headers=None) -> AsyncIterator[bytes]:
        self.got.append((deployment, request))
        for item in self.scripts[deployment]:
            if item is BREAK:
                raise UpstreamUnavailable("connection reset", code="upstream_stream_broken")
            if item is RATE_LIMITED:
                raise UpstreamStatusError(429, b'{"error": {"message": "slow down"}}', headers={"retry-after": "20"})
            yield json.dumps(item).encode()


class SystemPrompt:
    """A policy that rewrites the request in admit, as a prompt template or an experiment's arm does."""

    name, stage = "system", STAGES["template"]

    async def admit(self, ctx: RequestContext) -> None:
        raw = {**ctx.request.raw, "messages": [{"role": "system", "content": "S"}, *ctx.request.raw["messages"]]}
        ctx.request = decode_request(raw, ChatCompletionRequest)

    async def approve(self, ctx: RequestContext, decision: object) -> None: ...

    async def settle(self, ctx: RequestContext, outcome: Outcome) -> None: ...


async def _run(scripts: list[list], body: dict, policies: PolicyChain | None = None,
               ) -> tuple[list[dict], RequestContext, Scripted]:
    config = parse_config(CONFIG)
    backend = Scripted(config.models[0], scripts)
    request = decode_request({"model": "m", "stream": True, "messages": [{"role": "user", "content": "go"}], **body},
                             ChatCompletionRequest)
    ctx = RequestContext(request, request_id="r")
    started = await Pipeline(Gateway(config, {"m": backend}), policies or PolicyChain()).stream(ctx)
    payloads = [started.first] if started.first is not None else []
    async for payload in started.rest:
        payloads.append(payload)
    return [json.loads(p) for p in payloads], ctx, backend


def _text(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def test_a_continuation_is_asked_for_what_is_left_of_max_tokens():
    """It was sent max_tokens again, and a stream of max_tokens 4 gave the client 7 tokens (over a budget too)."""
    first = [chunk({"role": "assistant", "content": ""}), chunk({"content": "a"}), chunk({"content": "b"}),
             chunk({"content": "c"}), BREAK]
    rest = [chunk({"role": "assistant", "content": ""}), chunk({"content": "d"}), chunk({}, "length")]
    chunks, ctx, backend = await _run([first, rest, rest], {"max_tokens": 4})
    assert _text(chunks) == "abcd" and ctx.completion_tokens == 4
    assert backend.got[1][1].raw["max_tokens"] == 1 and backend.got[1][1].body.max_tokens == 1


async def test_no_continuation_once_max_tokens_is_used_up():
    first = [chunk({"role": "assistant", "content": ""}), chunk({"content": "a"}), chunk({"content": "b"}), BREAK]
    with pytest.raises(UpstreamUnavailable):
        await _run([first, [chunk({"content": "x"}), chunk({}, "stop")], []], {"max_completion_tokens": 2})


async def test_a_continuation_opening_with_a_tool_call_keeps_its_id_and_name():
    """The opening chunk was dropped whenever it had no text: the call's id and name with it."""
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get", "arguments": ""}}
    first = [chunk({"role": "assistant", "content": ""}), BREAK]
    rest = [chunk({"role": "assistant", "content": None, "tool_calls": [call]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}), chunk({}, "tool_calls")]
    chunks, _, _ = await _run([first, rest, []], {})
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if c["choices"][0]["delta"].get("tool_calls")]
    assert calls[0]["id"] == "call_1" and calls[0]["function"]["name"] == "get"
    assert sum(1 for c in chunks if c["choices"][0]["delta"].get("role")) == 1


async def test_a_continuation_opening_with_the_finish_keeps_it_and_its_text_has_one_role():
    first = [chunk({"role": "assistant", "content": ""}), chunk({"content": "The"}), BREAK]
    rest = [chunk({"role": "assistant", "content": " end"}), chunk({"content": ""}, "stop")]
    chunks, _, _ = await _run([first, rest, []], {})
    assert _text(chunks) == "The end" and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert sum(1 for c in chunks if c["choices"][0]["delta"].get("role")) == 1


async def test_a_prefill_is_continued_in_its_own_message():
    """A request continuing its own last assistant message (as /v1/messages sends a prefill) got a second one."""
    first = [chunk({"role": "assistant", "content": ""}), chunk({"content": " quick"}), BREAK]
    rest = [chunk({"content": " brown"}), chunk({}, "stop")]
    _, _, backend = await _run([first, rest, []], {
        "messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": "The"}],
        "continue_final_message": True, "add_generation_prompt": False})
    assert backend.got[1][1].raw["messages"] == [{"role": "user", "content": "go"},
                                                 {"role": "assistant", "content": "The quick"}]


async def test_a_continued_stream_keeps_its_time_to_first_token_and_its_counted_tokens():
    """The broken deployment's usage on every chunk (vLLM's continuous usage) outlived the break, and its TTFT was
    lost with its lease."""
    first = [chunk({"role": "assistant", "content": ""}, usage={"prompt_tokens": 3, "completion_tokens": 0}),
             *(chunk({"content": w}, usage={"prompt_tokens": 3, "completion_tokens": i + 1})
               for i, w in enumerate("abcde")), BREAK]
    rest = [chunk({"content": w}) for w in "fghij"] + [chunk({}, "stop")]
    chunks, ctx, _ = await _run([first, rest, []], {})
    assert _text(chunks) == "abcdefghij" and ctx.completion_tokens == 10
    assert ctx.ttft_s is not None and ctx.attempts[0].ttft_s == ctx.ttft_s


async def test_a_client_that_did_not_ask_for_usage_gets_none_and_the_prompt_is_still_counted():
    """Budgets and rate limits charged no prompt tokens for a stream without include_usage."""
    script = [chunk({"role": "assistant", "content": ""}), chunk({"content": "hi"}), chunk({}, "stop"),
              usage_chunk(11, 1)]
    chunks, ctx, backend = await _run([script, [], []], {})
    assert all(c["choices"] for c in chunks) and "usage" not in chunks[-1]
    assert (ctx.prompt_tokens, ctx.completion_tokens) == (11, 1)
    assert backend.got[0][1].raw["stream_options"] == {"include_usage": True}
    asked, _, _ = await _run([script, [], []], {"stream_options": {"include_usage": True}})
    assert asked[-1]["usage"]["prompt_tokens"] == 11


async def test_a_streamed_refusal_and_stop_reason_are_kept_for_the_cache():
    script = [chunk({"role": "assistant", "refusal": ""}), chunk({"refusal": "I can't"}),
              chunk({"refusal": " help."}), chunk({}, "stop", stop_reason="STOP")]
    config = parse_config(CONFIG)
    request = decode_request({"model": "m", "stream": True, "messages": [{"role": "user", "content": "go"}]},
                             ChatCompletionRequest)
    ctx = RequestContext(request, request_id="r")
    started = await Pipeline(Gateway(config, {"m": Scripted(config.models[0], [script, [], []])}),
                             PolicyChain()).stream(ctx)
    async for _ in started.rest:
        pass
    choice = json.loads(started.assembled())["choices"][0]
    assert choice["message"]["refusal"] == "I can't help." and choice["message"]["content"] is None
    assert choice["stop_reason"] == "STOP"


@pytest.mark.parametrize("delta", [{"index": 0, "function": "get"}, {"index": 0, "function": {"arguments": {}}},
                                   {"index": "0"}])
async def test_a_malformed_tool_call_delta_is_an_upstream_fault(delta):
    """It raised AttributeError or TypeError: the stream failed 'inside the gateway'."""
    script = [chunk({"role": "assistant", "content": ""}), chunk({"tool_calls": [delta]}), chunk({}, "stop")]
    with pytest.raises(UpstreamInvalidResponse, match="malformed tool-call delta"):
        await _run([script, [], []], {"n": 2})


async def test_a_stream_and_its_continuation_get_the_request_as_the_policies_left_it():
    """The streamed request was taken before admit: a template's or an experiment's rewrite never went upstream."""
    first = [chunk({"role": "assistant", "content": ""}), chunk({"content": "a"}), BREAK]
    rest = [chunk({"content": "b"}), chunk({}, "stop")]
    _, _, backend = await _run([first, rest, []], {}, PolicyChain([SystemPrompt()]))
    for _, got in backend.got:
        assert got.raw["messages"][0] == {"role": "system", "content": "S"} and got.include_usage


async def test_a_first_payload_of_only_usage_is_kept_from_a_client_that_did_not_ask():
    script = [usage_chunk(5, 0), chunk({"role": "assistant", "content": ""}), chunk({"content": "hi"}),
              chunk({}, "stop")]
    chunks, ctx, _ = await _run([script, [], []], {})
    assert all(c["choices"] for c in chunks) and ctx.prompt_tokens == 5


async def test_usage_a_client_did_not_ask_for_is_dropped_from_every_chunk():
    """Asked for usage on the client's behalf, a model puts `"usage":null` on a text completion's chunks (which the
    spec's CompletionUsage does not allow) or, as vLLM's continuous usage, counts beside each chunk's choices."""
    from protocol.openai import CompletionRequest

    config = parse_config(CONFIG)
    text = {"id": "c", "object": "text_completion", "created": 1, "model": "m"}
    script = [{**text, "choices": [{"index": 0, "text": "hi", "finish_reason": None, "logprobs": None}],
               "usage": None},
              {**text, "choices": [{"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}],
               "usage": None},
              {**text, "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}]
    backend = Scripted(config.models[0], [script, [], []])
    ctx = RequestContext(decode_request({"model": "m", "prompt": "go", "stream": True}, CompletionRequest))
    started = await Pipeline(Gateway(config, {"m": backend}), PolicyChain()).stream(ctx)
    chunks = [json.loads(started.first)] + [json.loads(p) async for p in started.rest]
    assert len(chunks) == 2 and all("usage" not in c for c in chunks) and ctx.prompt_tokens == 2
    continuous = [chunk({"role": "assistant", "content": ""}, usage={"prompt_tokens": 3, "completion_tokens": 0}),
                  chunk({"content": "a"}, usage={"prompt_tokens": 3, "completion_tokens": 1}), chunk({}, "stop")]
    chunks, ctx, _ = await _run([continuous, [], []], {})
    assert all("usage" not in c for c in chunks) and ctx.prompt_tokens == 3
    chunks, _, _ = await _run([continuous, [], []], {"stream_options": {"include_usage": True}})
    assert chunks[1]["usage"]["completion_tokens"] == 1  # asked for: as it came


async def test_a_stream_that_will_not_be_continued_takes_no_probe_from_a_half_open_deployment():
    """The next deployment was chosen before the continuation was found impossible (its max_tokens used up): the
    choice took a half-open breaker's one probe, held until the probe's timeout, and no request reached it."""
    from routing.breaker import CircuitBreaker

    now = [0.0]
    config = parse_config(CONFIG)
    backend = Scripted(config.models[0], [[chunk({"role": "assistant", "content": ""}), chunk({"content": "a"}),
                                            chunk({"content": "b"}), BREAK], [], []])
    gateway = Gateway(config, {"m": backend})
    pool = gateway.pools["m"]
    for index in (1, 2):  # both others open, then past their cooldown: half-open, one probe each
        pool.breakers[index] = breaker = CircuitBreaker(failures=1, cooldown_s=1, clock=lambda: now[0])
        breaker.record_failure()
    now[0] = 5.0
    request = decode_request({"model": "m", "stream": True, "max_tokens": 2,
                              "messages": [{"role": "user", "content": "go"}]}, ChatCompletionRequest)
    ctx = RequestContext(request, request_id="r")
    with pytest.raises(UpstreamUnavailable):
        async for _ in (await Pipeline(gateway, PolicyChain()).stream(ctx)).rest:
            pass
    assert pool.breakers[1].allow() and pool.breakers[2].allow()  # each probe still there for a request


async def test_a_continuation_refused_with_a_429_holds_that_deployment_and_goes_on():
    """A 429 opening a continuation keeps that deployment out for its Retry-After, as a 429 at the start does."""
    config = parse_config(CONFIG)
    first = [chunk({"role": "assistant", "content": ""}), chunk({"content": "a"}), BREAK]
    rest = [chunk({"role": "assistant", "content": ""}), chunk({"content": "b"}), chunk({}, "stop")]
    backend = Scripted(config.models[0], [first, [RATE_LIMITED], rest])
    gateway = Gateway(config, {"m": backend})
    request = decode_request({"model": "m", "stream": True, "messages": [{"role": "user", "content": "go"}]},
                             ChatCompletionRequest)
    started = await Pipeline(gateway, PolicyChain()).stream(RequestContext(request, request_id="r"))
    chunks = [json.loads(started.first), *[json.loads(p) async for p in started.rest]]
    assert _text(chunks) == "ab" and [index for index, _ in backend.got] == [0, 1, 2]
    held = [breaker.held_s() for breaker in gateway.pools["m"].breakers]
    assert held[0] is None and held[2] is None and 19 < held[1] <= 20
