"""A rolling restart of one of two replicas at a time under load drops no request and loses no usage row; and the
balancer in front retries only what a backend cannot have seen, never a response that has started."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from bench.reliability.balancer import Backend, Balancer
from bench.reliability.rolling import REDIS_URL, restart_under_load
from tests.conftest import free_port, require_redis
from tests.services import PG_ADMIN, pg_admin

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}"


def test_a_rolling_restart_under_load_drops_no_request(tmp_path):
    require_redis(REDIS_URL)
    asyncpg = pytest.importorskip("asyncpg")
    try:
        asyncio.run(pg_admin("SELECT 1"))
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN}: {type(exc).__name__}: {exc}")
    counts = asyncio.run(restart_under_load(tmp_path, before_s=1.5, after_s=1.5))
    assert counts.failed == 0, counts
    assert counts.ok == counts.sent > 0 and counts.long_streams > 0, counts
    assert sum(counts.balancer_failed.values()) == 0, counts
    assert counts.restart_exit_codes == [0, 0] and counts.final_exit_codes == [0, 0], counts
    assert min(counts.served_before) > 0 and min(counts.served_after) > 0, counts
    assert counts.answered == counts.ok, counts
    assert (counts.rows_lost, counts.rows_duplicated) == (0, 0), counts


class _FakeBackend:
    """A raw HTTP/1.1 server: /ready answers 200; every other request is handed to `answer(number on its
    connection, writer)`. It counts the requests it read."""

    def __init__(self, answer: Callable[[int, asyncio.StreamWriter], Awaitable[bool]]) -> None:
        self.answer = answer
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            for number in range(1, 1000):
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                if head.startswith(b"GET /ready "):
                    writer.write(OK)
                    continue
                self.requests += 1
                if not await self.answer(number, writer):
                    break
        writer.close()


@contextlib.asynccontextmanager
async def _balanced(*answers: Callable[[int, asyncio.StreamWriter], Awaitable[bool]]) -> AsyncIterator[
        tuple[Balancer, list[_FakeBackend], aiohttp.ClientSession]]:
    backends = [_FakeBackend(a) for a in answers]
    servers = [await asyncio.start_server(b.handle, "127.0.0.1", 0) for b in backends]
    urls = [f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in servers]
    balancer = Balancer(urls, poll_s=3600)  # readiness from the first poll only: the tests set it themselves
    url = await balancer.start()
    try:
        async with aiohttp.ClientSession(base_url=url) as session:
            yield balancer, backends, session
    finally:
        await balancer.stop()
        for server in servers:
            server.close()


async def _answer(number: int, writer: asyncio.StreamWriter) -> bool:
    writer.write(OK)
    return True


async def test_a_reused_connection_closed_unanswered_is_retried_once():
    async def first_per_connection(number: int, writer: asyncio.StreamWriter) -> bool:
        if number == 1:
            writer.write(OK)
            return True
        return False  # a second request on a kept-alive connection: closed without a byte back

    async with _balanced(first_per_connection) as (balancer, (backend,), session):
        for _ in range(2):
            async with session.post("/v1/chat/completions", json={}) as response:
                assert response.status == 200 and await response.json() == {"ok": True}
    assert balancer.retried == {"connect": 0, "reused": 1}
    assert backend.requests == 3 and balancer.backends[0].served == 2


async def test_a_refused_connect_is_retried_on_another_backend():
    async with _balanced(_answer) as (balancer, (backend,), session):
        dead = Backend(f"http://127.0.0.1:{free_port()}")
        dead.ready = True  # listed ready by a poll just before it went away
        balancer.backends.insert(0, dead)
        for _ in range(4):
            async with session.post("/v1/chat/completions", json={}) as response:
                assert response.status == 200
    # round robin sends some to the dead one: each is retried on the live one, which answers all four
    assert balancer.retried["connect"] > 0 and balancer.retried["reused"] == 0 and backend.requests == 4


async def test_a_fresh_connection_closed_unanswered_is_a_502_not_a_retry():
    async def hang_up(number: int, writer: asyncio.StreamWriter) -> bool:
        return False

    async with _balanced(hang_up, _answer) as (balancer, backends, session):
        statuses = []
        for _ in range(2):
            async with session.post("/v1/chat/completions", json={}) as response:
                statuses.append(response.status)
    assert sorted(statuses) == [200, 502]  # round robin: one to each; the hung-up one is not sent elsewhere
    assert balancer.retried == {"connect": 0, "reused": 0} and balancer.failed["no answer"] == 1
    assert [b.requests for b in backends] == [1, 1]


async def test_a_response_broken_after_it_started_is_cut_off_not_retried():
    async def half_a_stream(number: int, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"b\r\ndata: one\n\n\r\n")
        await writer.drain()
        return False

    async with _balanced(half_a_stream) as (balancer, (backend,), session):
        async with session.post("/v1/chat/completions", json={"stream": True}) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
    assert balancer.failed["cut off"] == 1 and balancer.retried == {"connect": 0, "reused": 0}
    assert backend.requests == 1
