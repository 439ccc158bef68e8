"""Every request through a live gateway writes one usage row, however it ends, flushed on shutdown: on SQLite
(the default) and on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sqlite3

import pytest

from tests.conftest import http, start_gateway


def _requests(url: str) -> None:
    """One answer, one upstream error, one unknown model, one stream read whole, one stream left midway."""
    msg = [{"role": "user", "content": "hello there"}]
    assert http("POST", url + "/v1/chat/completions", {"model": "remote-a", "messages": msg},
                headers={"x-request-id": "u-ok", "x-pointsman-user": "alice"})[0] == 200
    bad = [{"role": "user", "content": "status:400"}]
    assert http("POST", url + "/v1/chat/completions", {"model": "remote-a", "messages": bad},
                headers={"x-request-id": "u-400"})[0] == 400
    assert http("POST", url + "/v1/chat/completions", {"model": "gpt-9", "messages": msg},
                headers={"x-request-id": "u-404"})[0] == 404
    assert http("POST", url + "/v1/chat/completions", {"model": "remote-a", "messages": msg, "stream": True},
                headers={"x-request-id": "u-stream"})[0] == 200
    words = " ".join(f"w{i}" for i in range(100))
    body = json.dumps({"model": "remote-a", "stream": True,
                       "messages": [{"role": "user", "content": f"gap:0.05 {words}"}]}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"x-request-id: u-left\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        received = b""
        while b"w2" not in received:
            received += sock.recv(65536)


def _check(rows: dict[str, dict]) -> None:
    assert set(rows) == {"u-ok", "u-400", "u-404", "u-stream", "u-left"}
    ok = rows["u-ok"]
    assert (ok["status"], ok["http_status"], ok["model_served"], ok["route"], ok["user"]) == (
        "ok", 200, "remote-a", "manual", "alice")
    assert (ok["prompt_tokens"], ok["completion_tokens"]) == (2, 3)
    assert ok["cost_usd"] == pytest.approx((2 * 1.0 + 3 * 2.0) / 1e6) and ok["latency_ms"] > 0
    assert (rows["u-400"]["status"], rows["u-400"]["http_status"], rows["u-400"]["error_code"]) == (
        "error", 400, "mock_400")
    assert (rows["u-404"]["http_status"], rows["u-404"]["error_code"]) == (404, "model_not_found")
    assert rows["u-stream"]["status"] == "ok" and rows["u-stream"]["ttft_ms"] is not None
    left = rows["u-left"]
    assert left["status"] == "cancelled" and 2 <= left["completion_tokens"] < 100


MODELS = """
models:
  - id: remote-a
    backend: openai
    base_url: {url}
    upstream_model: mock-model
    pricing: {{input_per_mtok: 1.0, output_per_mtok: 2.0}}
routing: {{health_check_s: 0}}
"""


def test_usage_rows_on_sqlite_survive_shutdown(upstream, tmp_path):
    db = tmp_path / "usage.db"
    config = MODELS.format(url=upstream.url) + f"storage: {{database_url: 'sqlite+aiosqlite:///{db}'}}\n"
    gateway = start_gateway(tmp_path, config)
    try:
        _requests(gateway.url)
    finally:
        assert gateway.stop(signal.SIGTERM) == 0  # the rows still queued are written on the way out
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        rows = {r["request_id"]: dict(r) for r in conn.execute("SELECT * FROM usage_rows")}
    _check(rows)


def test_usage_rows_on_postgresql(upstream, tmp_path, pg_database):
    import asyncpg

    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{pg_database}"
    gateway = start_gateway(tmp_path, MODELS.format(url=upstream.url) + f"storage: {{database_url: '{url}'}}\n",
                            args=("--workers", "2"))  # two workers: the migration runs once, before them
    try:
        _requests(gateway.url)
    finally:
        assert gateway.stop(signal.SIGTERM) == 0

    async def fetch() -> dict[str, dict]:
        conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:5432/{pg_database}")
        try:
            return {r["request_id"]: dict(r) for r in await conn.fetch("SELECT * FROM usage_rows")}
        finally:
            await conn.close()

    _check(asyncio.run(fetch()))
