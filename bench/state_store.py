"""State store: per-operation latency (p50/p99) of LocalStore and RedisStore on loopback; RESULTS.md."""

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

from redis.asyncio import Redis  # noqa: E402
from report import stamp, write_section  # noqa: E402

from policies.redis_state import RedisStore  # noqa: E402
from policies.state import LocalStore, Reservation, StateStore  # noqa: E402

SECTION = "## State store"
REDIS_URL = "redis://127.0.0.1:6379/15"
VALUE = b"x" * 1024  # about one cached chat completion


def operations(store: StateStore) -> dict[str, Callable[[], Awaitable[object]]]:
    three = [Reservation("user", 1e-6, 1e9, 60), Reservation("team", 1e-6, 1e9, 3600), Reservation("org", 1e-6, 1e9)]
    return {
        "set (1 KiB, ttl)": lambda: store.set("cache", VALUE, ttl_s=60),
        "get (hit)": lambda: store.get("cache"),
        "counter": lambda: store.counter("user"),
        "reserve (3 counters)": lambda: store.reserve(three),
        "adjust (3 counters)": lambda: store.adjust([("user", -1e-7), ("team", -1e-7), ("org", -1e-7)]),
        "rate (GCRA)": lambda: store.rate("rl", 1e9, 1e9),
        "publish": lambda: store.publish("revoked", b"key-id"),
    }


async def measure(call: Callable[[], Awaitable[object]], n: int) -> tuple[float, float]:
    for _ in range(n // 10):  # warm-up: connections, script cache
        await call()
    samples = []
    for _ in range(n):
        start = time.perf_counter_ns()
        await call()
        samples.append(time.perf_counter_ns() - start)
    q = statistics.quantiles(samples, n=100)
    return q[49] / 1000, q[98] / 1000


async def raw_ping(n: int) -> tuple[float, float]:
    """PING over a bare asyncio stream, no client library: the loopback round trip every RedisStore call pays."""
    reader, writer = await asyncio.open_connection("127.0.0.1", 6379)

    async def ping() -> None:
        writer.write(b"*1\r\n$4\r\nPING\r\n")
        await reader.readuntil(b"\r\n")

    try:
        return await measure(ping, n)
    finally:
        writer.close()


async def concurrent_rps(store: StateStore, tasks: int, n: int) -> float:
    items = [Reservation("c", 1e-6, 1e9, 60)]

    async def worker() -> None:
        for _ in range(n // tasks):
            await store.reserve(items)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return n / (time.perf_counter() - start)


async def run(n: int) -> list[str]:
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    rps: dict[str, float] = {}
    prefix = f"pointsman-bench:{uuid.uuid4().hex}:"
    stores: dict[str, StateStore] = {"LocalStore": LocalStore(), "RedisStore": RedisStore(REDIS_URL, prefix=prefix)}
    try:
        for name, store in stores.items():
            for op, call in operations(store).items():
                rows.setdefault(op, {})[name] = await measure(call, n)
            if name == "RedisStore":  # in the same minute as the Redis figures: loopback noise moves both
                ping = await raw_ping(n)
            rps[name] = await concurrent_rps(store, 16, n * 5)
    finally:
        for store in stores.values():
            await store.aclose()
        admin = Redis.from_url(REDIS_URL)
        keys = [key async for key in admin.scan_iter(match=prefix + "*")]
        if keys:
            await admin.delete(*keys)
        await admin.aclose()
    lines = ["| operation | LocalStore p50 | p99 | RedisStore p50 | p99 |", "|---|---:|---:|---:|---:|"]
    for op, by_store in rows.items():
        (lp50, lp99), (rp50, rp99) = by_store["LocalStore"], by_store["RedisStore"]
        lines.append(f"| {op} | {lp50:.1f} us | {lp99:.1f} us | {rp50:.1f} us | {rp99:.1f} us |")
    lines.append(f"| PING over a bare asyncio stream (reference) | | | {ping[0]:.1f} us | {ping[1]:.1f} us |")
    rps_line = ", ".join(f"{name} {value:,.0f}/s" for name, value in rps.items())
    return [
        *lines,
        "",
        f"Throughput of reserve (1 counter) from 16 concurrent tasks: {rps_line}. The PING row is the loopback "
        "round trip with no client library; what RedisStore adds above it is redis-py (pool, timeouts, command "
        "packing) and the Lua scripts. Figures on this shared 2-core machine move by up to 2x between runs.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=2000, help="calls per operation and store")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    args = parser.parse_args()
    try:
        import uvloop  # the gateway's loop

        uvloop.install()
    except ImportError:
        pass
    table = asyncio.run(run(args.n))
    body = [
        stamp(),
        f"Sequential calls from one task on uvloop, {args.n:,} per operation after a warm-up; RedisStore talks to "
        "redis-server on 127.0.0.1:6379 (database 15) over one pooled connection, each operation one round trip "
        "(reserve, adjust and rate are Lua scripts run by EVALSHA).",
        "",
        *table,
    ]
    print("\n".join(body))
    if not args.no_write:
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
