"""The policy chain's cost in context: chat requests through the whole app (its ASGI callable, as uvicorn calls it:
Litestar, the pipeline, the real upstream client) to the mock upstream, 16 at a time, without policies and with
each policy, the chain (rate limit, budget, exact cache; every request a cache miss), then metrics and tracing.
The figure is this process's CPU time per request: no server socket and no load generator share the measurement,
so its best of a few rounds moves by about 5% between runs, where wrk's RPS on this machine moves by tens of
percent (bench/gateway.py). A warm loop around Pipeline.complete alone, as this script measured before, found half
of what the same code costs here."""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from report import stamp, write_section  # noqa: E402

from config.loader import parse_config  # noqa: E402
from gateway.app import create_app  # noqa: E402
from tests.conftest import start_upstream  # noqa: E402

SECTION = "## Policy chain in process"
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
NONE = "no policies"
VARIANTS = [
    (NONE, ""),
    ("rate limit", "policies:\n" + RATE_LIMIT),
    ("budget", "policies:\n" + BUDGET),
    ("exact cache (miss)", "policies:\n" + CACHE),
    ("rate limit + budget + exact cache", CHAIN),
    ("the chain + metrics", CHAIN + METRICS),
    ("the chain + metrics + traces, sample_ratio 0.1", CHAIN + METRICS + TRACING % 0.1),
    ("the chain + metrics + traces, sample_ratio 1.0", CHAIN + METRICS + TRACING % 1.0),
]
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


async def cpu_per_request(upstream: str, extra: str, n: int, tag: str) -> float:
    """CPU microseconds this process spends per request with `extra` config, after a warm-up of n/5 requests."""
    app = create_app(parse_config(BASE % upstream + extra))
    inbox, task = await lifespan(app)
    try:
        await drive(app, n // 5, f"warm {tag}")
        gc.collect()
        started = time.process_time()
        await drive(app, n, tag)
        return (time.process_time() - started) / n * 1e6
    finally:
        inbox.put_nowait({"type": "lifespan.shutdown"})
        await task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=4000, help="requests per variant and round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of every variant, interleaved; each figure is its best round (this machine is "
                             "shared: a round that others' load slowed down is not the code's cost)")
    parser.add_argument("--write", action="store_true", help="write the figures into bench/RESULTS.md")
    args = parser.parse_args()
    upstream = start_upstream(Path(tempfile.mkdtemp(prefix="policy-chain-")))
    url = upstream.url.removesuffix("/v1")
    best: dict[str, float] = {}
    try:
        for round_ in range(args.rounds):
            for label, extra in VARIANTS:
                cpu = uvloop.run(cpu_per_request(url, extra, args.n, f"r{round_} {label}"))
                best[label] = min(best.get(label, cpu), cpu)
                print(f"round {round_ + 1}  {label:50} {cpu:7.1f} us CPU per request", flush=True)
    finally:
        upstream.stop()
    base = best[NONE]
    table = ["| chat request through the app to the mock upstream, c16 | CPU us per request | added |",
             "|---|---:|---:|",
             *(f"| {label} | {cpu:.1f} | {cpu - base:+.1f} |" for label, cpu in best.items())]
    print("\n".join(table))
    if args.write:
        note = f"Each figure is the best of {args.rounds} interleaved rounds of {args.n} requests."
        write_section(SECTION, [stamp(), "", __doc__.replace("\n", " ").strip(), note, "", *table])
        print(f"wrote the '{SECTION}' section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
