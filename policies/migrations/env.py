"""Alembic environment: runs revisions on the connection `policies.database.migrate` shares, or on a URL."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from policies.database import metadata, open_engine

config = context.config
schema = config.attributes.get("version_table_schema")


def run_on(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, version_table_schema=schema,
                      render_as_batch=connection.dialect.name == "sqlite")  # SQLite alters tables by copying
    with context.begin_transaction():
        context.run_migrations()


async def run_on_url(url: str) -> None:
    engine = open_engine(url, schema=schema)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run_on)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=metadata,
                      version_table_schema=schema, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif (shared := config.attributes.get("connection")) is not None:
    run_on(shared)
else:  # the alembic CLI or command API with a URL and no running event loop
    asyncio.run(run_on_url(config.get_main_option("sqlalchemy.url")))
