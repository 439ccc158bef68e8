"""The usage log: one row per request, queued in memory by a plain call and written to SQL in batches."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine

from policies.database import storable, usage_rows

__all__ = ["CHUNK_ROWS", "UsageLog", "UsageRow", "charged_usage"]

log = logging.getLogger("pointsman.usage")


class _RowRefused(Exception):
    """The database answered but refused the rows themselves (bad data, a constraint): retrying cannot help."""


def _refused(exc: BaseException) -> bool:
    # asyncpg errors reach SQLAlchemy as a bare DBAPIError: tell them by SQLSTATE class 22 (data) or 23 (integrity)
    if isinstance(exc, sa.exc.DataError | sa.exc.IntegrityError):
        return True
    return isinstance(exc, sa.exc.DBAPIError) and str(getattr(exc.orig, "sqlstate", "") or "")[:2] in ("22", "23")


def _now() -> datetime:
    return datetime.now(UTC)


class UsageRow(msgspec.Struct, kw_only=True):
    """One request through the gateway, as the `usage_rows` table stores it (times in ms, `created_at` in UTC)."""

    request_id: str
    status: str  # ok | answered | error | cancelled
    created_at: datetime = msgspec.field(default_factory=_now)
    key_id: str | None = None
    user: str | None = None
    team: str | None = None
    model_requested: str | None = None
    model_served: str | None = None
    route: str | None = None  # manual | auto | fallback
    task: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    cache: str | None = None
    http_status: int | None = None
    error_code: str | None = None
    experiment: str | None = None  # the experiment the request entered, and its variant there
    variant: str | None = None
    completion_id: str | None = None  # the answer's `id`, which POST /v1/feedback refers to


_FIELDS = UsageRow.__struct_fields__

# Rows per INSERT (executemany) inside a batch's transaction: the writer holds the loop for one chunk at a time
# (~0.5 ms for 100 rows, the driver's part included), so a request never waits behind a whole batch, however large
# batch_size is. Smaller chunks cost throughput (more round trips) for little gain.
CHUNK_ROWS = 100


def _fitted(column: sa.Column) -> Callable[[str | None], str | None]:
    """A column's text as it can be stored (see policies.database.storable): NUL becomes U+FFFD, and text longer
    than a `String(n)` column is cut."""
    length = column.type.length  # type: ignore[attr-defined]

    def fit(value: str | None) -> str | None:
        if value is None or storable(value, column):
            return value
        return value.replace("\x00", "\ufffd")[:length]

    return fit


class _CompiledInsert:
    """The usage_rows INSERT compiled once for a dialect, and its positional parameters built cheaply.

    Executing the Core statement, SQLAlchemy builds each row's parameters on the loop at about 10 us a row. Here
    the SQL text is the dialect's own (sent with `exec_driver_sql`) and only the columns whose types have a bind
    processor run it, a column at a time: the UTC datetime (stored on SQLite as text in SQLAlchemy's format)
    and, on SQLite, the floats. The stored values are the same as through the Core statement, but for text that
    could not be stored at all (see `_fitted`): a client's `user` or request id never loses its row.
    """

    __slots__ = ("sql", "_values", "_processors")

    def __init__(self, dialect: Dialect) -> None:
        compiled = usage_rows.insert().compile(dialect=dialect, column_keys=list(_FIELDS), for_executemany=True)
        if not compiled.positiontup:  # aiosqlite (qmark) and asyncpg ($1) are; config accepts only those two
            raise ValueError(f"usage log: needs a positional paramstyle, not {dialect.paramstyle}")
        columns = compiled.positiontup
        self.sql = str(compiled)
        self._values = attrgetter(*columns)
        self._processors: list[tuple[int, Callable[[Any], Any]]] = []
        for i, name in enumerate(columns):
            type_ = usage_rows.c[name].type
            if (process := type_.dialect_impl(dialect).bind_processor(dialect)) is not None:
                self._processors.append((i, process))
            if isinstance(type_, sa.String):  # text from clients: make it fit, so that no row is refused for it
                self._processors.append((i, _fitted(usage_rows.c[name])))

    def params(self, rows: list[UsageRow]) -> list[tuple[Any, ...]]:
        columns: list[Any] = list(zip(*map(self._values, rows), strict=True))
        for i, process in self._processors:
            columns[i] = map(process, columns[i])  # processors take None as well: SQLAlchemy calls them on it
        return list(zip(*columns, strict=True))


class UsageLog:
    """Queues usage rows and writes them in batches from one background task, off the request path.

    `add(row)` is a plain O(1) call that never awaits, blocks or raises. The writer wakes every
    `flush_interval_s`, or as soon as `batch_size` rows wait, and writes each batch in one transaction, as
    executemany INSERTs of `CHUNK_ROWS` rows at most, so that its work on the loop comes in short steps.

    Durability: while the database is unreachable the rows stay in memory and the writer retries with
    exponential backoff (`retry_initial_s` doubling up to `retry_max_s`), logging one warning when the outage
    starts and one line when it ends. At most `max_pending` rows are held: beyond that the OLDEST rows are dropped
    and the writer logs how many (an outage at 1,000 req/s fills 100,000 rows in 100 s, about 50 MB). A row the
    database refuses for its own content (a DataError or IntegrityError) is written alone, and dropped with an
    error log if it fails again, so one bad row cannot hold back the others. `aclose()` writes everything left;
    if the database stays unreachable for `close_timeout_s` it gives up and logs the rows lost.
    """

    __slots__ = ("_engine", "_statement", "_pending", "_wake", "_task", "_closing", "flush_interval_s", "batch_size",
                 "max_pending", "retry_initial_s", "retry_max_s", "close_timeout_s", "written", "dropped",
                 "refused", "batches", "_dropped_logged", "_outage_since")

    def __init__(self, engine: AsyncEngine, *, flush_interval_s: float = 1.0, batch_size: int = 500,
                 max_pending: int = 100_000, retry_initial_s: float = 0.5, retry_max_s: float = 30.0,
                 close_timeout_s: float = 30.0) -> None:
        if batch_size < 1 or max_pending < batch_size:
            raise ValueError("need 1 <= batch_size <= max_pending")
        self._engine = engine
        self._statement = _CompiledInsert(engine.dialect)  # at startup, not in the first batch
        self.flush_interval_s = flush_interval_s
        self.batch_size = batch_size
        self.max_pending = max_pending
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.close_timeout_s = close_timeout_s
        self._pending: deque[UsageRow] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.written = 0  # rows the database accepted
        self.dropped = 0  # rows given up on: the oldest beyond max_pending, or left unwritten at close
        self.refused = 0  # rows the database refused for their content
        self.batches = 0  # INSERT statements committed (a batch takes one per CHUNK_ROWS rows)
        self._dropped_logged = 0
        self._outage_since: float | None = None

    @property
    def pending(self) -> int:
        """Rows waiting in memory (a batch being written is not counted)."""
        return len(self._pending)

    @property
    def healthy(self) -> bool:
        """False while the writer is inside an outage (its last write failed)."""
        return self._outage_since is None

    def start(self) -> None:
        """Start the writer task on the running loop (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="pointsman.usage_log")

    def add(self, row: UsageRow) -> None:
        """Queue one row: O(1), never awaits, never raises for the database's sake."""
        pending = self._pending
        if len(pending) >= self.max_pending:
            pending.popleft()
            self.dropped += 1
        pending.append(row)
        if len(pending) >= self.batch_size and not self._wake.is_set():
            self._wake.set()

    async def aclose(self) -> None:
        """Write every queued row (added up to this call), then stop the writer."""
        self._closing = True
        if self._task is None:
            self.start()
        self._wake.set()
        task, self._task = self._task, None
        try:
            await asyncio.wait_for(asyncio.shield(task), self.close_timeout_s)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # a batch in flight goes back to the queue before the count below
            lost = len(self._pending)
            self.dropped += lost
            self._pending.clear()
            log.error("usage log: database still unreachable after %.0f s at shutdown; %d rows lost",
                      self.close_timeout_s, lost)

    async def flush(self) -> None:
        """Write everything queued now, in batches; raises on a database error (the rows stay queued)."""
        while self._pending:
            await self._write_batch()

    async def rows(self, *, key_id: str | None = None, since: datetime | None = None,
                   limit: int = 1000) -> list[UsageRow]:
        """Rows already written, oldest first (queued ones are not seen until flushed)."""
        query = sa.select(*(usage_rows.c[name] for name in _FIELDS)).order_by(usage_rows.c.id).limit(limit)
        if key_id is not None:
            query = query.where(usage_rows.c.key_id == key_id)
        if since is not None:
            query = query.where(usage_rows.c.created_at >= since)
        async with self._engine.connect() as connection:
            result = await connection.execute(query)
            return [UsageRow(**row) for row in result.mappings()]

    async def _run(self) -> None:
        backoff = self.retry_initial_s
        while True:
            if not self._closing and len(self._pending) < self.batch_size:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
                except TimeoutError:
                    pass
            self._wake.clear()
            self._log_overflow()
            try:
                await self.flush()
            except Exception as exc:  # any failure to write is an outage: keep the rows, retry
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    log.warning("usage log: cannot write to the database (%s: %s); keeping rows in memory and "
                                "retrying", type(exc).__name__, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.retry_max_s)
                continue
            backoff = self.retry_initial_s
            if self._outage_since is not None:
                log.warning("usage log: database writable again after %.1f s; %d rows pending",
                            time.monotonic() - self._outage_since, len(self._pending))
                self._outage_since = None
            if self._closing and not self._pending:
                self._log_overflow()
                return

    async def _write_batch(self) -> None:
        pending = self._pending
        batch = [pending.popleft() for _ in range(min(self.batch_size, len(pending)))]
        try:
            await self._insert(batch)
        except _RowRefused:
            await self._insert_each(batch)
            return
        except BaseException:
            self._requeue(batch)
            raise
        self.written += len(batch)

    async def _insert(self, batch: list[UsageRow]) -> None:
        statement = self._statement
        chunks = range(0, len(batch), CHUNK_ROWS)
        try:
            async with self._engine.begin() as connection:  # one transaction: a batch is written whole or not at all
                for start in chunks:  # each await gives the loop back while the driver works
                    params = statement.params(batch[start:start + CHUNK_ROWS])
                    await connection.exec_driver_sql(statement.sql, params)
        except sa.exc.DBAPIError as exc:
            if _refused(exc):
                raise _RowRefused(str(exc.orig)) from exc
            raise
        self.batches += len(chunks)

    async def _insert_each(self, batch: list[UsageRow]) -> None:
        # The database answered but refused the batch: find the bad rows by writing one at a time.
        for i, row in enumerate(batch):
            try:
                await self._insert([row])
            except _RowRefused as exc:
                self.refused += 1
                log.error("usage log: database refused row %s, dropped: %s", row.request_id, exc)
                continue
            except BaseException:
                self._requeue(batch[i:])
                raise
            self.written += 1

    def _requeue(self, batch: list[UsageRow]) -> None:
        # Back in front, in order; rows added meanwhile may push the total over the cap: drop the oldest.
        pending = self._pending
        pending.extendleft(reversed(batch))
        while len(pending) > self.max_pending:
            pending.popleft()
            self.dropped += 1

    def _log_overflow(self) -> None:
        if self.dropped > self._dropped_logged:
            log.error("usage log: %d oldest rows dropped: more than %d were waiting",
                      self.dropped - self._dropped_logged, self.max_pending)
            self._dropped_logged = self.dropped


_u = usage_rows.c
# a budget scope's member as the rows name it (policies.context.scope_member); a literal, not a bound parameter,
# so that PostgreSQL sees the grouped expression and the selected one as the same
_MEMBERS: dict[str, Any] = {"key": sa.func.coalesce(_u.key_id, sa.literal_column("'anonymous'")),
                            "user": _u.user, "team": _u.team, "model": _u.model_served}
_CACHE_HITS = ("hit", "semantic-hit")


async def charged_usage(engine: AsyncEngine, scope: str, match: str | None, since: datetime, until: datetime
                        ) -> dict[str, tuple[float, float]]:
    """Each member of a budget scope (only `match` when set) with the (tokens, USD) its rows created in
    [since, until) were charged, counted as BudgetPolicy.settle counts them: a policy's own answer (a cache hit)
    was never reserved, so nothing; a failed request its tokens (usually none). One grouped query; a model's
    versions (id@1.2.0) count as the model."""
    tokens = sa.func.sum(sa.func.coalesce(_u.prompt_tokens, 0) + sa.func.coalesce(_u.completion_tokens, 0))
    usd = sa.func.sum(sa.func.coalesce(_u.cost_usd, 0.0))
    query = sa.select(tokens, usd).where(_u.created_at >= since, _u.created_at < until, _u.status != "answered",
                                         sa.or_(_u.cache.is_(None), _u.cache.not_in(_CACHE_HITS)))
    if scope == "global":  # one member, "*" (PostgreSQL refuses to group by a constant)
        query = query.add_columns(sa.literal_column("'*'"))
    else:
        member = _MEMBERS[scope]
        query = query.add_columns(member).where(member.is_not(None)).group_by(member)
        if match is not None:
            query = query.where(sa.or_(member == match, member.startswith(match + "@", autoescape=True))
                                if scope == "model" else member == match)
    async with engine.connect() as connection:
        rows = (await connection.execute(query)).all()
    charged: dict[str, tuple[float, float]] = {}
    for used_tokens, used_usd, name in rows:
        if used_tokens is None and used_usd is None:  # global, no rows: SUM over nothing
            continue
        name = str(name).partition("@")[0] if scope == "model" else str(name)
        before = charged.get(name, (0.0, 0.0))
        charged[name] = (before[0] + float(used_tokens or 0), before[1] + float(used_usd or 0.0))
    return charged
