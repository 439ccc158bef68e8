"""Semantic cache: lookup cost (p50/p99) with 10,000 entries in one bucket, embedding excluded and included."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import numpy as np  # noqa: E402
from report import stamp, write_section  # noqa: E402

from backends.embedder import Embedder  # noqa: E402
from config.schema import CacheConfig, SemanticCacheConfig  # noqa: E402
from policies.context import Outcome, Principal, RequestContext  # noqa: E402
from policies.redis_state import RedisStore  # noqa: E402
from policies.semantic_cache import MAX_ENTRIES, SemanticCache  # noqa: E402
from policies.state import LocalStore, StateStore  # noqa: E402
from protocol.openai import ChatCompletionRequest, decode_request  # noqa: E402

SECTION = "## Semantic cache"
REDIS_URL = "redis://127.0.0.1:6379/15"
CONFIG = CacheConfig(semantic=SemanticCacheConfig(enabled=True, similarity=0.9))
ANSWER = b'{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":' + (
    b'{"role":"assistant","content":"' + b"y" * 900 + b'"},"finish_reason":"stop"}]}'
)
PROMPT = "How do I reset my password on the company laptop?"


def context(text: str) -> RequestContext:
    raw = {"model": "m", "messages": [{"role": "user", "content": text}], "temperature": 0}
    return RequestContext(decode_request(raw, ChatCompletionRequest), principal=Principal(key_id="bench"))


async def fill(store: StateStore, n: int) -> None:
    """n entries of random unit vectors in the bucket of PROMPT's requests (through settle, as traffic would)."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = iter(vectors)

    async def embed(text: str) -> np.ndarray:
        return next(rows)

    cache = SemanticCache(CONFIG, store, embed, lambda name: name)
    for i in range(n):
        ctx = context(f"filler {i}")
        ctx.state["request_headers"] = {"cache-control": "no-cache"}  # store, don't look up
        await cache.admit(ctx)
        await cache.settle(ctx, Outcome("ok", body=ANSWER))


async def delete_prefix(prefix: str) -> None:
    from redis.asyncio import Redis

    admin = Redis.from_url(REDIS_URL)
    keys = [key async for key in admin.scan_iter(match=prefix + "*", count=1000)]
    for i in range(0, len(keys), 1000):
        await admin.delete(*keys[i : i + 1000])
    await admin.aclose()


async def measure(call: Callable[[], Awaitable[object]], n: int) -> tuple[float, float]:
    for _ in range(min(50, n)):
        await call()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        times.append(time.perf_counter() - start)
    p99 = statistics.quantiles(times, n=100)[98]
    return statistics.median(times) * 1e3, p99 * 1e3


async def run(n: int, entries: int) -> list[str]:
    embedder = Embedder(threads=2)
    query = await embedder.embed(PROMPT)
    rows = []
    for label, store in (("LocalStore", LocalStore()), ("RedisStore", None)):
        if store is None:
            store = RedisStore(REDIS_URL, prefix=f"pointsman-bench:{uuid.uuid4().hex}:")
        await fill(store, entries)

        async def cached(text: str) -> np.ndarray:
            return query

        fresh = SemanticCache(CONFIG, store, cached, lambda name: name)  # a replica that mirrors the bucket anew
        start = time.perf_counter()
        await fresh.admit(context(PROMPT))
        first_ms = (time.perf_counter() - start) * 1e3
        without = await measure(lambda c=fresh: c.admit(context(PROMPT)), n)
        real = SemanticCache(CONFIG, store, embedder.embed, lambda name: name)
        await real.admit(context(PROMPT))
        with_embedding = await measure(lambda c=real: c.admit(context(PROMPT)), n)
        embed_only = await measure(lambda: embedder.embed(PROMPT), n)
        rows.append(
            f"| {label} | {without[0]:.2f} ms | {without[1]:.2f} ms | {with_embedding[0]:.2f} ms | "
            f"{with_embedding[1]:.2f} ms | {embed_only[0]:.2f} ms | {first_ms:.0f} ms |"
        )
        if isinstance(store, RedisStore):  # the bench's own keys: the entries and the index
            await delete_prefix(store.prefix)
        await store.aclose()
    await embedder.aclose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=500, help="lookups per measurement")
    parser.add_argument("--entries", type=int, default=MAX_ENTRIES)
    parser.add_argument("--no-write", action="store_true", help="print, don't touch RESULTS.md")
    args = parser.parse_args()
    rows = asyncio.run(run(args.n, args.entries))
    body = [
        stamp(),
        f"One bucket holding {args.entries:,} entries (random unit vectors, stored through `settle`), then "
        f"{args.n} lookups of one 10-word chat prompt through `admit` (a miss: no stored vector is within 0.9), "
        "sequential, after a warm-up. The index is already mirrored, so each lookup is one `append(since=total)` "
        "round trip (nothing new), one 10,000 x 384 float32 matrix-vector product and the argmax; `with "
        "embedding` adds all-MiniLM-L6-v2 on 2 torch threads in the worker thread. `first lookup` is a replica "
        "mirroring the whole bucket (~15 MB) on its first request.",
        "",
        "| store | lookup p50 | p99 | with embedding p50 | p99 | embedding alone p50 | first lookup |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    print("\n".join(body))
    if not args.no_write:
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
