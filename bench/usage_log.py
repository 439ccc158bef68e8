"""Usage log: the cost of add() on the request path and sustained batched writes to SQLite and PostgreSQL."""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import tempfile
import time
import types
import uuid
from collections.abc import Coroutine, Generator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import sqlalchemy as sa  # noqa: E402
from report import stamp, write_section  # noqa: E402

from policies.database import migrate, open_engine  # noqa: E402
from policies.usage_log import CHUNK_ROWS, UsageLog, UsageRow  # noqa: E402

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


class StallWatch:
    """The largest delay a 1 ms timer sees until `stop()`: how long a request would wait for the loop."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._done = False
        self._task = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        while not self._done:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, time.perf_counter() - before - 0.001)

    async def stop(self) -> float:
        """The worst delay seen, in ms."""
        self._done = True
        await self._task
        return self.worst * 1000


@types.coroutine
def _timed_steps(coro: Coroutine[Any, Any, Any], steps: list[float]) -> Generator[Any, Any, Any]:
    """Runs `coro`, appending the loop thread's CPU time of each step (from one await to the next) to `steps`."""
    value, error = None, None
    while True:
        cpu = time.thread_time()
        try:
            awaited = coro.throw(error) if error is not None else coro.send(value)
        except StopIteration as stop:
            return stop.value
        finally:
            steps.append(time.thread_time() - cpu)
        try:
            value, error = (yield awaited), None
        except BaseException as exc:  # a cancellation goes on into the writer
            value, error = None, exc


def time_writer_steps(loop: asyncio.AbstractEventLoop) -> list[float]:
    """The seconds each step of a UsageLog writer task started from now on holds `loop`'s thread (CPU time, so
    waits for a core or the GIL do not count): the writer's own share of any stall."""
    steps: list[float] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        if getattr(coro, "__qualname__", "") == "UsageLog._run":
            coro = _timed_steps(coro, steps)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)
    return steps


async def idle_stall(seconds: float) -> float:
    """The worst delay (ms) of a loop doing nothing else: this machine's floor for the figure below."""
    gc.collect()
    watch = StallWatch()
    await asyncio.sleep(seconds)
    return await watch.stop()


async def sustained(url: str, rows: int, batch_size: int,
                    schema: str | None = None) -> tuple[float, float, list[float], int]:
    """Rows/s from the first add to the last row written, the loop's worst stall meanwhile (ms), the writer's
    steps (s), INSERTs sent."""
    await migrate(url, schema=schema)
    engine = open_engine(url, schema=schema)
    batch = [sample_row(i) for i in range(rows)]
    usage = UsageLog(engine, batch_size=batch_size, max_pending=max(rows, batch_size))
    gc.collect()  # the migration's garbage: a full collection of it inside the timed run is not the writer's
    loop = asyncio.get_running_loop()
    steps = time_writer_steps(loop)
    watch = StallWatch()
    usage.start()
    loop.set_task_factory(None)
    start = time.perf_counter()
    for i, row in enumerate(batch):  # a steady stream of requests, yielding to the loop as requests do
        usage.add(row)
        if i % 100 == 99:
            await asyncio.sleep(0)
    while usage.written < rows:
        await asyncio.sleep(0.001)
    elapsed = time.perf_counter() - start
    stall = await watch.stop()
    await usage.aclose()
    async with engine.connect() as connection:
        assert await connection.scalar(sa.select(sa.func.count()).select_from(sa.table("usage_rows"))) == rows
    await engine.dispose()
    return rows / elapsed, stall, steps, usage.batches


def longest(steps: list[float]) -> str:
    """The longest step and the 99th percentile, in ms."""
    ordered = sorted(steps)
    return f"{ordered[-1] * 1000:.1f} ({ordered[int(len(ordered) * 0.99)] * 1000:.1f})"


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


async def writes(rows: int, batch_sizes: list[int]) -> tuple[float, list[str], str]:
    """The idle loop's worst stall, the table, and the writer's longest steps per database and batch size."""
    idle = await idle_stall(2.0)
    print(f"idle loop, 2 s: worst stall {idle:.1f} ms")
    table = ["| database | batch_size | rows/s | INSERTs | worst loop stall |", "|---|---:|---:|---:|---:|"]
    writer: dict[str, list[str]] = {"SQLite": [], "PostgreSQL": []}
    for batch_size in batch_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            rate, stall, steps, inserts = await sustained(f"sqlite+aiosqlite:///{tmp}/usage.db", rows, batch_size)
        table.append(f"| SQLite (aiosqlite, WAL) | {batch_size} | {rate:,.0f} | {inserts} | {stall:.1f} ms |")
        writer["SQLite"].append(longest(steps))
        print(table[-1], f"writer steps: longest (p99) {writer['SQLite'][-1]} ms")
        schema = f"bench_{uuid.uuid4().hex[:12]}"
        if await pg_schema(f"CREATE SCHEMA {schema}"):
            try:
                rate, stall, steps, inserts = await sustained(PG_URL, rows, batch_size, schema)
            finally:
                await pg_schema(f"DROP SCHEMA {schema} CASCADE")
            table.append(f"| PostgreSQL (asyncpg, loopback) | {batch_size} | {rate:,.0f} | {inserts} "
                         f"| {stall:.1f} ms |")
            writer["PostgreSQL"].append(longest(steps))
            print(table[-1], f"writer steps: longest (p99) {writer['PostgreSQL'][-1]} ms")
    sizes = " / ".join(map(str, batch_sizes))
    figures = ", ".join(f"{db} {' / '.join(ms)} ms" for db, ms in writer.items() if ms)
    return idle, table, f"at batch_size {sizes}: {figures}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--adds", type=int, default=1_000_000)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 500, 2000])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    add_only, with_build = add_cost(args.adds)
    print(f"add(): {add_only:.0f} ns; UsageRow(...) + add(): {with_build:.0f} ns")
    idle, table, steps = asyncio.run(writes(args.rows, args.batch_sizes))
    body = [
        stamp(),
        "",
        f"On the request path ({args.adds:,} calls, gc off): `UsageLog.add(row)` costs {add_only:.0f} ns; building",
        f"a `UsageRow` (8 fields set) and adding it costs {with_build:.0f} ns.",
        "",
        f"Sustained writes: {args.rows:,} rows (every column set) added from the loop in steps of 100, timed from",
        "the first add to the last row committed, one writer task, one transaction per batch, written as INSERTs",
        f"(executemany) of at most {CHUNK_ROWS} rows (the INSERTs column counts them); a full `gc.collect()` before",
        "each run keeps the migration's garbage out of it. The worst loop stall is the largest delay a 1 ms timer",
        "saw meanwhile: what a request waits for the loop. On this machine it includes waits for a core (its 2",
        "cores also run PostgreSQL, aiosqlite's thread and whatever else runs): the same timer on an idle loop for",
        f"2 s saw {idle:.1f} ms. The writer's own share is its longest step on the loop, from one await to the next in",
        f"the loop thread's CPU time (the 99th percentile in brackets), {steps}.",
        "",
        *table,
        "",
        "Reading: the writer sends the INSERT compiled once at startup (`exec_driver_sql`) with positional parameters",
        "built without SQLAlchemy's per-row processing (only `created_at`, and on SQLite the floats, run their bind",
        f"processors), {CHUNK_ROWS} rows per INSERT, each awaited, inside the batch's one transaction. Its steps on",
        "the loop take ~0.5 ms (p99) whatever batch_size is, the longest ~1-2.5 ms (the first connection to",
        "PostgreSQL, a rare outlier), so the worst stall no longer grows with batch_size. What is left of it, a few",
        "ms varying from run to run, is the loop's thread waiting for a core: the idle loop sees it too, and the",
        "database writing the rows (PostgreSQL's backend, aiosqlite's thread) shares the 2 cores. Before, one INSERT",
        "of SQLAlchemy-built parameters per batch held the loop ~10 us a row: longest steps ~1.6 / 3 / 9.5 ms at",
        "batch_size 100 / 500 / 2000, worst stalls 5.5 ms (SQLite) and 11.9 ms (PostgreSQL) at 500, ~37 ms at 2000",
        "(2026-11-25). Throughput rose rather than fell, by a quarter to a half at 500 in interleaved runs of both",
        "versions. Chunks of 50 rows lost ~10-20% throughput for no clear gain in stall; building the parameters in a",
        "worker thread (`asyncio.to_thread`) did no better on the stall: the thread holds the GIL the loop needs.",
    ]
    if not args.no_write:
        write_section(SECTION, body)
        print(f"wrote the '{SECTION}' section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
