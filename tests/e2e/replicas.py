"""Two gateway replicas sharing one Redis (of this test's own) and one fresh PostgreSQL database, in front of the
mock upstream (tests/e2e/upstream.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Process, free_port, fresh_pg_database, start_gateway, start_upstream
from tests.services import REDIS_SERVER, RedisServer


@contextlib.contextmanager
def replicas(tmp: Path, make_config, env: dict | None = None) -> Iterator[tuple[Process, Process, Process]]:
    """(first, second, upstream): `make_config(upstream_url, redis_url, database_url)` is the YAML both serve."""
    if not os.path.exists(REDIS_SERVER):
        pytest.skip(f"{REDIS_SERVER} not found")
    redis = RedisServer(free_port(), tmp / "redis.log")
    redis.start()
    started: list[Process] = []
    try:
        with fresh_pg_database() as name:
            upstream = start_upstream(tmp)
            started.append(upstream)
            database = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
            config = make_config(upstream.url, redis.url, database)
            first = start_gateway(tmp, config, env=env)
            started.append(first)
            second = start_gateway(tmp, config, env=env)
            started.append(second)
            try:
                yield first, second, upstream
            finally:
                for process in reversed(started):
                    process.stop()
    finally:
        for process in started:
            process.stop()
        redis.kill()


def one_model(policies: str):
    """A make_config for `replicas`: the mock upstream as model `remote-a`, Redis and the database, and
    `policies` (YAML under `policies:`, indented two spaces)."""

    def make(upstream: str, redis: str, database: str) -> str:
        return f"""
models:
  - {{id: remote-a, backend: openai, base_url: "{upstream}", upstream_model: mock-model}}
routing: {{health_check_s: 0}}
storage: {{redis_url: "{redis}", database_url: "{database}"}}
policies:
{policies}
"""

    return make


def send(urls: list[str], bodies: list[dict]) -> list[httpx.Response]:
    """Each body POSTed to /v1/chat/completions, all at once, taking the replicas in turn."""

    async def all_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(urls[i % len(urls)] + "/v1/chat/completions", json=body)
                                          for i, body in enumerate(bodies)))

    return asyncio.run(all_at_once())
