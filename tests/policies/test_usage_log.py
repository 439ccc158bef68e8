"""UsageLog on real databases: batching in chunks, every column round-trips as SQLAlchemy would store it, nothing
lost at close or across an outage."""

from __future__ import annotations

import asyncio
import inspect
import logging
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from policies.database import migrate, open_engine, usage_rows
from policies.usage_log import CHUNK_ROWS, UsageLog, UsageRow
from tests.conftest import free_port
from tests.policies.conftest import PG_HOST, PG_PORT, PG_URL, eventually

FAST = {"retry_initial_s": 0.02, "retry_max_s": 0.1}  # backoff short enough for tests to wait on

pytestmark = pytest.mark.asyncio(loop_scope="session")  # fixtures and tests share one loop


async def eventually_15s(check) -> float:
    """Database outages and retries with backoff: up to 15 s."""
    return await eventually(check, within_s=15.0, every_s=0.01)


def count_inserts(engine: AsyncEngine) -> list[int | str]:
    """Row counts of each INSERT INTO usage_rows the engine sends, and "commit" where a transaction ends."""
    inserts: list[int | str] = []

    @sa.event.listens_for(engine.sync_engine, "before_cursor_execute")
    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO USAGE_ROWS"):
            inserts.append(len(parameters) if executemany else 1)

    @sa.event.listens_for(engine.sync_engine, "commit")
    def committed(conn) -> None:
        inserts.append("commit")

    return inserts


def row(i: int, **fields) -> UsageRow:
    return UsageRow(request_id=f"req-{i}", status="ok", model_requested="small", **fields)


async def test_add_is_a_plain_function() -> None:
    assert not inspect.iscoroutinefunction(UsageLog.add)
    assert not inspect.isgeneratorfunction(UsageLog.add)


async def test_a_named_paramstyle_is_refused_at_construction() -> None:
    engine = open_engine("sqlite+aiosqlite://", paramstyle="named")  # the writer builds positional parameters
    with pytest.raises(ValueError, match="positional paramstyle, not named"):
        UsageLog(engine)
    await engine.dispose()


async def test_rows_are_written_in_batches(engine: AsyncEngine) -> None:
    inserts = count_inserts(engine)
    batch_size = 2 * CHUNK_ROWS + CHUNK_ROWS // 2
    usage = UsageLog(engine, flush_interval_s=60.0, batch_size=batch_size)
    usage.start()
    for i in range(2 * batch_size):
        usage.add(row(i))
    await eventually_15s(lambda: usage.written == 2 * batch_size)  # batch_size reached: no waiting for the interval
    batch = [CHUNK_ROWS, CHUNK_ROWS, CHUNK_ROWS // 2, "commit"]  # one transaction, INSERTs of CHUNK_ROWS at most
    assert inserts == batch * 2
    for i in range(2 * batch_size, 2 * batch_size + 10):
        usage.add(row(i))
    await usage.aclose()
    assert inserts == [*batch, *batch, 10, "commit"]
    assert usage.batches == 7
    assert [r.request_id for r in await usage.rows(limit=2000)] == [f"req-{i}" for i in range(2 * batch_size + 10)]


async def test_interval_writes_a_partial_batch(engine: AsyncEngine) -> None:
    inserts = count_inserts(engine)
    usage = UsageLog(engine, flush_interval_s=0.05, batch_size=500)
    usage.start()
    for i in range(10):
        usage.add(row(i))
    await eventually_15s(lambda: usage.written == 10)
    assert inserts == [10, "commit"]
    await usage.aclose()


async def test_every_column_round_trips(engine: AsyncEngine) -> None:
    full = UsageRow(
        request_id="a" * 64, created_at=datetime(2025, 11, 26, 9, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2))),
        key_id="key-1", user="alice", team="research", model_requested="auto", model_served="smollm2-135m-instruct",
        route="fallback", task="code", prompt_tokens=1234, completion_tokens=56, cost_usd=0.000123456789,
        latency_ms=812.375, ttft_ms=40.5, cache="miss", status="error", http_status=503, error_code="upstream_down",
    )
    bare = UsageRow(request_id="b", status="cancelled")
    usage = UsageLog(engine)
    usage.add(full)
    usage.add(bare)
    await usage.aclose()
    first, second = await usage.rows()
    assert first == UsageRow(**{**{f: getattr(full, f) for f in UsageRow.__struct_fields__},
                                "created_at": datetime(2025, 11, 26, 7, 30, 15, 123456, tzinfo=UTC)})
    assert first.created_at.utcoffset() == timedelta(0)
    assert second == bare
    assert [r.request_id for r in await usage.rows(key_id="key-1")] == ["a" * 64]
    assert [r.request_id for r in await usage.rows(since=bare.created_at)] == ["b"]


async def test_rows_are_stored_as_sqlalchemy_stores_them(engine: AsyncEngine) -> None:
    # The writer sends precompiled SQL with parameters of its own making: the stored values, read back raw
    # (on SQLite created_at is text, compared as text by `since`), must be those of SQLAlchemy's own INSERT.
    cases = [
        UsageRow(request_id="aware", status="ok",
                 created_at=datetime(2025, 11, 26, 23, 30, 15, 123456, tzinfo=timezone(timedelta(hours=-5))),
                 cost_usd=1e-12, latency_ms=0.1, ttft_ms=-0.0, prompt_tokens=0, completion_tokens=2**31 - 1),
        UsageRow(request_id="naive-is-utc", status="ok",
                 created_at=datetime(2025, 1, 2, 3, 4, 5),  # no offset, no microseconds
                 cost_usd=0, latency_ms=1234567.891),  # an int where a float belongs
        UsageRow(request_id="bare", status="cancelled"),  # every optional column None
    ]
    async with engine.begin() as connection:
        await connection.execute(usage_rows.insert(), [{f: getattr(r, f) for f in UsageRow.__struct_fields__}
                                                       for r in cases])
    usage = UsageLog(engine)
    for r in cases:
        usage.add(r)
    await usage.aclose()
    columns = ", ".join(f'"{f}"' for f in UsageRow.__struct_fields__)
    async with engine.connect() as connection:
        stored = (await connection.exec_driver_sql(f"SELECT {columns} FROM usage_rows ORDER BY id")).all()
    assert stored[3:] == stored[:3]
    assert [r.created_at for r in await usage.rows()][3:] == [
        datetime(2025, 11, 27, 4, 30, 15, 123456, tzinfo=UTC), datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
        cases[2].created_at]


async def test_aclose_writes_rows_added_just_before(engine: AsyncEngine) -> None:
    usage = UsageLog(engine, flush_interval_s=60.0, batch_size=500)
    usage.start()
    await asyncio.sleep(0)  # the writer is now waiting out its 60 s interval
    for i in range(1234):
        usage.add(row(i))
    await usage.aclose()
    assert usage.pending == 0 and usage.written == 1234 and usage.dropped == 0
    assert len(await usage.rows(limit=5000)) == 1234


async def test_aclose_without_start_still_writes(engine: AsyncEngine) -> None:
    usage = UsageLog(engine)
    usage.add(row(1))
    await usage.aclose()
    assert [r.request_id for r in await usage.rows()] == ["req-1"]


class Forwarder:
    """A TCP relay from a port to PostgreSQL: the database 'comes back' on that port when it starts."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        pg_r, pg_w = await asyncio.open_connection(PG_HOST, PG_PORT)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            finally:
                w.close()

        for task in (asyncio.ensure_future(pipe(client_r, pg_w)), asyncio.ensure_future(pipe(pg_r, client_w))):
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def test_postgresql_outage_keeps_rows_and_writes_them_later(pg_schema: str, caplog) -> None:
    await migrate(PG_URL, schema=pg_schema)
    port = free_port()  # nothing listens here yet
    engine = open_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/test", schema=pg_schema)
    forwarder = Forwarder(port)
    usage = UsageLog(engine, flush_interval_s=0.02, **FAST)
    caplog.set_level(logging.WARNING, logger="pointsman.usage")
    try:
        usage.start()
        for i in range(300):
            usage.add(row(i))  # never raises, database or not
        await eventually_15s(lambda: not usage.healthy)
        for i in range(300, 600):
            usage.add(row(i))
        await eventually_15s(lambda: len(caplog.records) >= 1)
        assert usage.written == 0
        await forwarder.start()
        await eventually_15s(lambda: usage.written == 600 and usage.healthy)
        await usage.aclose()
        assert [r.request_id for r in await usage.rows(limit=1000)] == [f"req-{i}" for i in range(600)]
    finally:
        await engine.dispose()
        await forwarder.aclose()
    messages = [r.getMessage() for r in caplog.records if r.name == "pointsman.usage"]
    assert len(messages) == 2, messages  # once when the outage starts, once when it ends: not once per retry
    assert "cannot write" in messages[0] and "writable again" in messages[1]
    assert usage.dropped == 0


async def test_sqlite_directory_appearing_later(tmp_path) -> None:
    path = tmp_path / "later" / "usage.db"  # the directory does not exist yet: the file cannot be opened
    engine = open_engine(f"sqlite+aiosqlite:///{path}")
    usage = UsageLog(engine, flush_interval_s=0.02, **FAST)
    try:
        usage.start()
        for i in range(50):
            usage.add(row(i))
        await eventually_15s(lambda: not usage.healthy)
        path.parent.mkdir()
        await migrate(f"sqlite+aiosqlite:///{path}")
        await eventually_15s(lambda: usage.written == 50)
        await usage.aclose()
        assert len(await usage.rows()) == 50
    finally:
        await engine.dispose()


async def test_max_pending_drops_the_oldest_and_says_how_many(caplog) -> None:
    engine = open_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/test")
    usage = UsageLog(engine, batch_size=5, max_pending=10, flush_interval_s=0.02, close_timeout_s=0.2, **FAST)
    caplog.set_level(logging.WARNING, logger="pointsman.usage")
    for i in range(25):
        usage.add(row(i))
    assert usage.pending == 10 and usage.dropped == 15
    assert [r.request_id for r in usage._pending] == [f"req-{i}" for i in range(15, 25)]
    usage.start()
    await eventually_15s(lambda: any("15 oldest rows dropped" in r.getMessage() for r in caplog.records))
    await usage.aclose()  # still down: gives up after close_timeout_s and says how many were lost
    assert usage.pending == 0 and usage.dropped == 25
    assert any("10 rows lost" in r.getMessage() for r in caplog.records)
    await engine.dispose()


async def test_a_refused_row_does_not_hold_back_the_others(pg_schema: str, caplog) -> None:
    # PostgreSQL enforces the integer range; the one bad row is dropped with an error, its batch-mates are written
    await migrate(PG_URL, schema=pg_schema)
    engine = open_engine(PG_URL, schema=pg_schema)
    usage = UsageLog(engine, **FAST)
    caplog.set_level(logging.ERROR, logger="pointsman.usage")
    try:
        usage.add(row(0))
        usage.add(UsageRow(request_id="bad", status="ok", prompt_tokens=2**40))
        usage.add(row(2))
        await usage.aclose()
        assert [r.request_id for r in await usage.rows()] == ["req-0", "req-2"]
        assert usage.refused == 1 and usage.written == 2
        assert any("refused row" in r.getMessage() for r in caplog.records)
    finally:
        await engine.dispose()


async def test_a_refused_row_in_a_later_chunk_rolls_back_its_whole_batch(pg_schema: str) -> None:
    # The chunks already sent for the batch are rolled back with it: every good row is written exactly once
    await migrate(PG_URL, schema=pg_schema)
    engine = open_engine(PG_URL, schema=pg_schema)
    inserts = count_inserts(engine)
    n, bad = 2 * CHUNK_ROWS + 10, CHUNK_ROWS + 5
    usage = UsageLog(engine, batch_size=n, **FAST)
    try:
        for i in range(n):
            usage.add(UsageRow(request_id="bad", status="ok", prompt_tokens=2**40) if i == bad else row(i))
        await usage.aclose()
        assert [r.request_id for r in await usage.rows(limit=1000)] == [f"req-{i}" for i in range(n) if i != bad]
        assert usage.refused == 1 and usage.written == n - 1
        assert inserts[:2] == [CHUNK_ROWS, CHUNK_ROWS]  # the first chunk went through before the second failed
        assert "commit" not in inserts[:3] and inserts.count(1) == n  # then each row alone
    finally:
        await engine.dispose()


async def test_client_text_the_database_cannot_hold_is_fitted_not_refused(pg_schema: str, caplog) -> None:
    # NUL (PostgreSQL refuses it in text) and over-long ids come from clients: the row is written all the same
    await migrate(PG_URL, schema=pg_schema)
    engine = open_engine(PG_URL, schema=pg_schema)
    usage = UsageLog(engine, **FAST)
    caplog.set_level(logging.ERROR, logger="pointsman.usage")
    try:
        usage.add(UsageRow(request_id="r" * 128, status="ok", user="a\x00b", model_requested="m\x00",
                           team="t\x00", completion_id="c" * 200))
        usage.add(row(1))
        await usage.aclose()
        stored = await usage.rows()
        assert usage.refused == 0 and usage.written == 2 and not caplog.records
        assert (stored[0].request_id, stored[0].user, stored[0].model_requested, stored[0].team) == (
            "r" * 64, "a\ufffdb", "m\ufffd", "t\ufffd")
        assert stored[0].completion_id == "c" * 128 and stored[1].request_id == "req-1"
    finally:
        await engine.dispose()


async def test_shutdown_summary_counts_refused_rows_as_dropped(pg_schema: str, caplog) -> None:
    from config.schema import StorageConfig
    from gateway.storage import Storage

    await migrate(PG_URL, schema=pg_schema)
    storage = Storage(StorageConfig(database_url=""))
    storage.engine = open_engine(PG_URL, schema=pg_schema)
    storage.usage = UsageLog(storage.engine, **FAST)
    caplog.set_level(logging.INFO, logger="pointsman")
    storage.usage.add(row(0))
    storage.usage.add(UsageRow(request_id="bad", status="ok", prompt_tokens=2**40))
    await storage.aclose()
    summary = next(r.getMessage() for r in caplog.records if "usage log closed" in r.getMessage())
    assert "1 rows written, 1 dropped (1 of them refused by the database)" in summary
