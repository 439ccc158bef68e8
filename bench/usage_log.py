"""Usage log: the cost of add() on the request path and sustained batched writes to SQLite and PostgreSQL."""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import sqlalchemy as sa  # noqa: E402
from report import stamp, write_section  # noqa: E402

from policies.database import migrate, open_engine  # noqa: E402
from policies.usage_log import UsageLog, UsageRow  # noqa: E402

SECTION = "## Usage log"
PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


def sample_row(i: int) -> UsageRow:
    return UsageRow(request_id=f"req-{i:012d}", status="ok", key_id="key-1", user="alice", team="research",
                    model_requested="auto", model_served="smollm2-135m-instruct", route="auto", task="chat",
                    prompt_tokens=120, completion_tokens=48, cost_usd=0.0000312, latency_ms=84.5, ttft_ms=12.25,
                    cache="miss", http_status=200)


def add_cost(n: int) -> tuple[float, float]:
    """ns per add() of a ready row, and ns per building a UsageRow plus add() (what a request pays)."""
    usage = UsageLog(open_engine("sqlite+aiosqlite://"), max_pending=n + 1, batch_size=n + 1)  # never started
    row = sample_row(0)
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in range(n):
            usage.add(row)
        add_only = (time.perf_counter_ns() - start) / n
        usage._pending.clear()
        start = time.perf_counter_ns()
        for i in range(n):
            usage.add(UsageRow(request_id="req", status="ok", key_id="key-1", model_requested="auto",
                               model_served="m", prompt_tokens=i, completion_tokens=i, latency_ms=1.0))
        with_build = (time.perf_counter_ns() - start) / n
    finally:
        gc.enable()
    return add_only, with_build


async def sustained(url: str, rows: int, batch_size: int, schema: str | None = None) -> tuple[float, float, int]:
    """Rows/s from the first add to the last row written, the loop's worst stall meanwhile (ms), INSERTs sent."""
    await migrate(url, schema=schema)
    engine = open_engine(url, schema=schema)
    batch = [sample_row(i) for i in range(rows)]
    usage = UsageLog(engine, batch_size=batch_size, max_pending=max(rows, batch_size))
    worst = 0.0
    done = False

    async def ticker() -> None:  # how long a request would wait for the loop while batches are prepared
        nonlocal worst
        while not done:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - before - 0.001)

    tick = asyncio.create_task(ticker())
    usage.start()
    start = time.perf_counter()
    for i, row in enumerate(batch):  # a steady stream of requests, yielding to the loop as requests do
        usage.add(row)
        if i % 100 == 99:
            await asyncio.sleep(0)
    while usage.written < rows:
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - start
    done = True
    await tick
    await usage.aclose()
    async with engine.connect() as connection:
        assert await connection.scalar(sa.select(sa.func.count()).select_from(sa.table("usage_rows"))) == rows
    await engine.dispose()
    return rows / elapsed, worst * 1000, usage.batches


async def pg_schema(sql: str) -> bool:
    engine = open_engine(PG_URL, connect_args={"timeout": 3})
    try:
        async with engine.begin() as connection:
            await connection.execute(sa.text(sql))
        return True
    except (OSError, sa.exc.SQLAlchemyError, TimeoutError) as exc:
        print(f"PostgreSQL not reachable at 127.0.0.1:5432: {exc}")
        return False
    finally:
        await engine.dispose()


async def writes(rows: int, batch_sizes: list[int]) -> list[str]:
    table = ["| database | batch_size | rows/s | INSERTs | worst loop stall |", "|---|---:|---:|---:|---:|"]
    for batch_size in batch_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            rate, stall, inserts = await sustained(f"sqlite+aiosqlite:///{tmp}/usage.db", rows, batch_size)
        table.append(f"| SQLite (aiosqlite, WAL) | {batch_size} | {rate:,.0f} | {inserts} | {stall:.1f} ms |")
        print(table[-1])
        schema = f"bench_{uuid.uuid4().hex[:12]}"
        if await pg_schema(f"CREATE SCHEMA {schema}"):
            try:
                rate, stall, inserts = await sustained(PG_URL, rows, batch_size, schema)
            finally:
                await pg_schema(f"DROP SCHEMA {schema} CASCADE")
            table.append(f"| PostgreSQL (asyncpg, loopback) | {batch_size} | {rate:,.0f} | {inserts} "
                         f"| {stall:.1f} ms |")
            print(table[-1])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--adds", type=int, default=1_000_000)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 500, 2000])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    add_only, with_build = add_cost(args.adds)
    print(f"add(): {add_only:.0f} ns; UsageRow(...) + add(): {with_build:.0f} ns")
    table = asyncio.run(writes(args.rows, args.batch_sizes))
    body = [
        stamp(),
        "",
        f"On the request path ({args.adds:,} calls, gc off): `UsageLog.add(row)` costs {add_only:.0f} ns; building",
        f"a `UsageRow` (8 fields set) and adding it costs {with_build:.0f} ns.",
        "",
        f"Sustained writes: {args.rows:,} rows (every column set) added from the loop in steps of 100, timed from",
        "the first add to the last row committed, one writer task, one INSERT (executemany) per batch. The worst",
        "loop stall is the largest delay a 1 ms timer saw meanwhile: what a request waits while a batch's",
        "parameters are prepared on the loop.",
        "",
        *table,
        "",
        "Reading: the writer holds the loop while SQLAlchemy builds a batch's parameters (and asyncpg encodes them),",
        "so the worst stall grows with batch_size while the loop time per row stays about the same. At the default",
        "500 a request can wait ~5-15 ms (noisy) behind a full batch; at 100, ~3-6 ms for ~30% less throughput. A",
        "prototype that skips SQLAlchemy's parameter processing (`exec_driver_sql`, precompiled positional SQL)",
        "inserted 500 rows in ~5 ms instead of ~8-10 on SQLite and ~10-12 instead of ~11-13 on PostgreSQL",
        "(2026-11-25, one run): not adopted yet.",
    ]
    if not args.no_write:
        write_section(SECTION, body)
        print(f"wrote the '{SECTION}' section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
