"""The semantic cache with the real MiniLM embedder, over LocalStore and RedisStore: hits, misses, buckets, replicas."""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import msgspec
import numpy as np
import pytest
from redis.asyncio import Redis

from backends.embedder import Embedder
from config.schema import CacheConfig, SemanticCacheConfig
from policies.context import Outcome, Principal, RequestContext
from policies.redis_state import RedisStore
from policies.semantic_cache import MAX_ENTRIES, SemanticCache
from policies.state import StateStore
from protocol.openai import ChatCompletionRequest, decode_request
from tests.policies.conftest import REDIS_URL

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the stores' pools live in the fixtures' loop

ALICE = Principal(key_id="k-alice", team="red")
BOB = Principal(key_id="k-bob", team="blue")
CONFIG = CacheConfig(semantic=SemanticCacheConfig(enabled=True, similarity=0.8))
ASKED = "How do I reset my password?"
PARAPHRASE = "What are the steps to reset my password?"
UNRELATED = "Give me a recipe for banana bread."


def resolve(name: str) -> str:
    return {"fast": "org/fast-model"}.get(name, name)


@pytest.fixture(scope="module")
def embedder() -> Iterator[Embedder]:
    model = Embedder(threads=2)  # loaded once, on the first embedding
    yield model


def chat(content: str, **fields: Any) -> dict[str, Any]:
    return {"model": "fast", "messages": [{"role": "user", "content": content}], "temperature": 0, **fields}


def answer(text: str) -> bytes:
    return msgspec.json.encode(
        {
            "id": "chatcmpl-upstream",
            "object": "chat.completion",
            "created": 1700000000,
            "model": "org/fast-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        }
    )


async def served(cache: SemanticCache, raw: dict[str, Any], text: str = "fresh", principal: Principal = ALICE) -> Any:
    """One request through admit and settle, answered by `text` on a miss; the context and the reply."""
    ctx = RequestContext(decode_request(raw, ChatCompletionRequest), principal=principal, request_id="r")
    reply = await cache.admit(ctx)
    await cache.settle(ctx, Outcome("answered") if reply is not None else Outcome("ok", body=answer(text)))
    return ctx, reply


async def test_a_paraphrase_hits_and_an_unrelated_prompt_misses(store: StateStore, embedder: Embedder) -> None:
    cache = SemanticCache(CONFIG, store, embedder.embed, resolve)
    ctx, reply = await served(cache, chat(ASKED), "Click 'Forgot password'.")
    assert reply is None and ctx.cache is None
    ctx, reply = await served(cache, chat(PARAPHRASE))
    assert ctx.cache == "semantic-hit"
    assert reply.headers == {"x-pointsman-cache": "semantic-hit", "x-pointsman-model": "org/fast-model"}
    body = msgspec.json.decode(reply.body)
    assert body["choices"][0]["message"]["content"] == "Click 'Forgot password'."
    assert body["id"] != "chatcmpl-upstream" and ctx.model == "org/fast-model"
    ctx, reply = await served(cache, chat(UNRELATED))
    assert reply is None
    ctx, reply = await served(cache, chat(PARAPHRASE, stream=True))  # replayed as a stream
    assert reply is not None and len(reply.chunks) == 3
    assert b"Forgot password" in reply.chunks[1]


async def test_tenants_and_parameters_are_separate_buckets(store: StateStore, embedder: Embedder) -> None:
    cache = SemanticCache(CONFIG, store, embedder.embed, resolve)
    await served(cache, chat(ASKED), "red's answer")
    assert (await served(cache, chat(PARAPHRASE), principal=BOB))[1] is None  # another team
    assert (await served(cache, chat(PARAPHRASE, max_tokens=5)))[1] is None  # other parameters
    assert (await served(cache, chat(PARAPHRASE, temperature=0, seed=1)))[1] is None
    ctx, reply = await served(cache, chat(PARAPHRASE, user="someone", stream=True))  # delivery fields: same bucket
    assert ctx.cache == "semantic-hit"


async def test_headers_and_the_exact_cache_come_first(store: StateStore, embedder: Embedder) -> None:
    cache = SemanticCache(CONFIG, store, embedder.embed, resolve)
    await served(cache, chat(ASKED))
    ctx = RequestContext(decode_request(chat(PARAPHRASE), ChatCompletionRequest), principal=ALICE)
    ctx.state["request_headers"] = {"cache-control": "no-cache"}
    assert await cache.admit(ctx) is None
    ctx = RequestContext(decode_request(chat(PARAPHRASE), ChatCompletionRequest), principal=ALICE)
    ctx.cache = "hit"  # the exact cache answered: nothing to do
    assert await cache.admit(ctx) is None and "semantic_cache" not in ctx.state
    sampled = chat(PARAPHRASE, temperature=0.7)  # mode deterministic: not cacheable
    assert (await served(cache, sampled))[1] is None


async def test_two_replicas_share_entries_through_redis(embedder: Embedder) -> None:
    admin = Redis.from_url(REDIS_URL, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        await admin.ping()
    except Exception as exc:
        await admin.aclose()
        reason = f"Redis not reachable at 127.0.0.1:6379: {type(exc).__name__}: {exc}"
        warnings.warn(reason, stacklevel=1)
        pytest.skip(reason)
    prefix = f"pointsman-test:{uuid.uuid4().hex}:"
    one, two = RedisStore(REDIS_URL, prefix=prefix), RedisStore(REDIS_URL, prefix=prefix)
    try:
        first, second = (SemanticCache(CONFIG, s, embedder.embed, resolve) for s in (one, two))
        assert (await served(second, chat(UNRELATED)))[1] is None  # second mirrors the bucket before the entry
        await served(first, chat(ASKED), "from replica one")
        ctx, reply = await served(second, chat(PARAPHRASE))
        assert ctx.cache == "semantic-hit" and b"from replica one" in reply.body
    finally:
        await one.aclose()
        await two.aclose()
        keys = [key async for key in admin.scan_iter(match=prefix + "*")]
        if keys:
            await admin.delete(*keys)
        await admin.aclose()


async def test_the_index_keeps_the_newest_entries(store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import policies.semantic_cache as module

    monkeypatch.setattr(module, "MAX_ENTRIES", 4)
    basis = np.eye(8, dtype=np.float32)

    async def embed(text: str) -> np.ndarray:
        return basis[int(text.removeprefix("user: "))]

    cache, other = SemanticCache(CONFIG, store, embed, resolve), SemanticCache(CONFIG, store, embed, resolve)
    for i in range(7):
        await served(cache, chat(str(i)), f"answer {i}")

    async def looked_up(replica: SemanticCache, i: int) -> bytes | None:
        ctx = RequestContext(decode_request(chat(str(i)), ChatCompletionRequest), principal=ALICE)
        reply = await replica.admit(ctx)
        return None if reply is None else reply.body

    for replica in (cache, other):  # `other` reads the trimmed log fresh
        assert [await looked_up(replica, i) for i in range(3)] == [None, None, None]  # dropped from the index
        for i in range(3, 7):
            assert f"answer {i}".encode() in (await looked_up(replica, i) or b"")
    assert MAX_ENTRIES == 10_000


LONG_SYSTEM = " ".join(f"Rule {i}: be helpful, precise and polite to every customer." for i in range(40))


@pytest.mark.parametrize("first,second", [
    # a long system prompt made every question alike (the conversation was embedded whole, cut at 256 tokens)
    ([{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": ASKED}],
     [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": UNRELATED}]),
    # what is not text was not compared at all: an image, a name, an earlier turn's tool call
    ([{"role": "user", "content": [{"type": "text", "text": ASKED},
                                   {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}]}],
     [{"role": "user", "content": [{"type": "text", "text": ASKED},
                                   {"type": "image_url", "image_url": {"url": "https://x/dog.png"}}]}]),
    ([{"role": "user", "content": ASKED, "name": "alice"}], [{"role": "user", "content": ASKED, "name": "bob"}]),
    ([{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "pay", "arguments": '{"amount": 10}'}}]}, {"role": "tool", "tool_call_id": "c", "content": "ok"},
      {"role": "user", "content": ASKED}],
     [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
         "name": "pay", "arguments": '{"amount": 9000}'}}]}, {"role": "tool", "tool_call_id": "c", "content": "ok"},
      {"role": "user", "content": ASKED}]),
    # a question longer than the embedder sees is compared by nothing but its start: not at all
    ([{"role": "user", "content": f"{LONG_SYSTEM} {ASKED}"}],
     [{"role": "user", "content": f"{LONG_SYSTEM} {UNRELATED}"}]),
])
async def test_only_the_last_question_is_compared_by_meaning_and_everything_else_exactly(
        store: StateStore, embedder: Embedder, first: list, second: list) -> None:
    cache = SemanticCache(CONFIG, store, embedder.embed_whole, resolve)
    principal = Principal(key_id=uuid.uuid4().hex)  # a bucket of this test's own
    await served(cache, {**chat(""), "messages": first}, "the first answer", principal=principal)
    ctx, reply = await served(cache, {**chat(""), "messages": second}, principal=principal)
    assert reply is None, msgspec.json.decode(reply.body)["choices"][0]["message"]["content"]
    ctx, reply = await served(cache, {**chat(""), "messages": first}, principal=principal)
    assert (reply is not None) is (first[-1]["content"] != f"{LONG_SYSTEM} {ASKED}")  # the same request: a hit


async def test_a_list_of_prompts_is_not_compared_by_meaning() -> None:
    """A list of prompts was embedded joined by newlines: one prompt of the same lines got its several choices."""
    from policies.semantic_cache import conversation_text
    from protocol.openai import CompletionRequest

    def text(prompt: Any) -> str | None:
        return conversation_text(RequestContext(decode_request({"model": "fast", "prompt": prompt}, CompletionRequest)))

    assert text(["What is 2+2?", "Name a color."]) is None and text([1, 2, 3]) is None
    assert text("What is 2+2?\nName a color.") == "What is 2+2?\nName a color."
