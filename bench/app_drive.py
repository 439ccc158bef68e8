"""What the in-process benchmarks drive: the mock-upstream config and the policy configs added to it, and chat
requests handed to the app's ASGI callable as uvicorn hands them over. It imports nothing of the gateway, so a
benchmark can drive another checkout's app with it (bench/paired.py)."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from typing import Any

__all__ = ["BASE", "CONCURRENCY", "CONFIGS", "cpu_us", "drive", "lifespan", "post"]

BASE = """
models:
  - {id: bench-model, backend: openai, base_url: "%s/v1", upstream_model: mock-model}
storage: {database_url: ""}
"""
RATE_LIMIT = "  rate_limits: [{scope: key, rpm: 100000000, tpm: 100000000000}]\n"
BUDGET = "  budgets: [{scope: global, period: day, max_tokens: 100000000000}]\n"
CACHE = "  cache: {mode: deterministic, ttl_s: 3600}\n"
CHAIN = "policies:\n" + RATE_LIMIT + BUDGET + CACHE
METRICS = "metrics: {enabled: true}\n"
TRACING = "tracing: {enabled: true, exporter: none, sample_ratio: %s}\n"
# what each benchmark adds to BASE, by name: each policy alone, the three, then metrics, then traces at a ratio
CONFIGS = {
    "none": "",
    "rate": "policies:\n" + RATE_LIMIT,
    "budget": "policies:\n" + BUDGET,
    "cache": "policies:\n" + CACHE,
    "chain": CHAIN,
    "metrics": CHAIN + METRICS,
    "traces0": CHAIN + METRICS + TRACING % 0.0,
    "traces0.1": CHAIN + METRICS + TRACING % 0.1,
    "traces1": CHAIN + METRICS + TRACING % 1.0,
}
CONCURRENCY = 16
_HEADERS = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]


async def post(app: Callable[..., Any], body: bytes) -> None:
    """One POST /v1/chat/completions through the ASGI app, as uvicorn hands it over; it must answer 200."""
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Future()  # the client never leaves
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
             "headers": [*_HEADERS, (b"content-length", b"%d" % len(body))]}
    await app(scope, receive, send)
    if sent[0]["status"] != 200:
        raise RuntimeError(f"answered {sent[0]['status']}: {sent[1].get('body', b'')[:300]!r}")


async def drive(app: Callable[..., Any], n: int, tag: str) -> None:
    """`n` requests, CONCURRENCY at a time, each with a new deterministic prompt (a cache miss, then stored)."""
    async def client(first: int) -> None:
        for i in range(first, n, CONCURRENCY):
            await post(app, b'{"model":"bench-model","temperature":0,"messages":[{"role":"user","content":"%s %d"}]}'
                       % (tag.encode(), i))

    await asyncio.gather(*(client(first) for first in range(CONCURRENCY)))


async def lifespan(app: Callable[..., Any]) -> tuple[asyncio.Queue, asyncio.Task]:
    """Start the app as uvicorn does (its startup hooks build the pipeline); the queue's message stops it."""
    inbox: asyncio.Queue = asyncio.Queue()
    started = asyncio.get_running_loop().create_future()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set_result(None)
        elif message["type"] == "lifespan.startup.failed":
            started.set_exception(RuntimeError(message.get("message")))

    inbox.put_nowait({"type": "lifespan.startup"})
    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send))
    await started
    return inbox, task


async def cpu_us(app: Callable[..., Any], n: int, tag: str) -> float:
    """This process's CPU microseconds a request over `drive(app, n, tag)`, garbage collected first."""
    gc.collect()
    started = time.process_time()
    await drive(app, n, tag)
    return (time.process_time() - started) / n * 1e6
