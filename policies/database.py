"""Durable rows in SQL: the table metadata, async engines from a URL, and Alembic migrations run at startup."""

from __future__ import annotations

import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from protocol.errors import BadRequest

__all__ = ["DEFAULT_URL", "MIGRATIONS", "UtcDateTime", "alembic_config", "api_keys", "checked", "experiments",
           "feedback", "metadata", "migrate", "model_version_transitions", "model_versions", "open_engine",
           "storable", "template_transitions", "template_versions", "templates", "usage_rows"]

DEFAULT_URL = "sqlite+aiosqlite:///pointsman.db"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Replicas may start together against one PostgreSQL: they take this advisory lock in turn before migrating.
_MIGRATION_LOCK = zlib.crc32(b"pointsman.migrations")


class UtcDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend: SQLite keeps no offset, so it stores naive UTC and the
    offset is put back on read; a naive value written is taken to be UTC already."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = sa.MetaData()

# Keep in step with migrations/versions/: a change here needs a new revision there.
usage_rows = sa.Table(
    "usage_rows",
    metadata,
    # BIGINT on PostgreSQL; SQLite autoincrements only an INTEGER PRIMARY KEY (the rowid)
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(64), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("key_id", sa.String(), nullable=True),
    sa.Column("user", sa.String(), nullable=True),
    sa.Column("team", sa.String(), nullable=True),
    sa.Column("model_requested", sa.String(), nullable=True),
    sa.Column("model_served", sa.String(), nullable=True),
    sa.Column("route", sa.String(16), nullable=True),  # manual | auto | fallback
    sa.Column("task", sa.String(), nullable=True),
    sa.Column("prompt_tokens", sa.Integer(), nullable=True),
    sa.Column("completion_tokens", sa.Integer(), nullable=True),
    sa.Column("cost_usd", sa.Float(), nullable=True),
    sa.Column("latency_ms", sa.Float(), nullable=True),
    sa.Column("ttft_ms", sa.Float(), nullable=True),
    sa.Column("cache", sa.String(), nullable=True),
    sa.Column("status", sa.String(16), nullable=False),  # ok | answered | error | cancelled
    sa.Column("http_status", sa.Integer(), nullable=True),
    sa.Column("error_code", sa.String(), nullable=True),
    # experiments (revision 0002): the arm the request was in, and the answer's id that feedback refers to
    sa.Column("experiment", sa.String(64), nullable=True),
    sa.Column("variant", sa.String(64), nullable=True),
    sa.Column("completion_id", sa.String(128), nullable=True),
    sa.Index("ix_usage_rows_created_at", "created_at"),
    sa.Index("ix_usage_rows_key_id_created_at", "key_id", "created_at"),
    sa.Index("ix_usage_rows_experiment_id", "experiment", "id"),
    sa.Index("ix_usage_rows_completion_id", "completion_id"),
    sa.Index("ix_usage_rows_request_id", "request_id"),  # feedback by x-request-id
)

# ---- experiments (revision 0002) ----
# one row per experiment: its definition as JSON (an ExperimentConfig), edited by the admin API; `seeded` is the
# definition the config file last wrote, so a restart overwrites admin edits only when the file itself changed
experiments = sa.Table(
    "experiments",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("spec", sa.Text(), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("promoted", sa.String(64), nullable=True),  # the variant auto-promotion or an admin made the winner
    sa.Column("seeded", sa.Text(), nullable=True),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("updated_at", UtcDateTime(), nullable=False),
)

# scores attached to answers by POST /v1/feedback, one per (answer, metric); `completion_id` holds the answer's
# request id for new rows (an upstream may give several answers one id), its completion id for older ones
feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("completion_id", sa.String(128), nullable=False),
    sa.Column("metric", sa.String(64), nullable=False),
    sa.Column("score", sa.Float(), nullable=False),
    sa.Column("request_id", sa.String(64), nullable=False),
    sa.Column("experiment", sa.String(64), nullable=True),
    sa.Column("variant", sa.String(64), nullable=True),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.UniqueConstraint("completion_id", "metric", name="uq_feedback_completion_metric"),
    sa.Index("ix_feedback_experiment_id", "experiment", "id"),
)


# model versions (revision 0004): each version's stage, and every transition between stages
model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("model_id", sa.String(200), primary_key=True),
    sa.Column("version", sa.String(64), primary_key=True),
    sa.Column("stage", sa.String(16), nullable=False),  # dev | staging | production | deprecated | archived
    sa.Column("spec", sa.Text(), nullable=False),  # the version's settings (config.schema.ModelVersion) as JSON
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("stage_since", UtcDateTime(), nullable=False),  # when it entered its stage (the Deprecation date)
)
model_version_transitions = sa.Table(
    "model_version_transitions",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("model_id", sa.String(200), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("from_stage", sa.String(16), nullable=True),  # None: the version was added
    sa.Column("to_stage", sa.String(16), nullable=False),
    sa.Column("at", UtcDateTime(), nullable=False),
    sa.Column("key_id", sa.String(), nullable=True),  # the caller's key id; None for the config or no auth
    sa.Column("forced", sa.Boolean(), nullable=False),
    sa.Column("reason", sa.String(32), nullable=False),  # added | config | stage | promoted | replaced | rollback
    sa.Index("ix_model_version_transitions_model_id", "model_id", "id"),
)


# prompt templates (revision 0003): each version's messages and variables (immutable), its stage, and every
# transition between stages (who moved it, when)
templates = sa.Table(
    "templates",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("created_at", UtcDateTime(), nullable=False),
)
template_versions = sa.Table(
    "template_versions",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("version", sa.String(64), primary_key=True),
    sa.Column("stage", sa.String(16), nullable=False),  # dev | staging | production | deprecated | archived
    sa.Column("spec", sa.Text(), nullable=False),  # messages and variables (config.schema.TemplateVersionConfig)
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("created_by", sa.String(), nullable=True),  # the admin key, or "config"
)
template_transitions = sa.Table(
    "template_transitions",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("from_stage", sa.String(16), nullable=True),  # None: the version was created
    sa.Column("to_stage", sa.String(16), nullable=False),
    sa.Column("at", UtcDateTime(), nullable=False),
    sa.Column("by_key", sa.String(), nullable=True),
    sa.Column("forced", sa.Boolean(), nullable=False),
    sa.Index("ix_template_transitions_name_version", "name", "version"),
)

# API keys (revision 0005): only the secret's SHA-256 is kept; `hint` is its first and last characters, to tell
# keys apart in a list
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("hint", sa.String(16), nullable=False),
    sa.Column("name", sa.String(200), nullable=True),
    sa.Column("role", sa.String(16), nullable=False),  # admin | user | readonly
    sa.Column("team", sa.String(200), nullable=True),
    sa.Column("models", sa.Text(), nullable=False),  # JSON list of globs
    sa.Column("budget", sa.Text(), nullable=True),  # JSON: the key's own budget (policies.api_keys.KeyBudget)
    sa.Column("rate_limit", sa.Text(), nullable=True),  # JSON: its own rate limit (KeyRateLimit)
    sa.Column("expires_at", UtcDateTime(), nullable=True),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("created_by", sa.String(), nullable=True),
    sa.Column("revoked_at", UtcDateTime(), nullable=True),
    sa.Index("ux_api_keys_digest", "digest", unique=True),
)


def storable(value: str, column: sa.Column) -> bool:
    """Whether `value` can be written to (so also found in) `column`: PostgreSQL refuses NUL in any text, and
    a value longer than a `String(n)` column."""
    length = getattr(column.type, "length", None)
    return "\x00" not in value and (length is None or len(value) <= length)


def checked(value: str | None, column: sa.Column, param: str) -> str | None:
    """`value` when `storable` in `column` (or None), else a 400 naming `param`: a client's text bound for the
    database is checked here, never left for the database to refuse with a 500."""
    if value is None or storable(value, column):
        return value
    length = getattr(column.type, "length", None)
    limit = f" and at most {length} characters" if length is not None else ""
    raise BadRequest(f"Invalid value for '{param}': expected text without NUL characters{limit}.", param=param)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers (admin queries) run beside the writer; busy_timeout waits for another worker's write
    # instead of failing at once with "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def open_engine(url: str = DEFAULT_URL, *, schema: str | None = None, **engine_kwargs: Any) -> AsyncEngine:
    """An async engine for `sqlite+aiosqlite://` or `postgresql+asyncpg://` URLs.

    `schema` (PostgreSQL only) puts every unqualified name, the tables and Alembic's version table included,
    in that schema by setting the connection's search_path (tests use one schema per run).
    """
    parsed = sa.make_url(url)
    if schema is not None:
        if parsed.get_backend_name() != "postgresql":
            raise ValueError(f"schema= needs a PostgreSQL URL, not {parsed.get_backend_name()}")
        connect_args = engine_kwargs.setdefault("connect_args", {})
        connect_args.setdefault("server_settings", {})["search_path"] = schema
    if parsed.get_backend_name() == "postgresql":
        engine_kwargs.setdefault("pool_pre_ping", True)  # a replica outlives PostgreSQL restarts
    engine = create_async_engine(parsed, **engine_kwargs)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        sa.event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    return engine


def alembic_config(url: str | None = None, *, schema: str | None = None) -> Config:
    """Alembic's Config built in code (no alembic.ini): the packaged migrations and, for the CLI path, a URL."""
    config = Config()
    # Config options go through configparser interpolation: a literal % must be doubled
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["version_table_schema"] = schema
    return config


def _upgrade(connection: Connection, config: Config) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def migrate(target: str | AsyncEngine = DEFAULT_URL, *, schema: str | None = None) -> None:
    """Upgrade the database to the newest revision (a no-op when it is there already).

    Alembic's synchronous API runs inside `AsyncConnection.run_sync` (SQLAlchemy's greenlet bridge) on one shared
    connection, so one path serves aiosqlite and asyncpg; it runs once at startup, so reading the few revision
    files on the loop's thread is acceptable. The upgrade is one transaction (on PostgreSQL also for the DDL, and
    serialized across replicas starting together by an advisory lock).
    """
    engine = open_engine(target, schema=schema) if isinstance(target, str) else target
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_upgrade, alembic_config(schema=schema))
    finally:
        if isinstance(target, str):
            await engine.dispose()
