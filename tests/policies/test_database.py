"""Migrations on real databases: SQLite in a temp file and PostgreSQL in a schema of its own, twice each."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.ext.asyncio import AsyncEngine

from policies.database import alembic_config, metadata, migrate, open_engine
from tests.policies.conftest import PG_URL

COLUMNS = {"id", "request_id", "created_at", "key_id", "user", "team", "model_requested", "model_served", "route",
           "task", "prompt_tokens", "completion_tokens", "cost_usd", "latency_ms", "ttft_ms", "cache", "status",
           "http_status", "error_code", "experiment", "variant", "completion_id"}
INDEXES = {"ix_usage_rows_created_at": ["created_at"], "ix_usage_rows_key_id_created_at": ["key_id", "created_at"],
           "ix_usage_rows_experiment_id": ["experiment", "id"], "ix_usage_rows_completion_id": ["completion_id"],
           "ix_usage_rows_request_id": ["request_id"]}
TABLES = {"usage_rows", "alembic_version", "experiments", "feedback", "templates", "template_versions",
          "template_transitions", "model_versions", "model_version_transitions", "api_keys"}
HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()  # the newest revision

pytestmark = pytest.mark.asyncio(loop_scope="session")  # fixtures and tests share one loop


def _count_ddl(engine: AsyncEngine) -> list[str]:
    statements: list[str] = []

    @sa.event.listens_for(engine.sync_engine, "before_cursor_execute")
    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith(("CREATE", "ALTER", "DROP")):
            statements.append(statement)

    return statements


async def _inspect(engine: AsyncEngine, schema: str | None) -> tuple[set[str], set[str], dict, list]:
    def read(connection: sa.Connection) -> tuple[set[str], set[str], dict, list]:
        inspector = sa.inspect(connection)
        tables = set(inspector.get_table_names(schema=schema))
        columns = {c["name"] for c in inspector.get_columns("usage_rows", schema=schema)}
        indexes = {i["name"]: i["column_names"] for i in inspector.get_indexes("usage_rows", schema=schema)}
        versions = connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
        return tables, columns, indexes, versions

    async with engine.connect() as connection:
        return await connection.run_sync(read)


async def _check_migrate_twice(engine: AsyncEngine, schema: str | None) -> None:
    ddl = _count_ddl(engine)
    await migrate(engine, schema=schema)
    assert any("usage_rows" in s for s in ddl)
    tables, columns, indexes, versions = await _inspect(engine, schema)
    assert tables == TABLES
    assert columns == COLUMNS
    assert indexes == INDEXES
    assert versions == [HEAD]

    ddl.clear()
    await migrate(engine, schema=schema)  # at head already: nothing to do
    assert ddl == []
    assert (await _inspect(engine, schema))[3] == [HEAD]

    def diff(connection: sa.Connection) -> list:  # the revisions and the app's table metadata agree
        return compare_metadata(MigrationContext.configure(connection), metadata)

    async with engine.connect() as connection:
        assert await connection.run_sync(diff) == []


async def test_migrate_sqlite_from_empty_then_noop(tmp_path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'pointsman.db'}"
    engine = open_engine(url)
    try:
        await _check_migrate_twice(engine, None)
    finally:
        await engine.dispose()
    await migrate(url)  # the URL form opens and disposes its own engine


async def test_migrate_postgresql_from_empty_then_noop(pg_schema: str) -> None:
    engine = open_engine(PG_URL, schema=pg_schema)
    try:
        await _check_migrate_twice(engine, pg_schema)
        async with engine.connect() as connection:  # everything landed in the test's schema, nothing in public
            rows = await connection.execute(sa.text(
                "SELECT table_schema FROM information_schema.tables WHERE table_name IN ('usage_rows', "
                "'alembic_version') AND table_schema IN (:schema, 'public')"), {"schema": pg_schema})
            assert sorted(rows.scalars()) == [pg_schema, pg_schema]
    finally:
        await engine.dispose()
    await migrate(PG_URL, schema=pg_schema)


async def test_concurrent_migrations_on_postgresql_serialize(pg_schema: str) -> None:
    # replicas starting together: the advisory lock makes one create the table and the others find it there
    await asyncio.gather(*(migrate(PG_URL, schema=pg_schema) for _ in range(4)))
    engine = open_engine(PG_URL, schema=pg_schema)
    try:
        assert (await _inspect(engine, pg_schema))[3] == [HEAD]
    finally:
        await engine.dispose()


async def test_schema_needs_postgresql() -> None:
    with pytest.raises(ValueError, match="PostgreSQL"):
        open_engine("sqlite+aiosqlite:///x.db", schema="s")
