"""The exact cache policy, driven directly over LocalStore and RedisStore: keys, tenants, headers, replay."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import msgspec
import pytest

from config.schema import CacheConfig
from policies.cache import ExactCache, replay_chunks
from policies.context import Outcome, Principal, Reply, RequestContext
from policies.redis_state import RedisStore
from policies.state import StateStore
from protocol.openai import ChatCompletionRequest, CompletionRequest, decode_request
from tests.conftest import free_port
from tests.policies.conftest import eventually
from tests.spec.openai import validate

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the stores' pools live in the fixtures' loop

MODELS = {"fast": "org/fast-model", "org/fast-model": "org/fast-model", "slow": "org/slow-model"}
ALICE = Principal(key_id="k-alice", team="red")
BOB = Principal(key_id="k-bob", team="blue")


def resolve(name: str) -> str:
    return MODELS.get(name, name)


def chat(content: str = "hi", **fields: Any) -> dict[str, Any]:
    return {"model": "fast", "messages": [{"role": "user", "content": content}], "temperature": 0, **fields}


def context(
    raw: dict[str, Any],
    principal: Principal = ALICE,
    headers: dict[str, str] | None = None,
    kind: type[ChatCompletionRequest] | type[CompletionRequest] = ChatCompletionRequest,
) -> RequestContext:
    ctx = RequestContext(decode_request(raw, kind), principal=principal, request_id=uuid.uuid4().hex)
    if headers is not None:
        ctx.state["request_headers"] = headers
    return ctx


def answer(text: str = "Hello there!", n: int = 1, model: str = "org/fast-model") -> bytes:
    return msgspec.json.encode(
        {
            "id": "chatcmpl-upstream",
            "object": "chat.completion",
            "created": 1700000000,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": f"{text} #{i}", "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
                for i in range(n)
            ],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        }
    )


def text_answer(text: str = "once upon a time") -> bytes:
    return msgspec.json.encode(
        {
            "id": "cmpl-upstream",
            "object": "text_completion",
            "created": 1700000000,
            "model": "org/fast-model",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9},
        }
    )


async def served(cache: ExactCache, raw: dict[str, Any], body: bytes | None = None, **kwargs: Any) -> RequestContext:
    """One request through admit and settle, answered by `body` (default: a fresh answer) on a miss."""
    ctx = context(raw, **kwargs)
    reply = await cache.admit(ctx)
    await cache.settle(ctx, Outcome("answered") if reply is not None else Outcome("ok", body=body or answer()))
    return ctx


async def hit(cache: ExactCache, raw: dict[str, Any], **kwargs: Any) -> Reply | None:
    return await cache.admit(context(raw, **kwargs))


def make(store: StateStore, **config: Any) -> ExactCache:
    return ExactCache(CacheConfig(**config), store, resolve)


async def test_miss_then_store_then_hit_with_a_fresh_id(store: StateStore) -> None:
    cache = make(store)
    ctx = context(chat())
    assert await cache.admit(ctx) is None
    assert ctx.cache == "miss" and ctx.headers["x-pointsman-cache"] == "miss"
    await cache.settle(ctx, Outcome("ok", body=answer()))
    again = context(chat())
    reply = await cache.admit(again)
    assert reply is not None and reply.headers == {"x-pointsman-cache": "hit", "x-pointsman-model": "org/fast-model"}
    assert again.cache == "hit" and again.model == "org/fast-model"
    assert (again.prompt_tokens, again.completion_tokens, again.cost_usd) == (7, 3, 0.0)
    body = msgspec.json.decode(reply.body)
    validate(body, "CreateChatCompletionResponse")
    assert body["id"].startswith("chatcmpl-") and body["id"] != "chatcmpl-upstream"
    assert body["created"] >= int(time.time()) - 5
    assert body["choices"] == msgspec.json.decode(answer())["choices"]
    second = msgspec.json.decode((await hit(make(store), chat())).body)  # another instance shares the store
    assert second["id"] != body["id"]


async def test_a_streamed_hit_replays_a_valid_stream(store: StateStore) -> None:
    cache = make(store)
    await served(cache, chat(n=2), answer(n=2))
    reply = await hit(cache, chat(n=2, stream=True, stream_options={"include_usage": True}))
    assert reply is not None and reply.body == b"" and reply.headers["x-pointsman-cache"] == "hit"
    chunks = [msgspec.json.decode(c) for c in reply.chunks]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert {(c["object"], c["model"], c["created"]) for c in chunks} == {
        ("chat.completion.chunk", "org/fast-model", chunks[0]["created"])
    }
    role, content, finish, usage = chunks
    assert [p["delta"] for p in role["choices"]] == [{"role": "assistant", "content": ""}] * 2
    assert [(p["index"], p["delta"]["content"]) for p in content["choices"]] == [
        (0, "Hello there! #0"),
        (1, "Hello there! #1"),
    ]
    assert all(p["finish_reason"] is None and p["logprobs"] is None for p in role["choices"] + content["choices"])
    assert [p["finish_reason"] for p in finish["choices"]] == ["stop", "stop"]
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 10
    assert all(c["usage"] is None for c in chunks[:-1])
    plain = await hit(cache, chat(n=2, stream=True))  # without include_usage: no usage chunk, no usage field
    assert len(plain.chunks) == 3 and all("usage" not in msgspec.json.decode(c) for c in plain.chunks)


async def test_text_completions_are_cached_apart_from_chat(store: StateStore) -> None:
    cache = make(store)
    raw = {"model": "fast", "prompt": "hi", "temperature": 0}
    ctx = await served(cache, raw, text_answer(), kind=CompletionRequest)
    assert ctx.cache == "miss"
    reply = await hit(cache, raw, kind=CompletionRequest)
    body = msgspec.json.decode(reply.body)
    validate(body, "CreateCompletionResponse")
    assert body["id"].startswith("cmpl-") and body["choices"][0]["text"] == "once upon a time"
    streamed = await hit(cache, {**raw, "stream": True}, kind=CompletionRequest)
    chunks = [msgspec.json.decode(c) for c in streamed.chunks]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == "once upon a time"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "length"]
    # the same fields sent to the chat endpoint are another request
    assert await hit(cache, {**raw, "messages": [{"role": "user", "content": "hi"}]}) is None


async def test_a_replayed_text_completion_stream_sends_usage_only_in_its_last_chunk(store: StateStore) -> None:
    """A text_completion's `usage` is a CompletionUsage object in OpenAI's spec, never null: with include_usage
    the chunks before the usage chunk leave it out rather than send `usage: null` (chat's chunks do send it)."""
    cache = make(store)
    raw = {"model": "fast", "prompt": "hi", "temperature": 0}
    await served(cache, raw, text_answer(), kind=CompletionRequest)
    streamed = await hit(cache, {**raw, "stream": True, "stream_options": {"include_usage": True}},
                         kind=CompletionRequest)
    *texts, usage = [msgspec.json.decode(c) for c in streamed.chunks]
    assert [c["choices"][0]["finish_reason"] for c in texts] == [None, "length"]
    assert all("usage" not in c for c in texts)
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 9
    validate({**usage, "choices": []}, "CreateCompletionResponse")


def streamed_answer(text: str = "Hello there!") -> bytes:
    """An answer put together from a stream whose client did not ask for usage (StreamRelay.assembled): no usage."""
    body = msgspec.json.decode(answer(text))
    del body["usage"]
    return msgspec.json.encode(body)


async def test_an_entry_without_usage_answers_only_streams_that_do_not_ask_for_it(store: StateStore) -> None:
    """A plain answer always carries `usage` and `include_usage` promises a usage chunk: an entry stored from a
    stream without usage cannot keep either promise, so those requests miss, and their answer replaces it."""
    cache = make(store)
    stored = await served(cache, chat(stream=True), streamed_answer("streamed"))
    assert stored.cache == "miss"
    assert await hit(cache, chat(stream=True)) is not None  # asks for no usage: the entry serves it
    wants_usage = context(chat(stream=True, stream_options={"include_usage": True}))
    assert await cache.admit(wants_usage) is None and wants_usage.cache == "miss"
    plain = context(chat())
    assert await cache.admit(plain) is None and plain.cache == "miss"
    await cache.settle(plain, Outcome("ok", body=answer("plain")))  # the answer with usage takes its place
    body = msgspec.json.decode((await hit(cache, chat())).body)
    validate(body, "CreateChatCompletionResponse")
    assert body["usage"]["total_tokens"] == 10 and body["choices"][0]["message"]["content"] == "plain #0"
    chunks = [msgspec.json.decode(c) for c in (await hit(cache, chat(stream=True, stream_options={
        "include_usage": True}))).chunks]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 10


async def test_tenants_never_share_unless_configured(store: StateStore) -> None:
    cache = make(store)
    await served(cache, chat(), principal=ALICE)
    assert await hit(cache, chat(), principal=Principal(key_id="k-alice-2", team="red")) is not None  # same team
    assert await hit(cache, chat(), principal=BOB) is None
    await served(cache, chat(), principal=Principal(key_id="k-solo"))
    assert await hit(cache, chat(), principal=Principal(key_id="k-solo")) is not None
    assert await hit(cache, chat(), principal=Principal(key_id="k-other")) is None
    assert await hit(cache, chat(), principal=Principal(key_id=None)) is None
    shared = make(store, shared=True)
    await served(shared, chat(), principal=ALICE)
    assert await hit(shared, chat(), principal=BOB) is not None
    assert await hit(shared, chat(), principal=Principal(key_id=None)) is not None


async def test_a_key_never_gets_a_cached_answer_from_a_model_it_may_not_use(store: StateStore) -> None:
    """A teammate's (or, shared, anyone's) cached answer from a model the key may not use was served to it."""
    for cache in (make(store), make(store, shared=True)):
        await served(cache, chat(), principal=ALICE)
        limited = Principal(key_id="k-limited", team="red", allowed_models=("other-*",))
        assert await hit(cache, chat(), principal=limited) is None
        assert await hit(cache, chat(), principal=Principal(key_id="k-ok", team="red",
                                                            allowed_models=("fast*", "org/*"))) is not None


async def test_sampled_requests_are_cached_only_in_always_mode(store: StateStore) -> None:
    deterministic = make(store)
    ctx = await served(deterministic, chat(temperature=0.7))
    assert ctx.cache == "bypass" and ctx.headers["x-pointsman-cache"] == "bypass"
    assert await hit(deterministic, chat(temperature=0.7)) is None
    assert (await served(deterministic, chat(temperature=0.7, seed=3))).cache == "miss"  # a seed is deterministic
    assert await hit(deterministic, chat(temperature=0.7, seed=3)) is not None
    assert (await served(deterministic, chat(n=3), answer(n=3))).cache == "miss"  # n > 1 at temperature 0
    assert await hit(deterministic, chat(n=3)) is not None
    always = make(store, mode="always")
    assert (await served(always, chat(temperature=0.7))).cache == "miss"
    assert await hit(always, chat(temperature=0.7)) is not None
    off = make(store, mode="off")
    ctx = context(chat())
    assert await off.admit(ctx) is None and ctx.cache is None and ctx.headers == {}


async def test_request_headers_control_lookup_store_and_ttl(store: StateStore) -> None:
    cache = make(store)
    ctx = await served(cache, chat("a"), headers={"cache-control": "no-store"})
    assert ctx.cache == "miss"
    assert await hit(cache, chat("a")) is None  # not stored
    await served(cache, chat("a"), answer("first"))
    ctx = context(chat("a"), headers={"cache-control": "max-age=0, No-Cache"})
    assert await cache.admit(ctx) is None and ctx.cache == "bypass"  # the lookup skipped...
    await cache.settle(ctx, Outcome("ok", body=answer("second")))  # ...the answer still stored
    body = msgspec.json.decode((await hit(cache, chat("a"))).body)
    assert body["choices"][0]["message"]["content"] == "second #0"
    await served(cache, chat("b"), headers={"x-pointsman-cache-ttl": "0.2"})
    assert await hit(cache, chat("b")) is not None

    async def expired() -> bool:
        return await hit(cache, chat("b")) is None

    await eventually(expired)
    await served(cache, chat("c"), headers={"x-pointsman-cache-ttl": "soon"})  # ignored: the configured TTL
    assert await hit(cache, chat("c")) is not None


async def test_keys_ignore_delivery_fields_and_follow_aliases(store: StateStore) -> None:
    cache = make(store)
    await served(cache, chat(user="u1"))
    for same in (
        chat(model="org/fast-model"),
        chat(user="u2", stream=True),
        chat(route={"prefer": "cost"}),
        {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "model": "fast"},
    ):
        assert await hit(cache, same) is not None, same
    for other in (chat(model="slow"), chat("hi!"), chat(max_tokens=5), chat(temperature=0, seed=1)):
        assert await hit(cache, other) is None, other


async def test_automatic_choices_bypass(store: StateStore) -> None:
    cache = make(store)
    for raw in (
        chat(model="auto"),
        chat(model="auto-fast"),
        chat(model="fast:slow"),
        {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "models": ["fast", "slow"]},
        chat(auto_select=True),
    ):
        ctx = await served(cache, raw)
        assert ctx.cache == "bypass" and "cache" not in ctx.state, raw
        assert await hit(cache, raw) is None


async def test_only_whole_small_plain_answers_are_stored(store: StateStore) -> None:
    cache = make(store, max_entry_kb=1)
    envelope = len(answer(""))
    small, large = answer("x" * (1024 - envelope)), answer("x" * (1025 - envelope))
    assert (len(small), len(large)) == (1024, 1025)  # max_entry_kb is KiB, the bound inclusive
    await served(cache, chat("big"), large)
    assert await hit(cache, chat("big")) is None
    await served(cache, chat("small"), small)
    assert await hit(cache, chat("small")) is not None
    for outcome in (
        Outcome("ok", body=b"not json"),
        Outcome("ok", body=b'{"error": 1}'),
        Outcome("ok"),
        Outcome("cancelled"),
        Outcome("answered"),
    ):
        ctx = context(chat("other"))
        await cache.admit(ctx)
        await cache.settle(ctx, outcome)
        assert await hit(cache, chat("other")) is None, outcome
    ctx = context(chat("fallback"))
    await cache.admit(ctx)
    ctx.model = "org/slow-model"  # a fallback served it: not the requested model's answer
    await cache.settle(ctx, Outcome("ok", body=answer()))
    assert await hit(cache, chat("fallback")) is None


async def test_an_unreachable_store_bypasses_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    dead = RedisStore(f"redis://127.0.0.1:{free_port()}/15", timeout_s=0.1)
    cache = make(dead)
    caplog.set_level(logging.INFO, logger="pointsman.policies.cache")
    try:
        for _ in range(3):
            ctx = context(chat())
            assert await cache.admit(ctx) is None
            assert ctx.cache == "bypass" and ctx.headers["x-pointsman-cache"] == "bypass"
            await cache.settle(ctx, Outcome("ok", body=answer()))  # never raises
        ctx = context(chat(), headers={"cache-control": "no-cache"})  # the lookup skipped, the store fails
        await cache.admit(ctx)
        await cache.settle(ctx, Outcome("ok", body=answer()))
    finally:
        await dead.aclose()
    warnings_logged = [r for r in caplog.records if r.name == "pointsman.policies.cache"]
    assert len(warnings_logged) == 1 and warnings_logged[0].levelno == logging.WARNING


async def test_cache_key_is_the_sha256_of_the_canonical_body() -> None:
    """The documented key, recomputed with hashlib here: fields outside the key dropped (or none to drop), keys
    sorted at every depth, `model` replaced by the resolved id."""
    import hashlib

    from policies.cache import cache_key

    plain = {"model": "alias", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    delivered = {**plain, "stream": True, "user": "u1", "stream_options": {"include_usage": True}}
    canonical = b'{"messages":[{"content":"hi","role":"user"}],"model":"chat","temperature":0}'
    expected = "cache:shared:" + hashlib.sha256(b"chat\n" + canonical).hexdigest()
    assert cache_key(plain, "chat", "chat", "shared") == expected
    assert cache_key(delivered, "chat", "chat", "shared") == expected
    assert cache_key(plain, "chat", "completion", "shared") != expected
    assert plain["model"] == "alias" and "stream" in delivered  # the request's own body is left as it was


async def test_a_replayed_stream_keeps_the_stop_string_that_ended_it() -> None:
    """vLLM's stop_reason was dropped from replays: /v1/messages then said end_turn where it had said stop_sequence."""
    entry = msgspec.json.decode(answer())
    entry["choices"][0]["stop_reason"] = "STOP"
    for chat_kind in (True, False):
        last = replay_chunks(entry, "id", 1, chat=chat_kind, include_usage=False)[-1]["choices"][0]
        assert last["stop_reason"] == "STOP" and last["finish_reason"] == "stop"
    del entry["choices"][0]["stop_reason"]
    assert "stop_reason" not in replay_chunks(entry, "id", 1, chat=True, include_usage=False)[-1]["choices"][0]
