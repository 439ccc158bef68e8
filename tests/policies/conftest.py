"""Fixtures shared by the policy tests: a state store of each kind, a dead Redis, a PostgreSQL schema of one's own,
and a wait on a condition."""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable

import pytest
import sqlalchemy as sa
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from policies.database import migrate, open_engine
from policies.redis_state import RedisStore
from policies.state import LocalStore, StateStore
from tests.conftest import free_port, redis_url

REDIS_URL = redis_url(15)  # database 15 (one per xdist worker): tests never touch what a developer keeps in 0
PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_URL = f"postgresql+asyncpg://postgres@{PG_HOST}:{PG_PORT}/test"


async def eventually(check: Callable[[], object], within_s: float = 3.0, every_s: float = 0.005) -> float:
    """Poll `check` (a plain or an async callable) until it holds; fail after `within_s`. Returns the seconds."""
    start = time.monotonic()
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > within_s:
            pytest.fail(f"condition not met within {within_s} s")
        await asyncio.sleep(every_s)


@pytest.fixture(params=["local", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    if request.param == "local":
        local = LocalStore()
        yield local
        await local.aclose()
        return
    admin = Redis.from_url(REDIS_URL, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        await admin.ping()
    except Exception as exc:  # any failure to reach it: say so, in the warnings summary too, never pass quietly
        await admin.aclose()
        reason = f"Redis not reachable at 127.0.0.1:6379: {type(exc).__name__}: {exc}"
        warnings.warn(reason, stacklevel=1)
        pytest.skip(reason)
    prefix = f"pointsman-test:{uuid.uuid4().hex}:"
    redis_store = RedisStore(REDIS_URL, prefix=prefix)
    try:
        yield redis_store
    finally:
        await redis_store.aclose()
        keys = [key async for key in admin.scan_iter(match=prefix + "*")]
        if keys:
            await admin.delete(*keys)
        await admin.aclose()


@pytest.fixture
async def dead_store() -> AsyncIterator[RedisStore]:
    """A RedisStore on a free port where nothing listens."""
    dead = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    yield dead
    await dead.aclose()


async def pg(sql: str) -> None:
    """Run one statement on the test database."""
    engine = open_engine(PG_URL, connect_args={"timeout": 3})
    try:
        async with engine.begin() as connection:
            await connection.execute(sa.text(sql))
    finally:
        await engine.dispose()


async def new_schema() -> str:
    """CREATE a uniquely named PostgreSQL schema; skips loudly when PostgreSQL is not there."""
    schema = f"test_{uuid.uuid4().hex[:12]}"
    try:
        await pg(f"CREATE SCHEMA {schema}")
    except (OSError, sa.exc.SQLAlchemyError, TimeoutError) as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT}: {type(exc).__name__}: {exc}")
    return schema


@pytest.fixture
async def pg_schema() -> AsyncIterator[str]:
    """A fresh PostgreSQL schema, dropped afterwards."""
    schema = await new_schema()
    yield schema
    await pg(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[AsyncEngine]:
    """A migrated database of each kind: a file under tmp_path, or a PostgreSQL schema of its own (a module may
    define its own `engine`, as test_analytics.py does, with rows in it)."""
    if request.param == "sqlite":
        url, schema = f"sqlite+aiosqlite:///{tmp_path / 'pointsman.db'}", None
    else:
        url, schema = PG_URL, await new_schema()
    await migrate(url, schema=schema)
    db = open_engine(url, schema=schema)
    yield db
    await db.dispose()
    if schema is not None:
        await pg(f"DROP SCHEMA {schema} CASCADE")
