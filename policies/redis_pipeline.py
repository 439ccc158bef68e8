"""Auto-pipelining for RedisStore: the commands issued during one event-loop turn reach Redis as one write."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from functools import partial
from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

__all__ = ["AutoPipeline"]

_Command = tuple[tuple[Any, ...], asyncio.Future[Any]]


class AutoPipeline:
    """Queues commands and sends each event-loop turn's worth as one pipelined write, as ioredis's
    `enableAutoPipelining` does: under load a dozen requests' commands share one write, one read and one
    timeout instead of paying redis-py's per-command pool checkout, health check and read timeout each.

    At most `connections` batches are in flight, each on a dedicated connection made like the pool's (same
    URL, TLS, auth and db); a batch waiting for one takes every command queued meanwhile. Replies are read in
    order and each caller's future gets its reply, or its error reply as an exception. A whole batch must
    finish within `timeout_s`, else its connection is dropped and every caller still waiting gets a
    TimeoutError; nothing is retried after a timeout (a script may have run). A connection found broken before
    any reply of its batch was read (Redis restarted since its last use) is reconnected and the batch sent once
    more, as redis-py retries a command on a stale connection. EVALSHA of a script Redis no longer has
    (NOSCRIPT, after a restart or SCRIPT FLUSH) loads it and runs those commands again.
    """

    __slots__ = ("_free", "_idle", "_new", "_queued", "_scheduled", "_scripts", "_tasks", "_timeout")

    def __init__(self, pool: ConnectionPool, *, connections: int = 4, timeout_s: float = 0.5) -> None:
        # no per-read socket timeout: one deadline covers the whole batch
        self._new = partial(pool.connection_class, **{**pool.connection_kwargs, "socket_timeout": None})
        self._free = asyncio.Semaphore(connections)
        self._idle: list[AbstractConnection] = []
        self._queued: list[_Command] = []
        self._scheduled = False
        self._scripts: dict[str, bytes] = {}  # sha1 -> source, for reloading after NOSCRIPT
        self._tasks: set[asyncio.Task[None]] = set()
        self._timeout = timeout_s

    def script(self, source: str) -> str:
        """Register a Lua script; returns the sha1 to pass to `evalsha`."""
        encoded = source.encode()
        sha = hashlib.sha1(encoded).hexdigest()
        self._scripts[sha] = encoded
        return sha

    def call(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command; the future resolves to its raw reply (bytes, int, list or None)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queued.append((args, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._spawn)  # after the callbacks already ready: they may queue commands too
        return future

    def evalsha(self, sha: str, keys: Sequence[Any], args: Sequence[Any]) -> asyncio.Future[Any]:
        return self.call("EVALSHA", sha, len(keys), *keys, *args)

    async def aclose(self) -> None:
        for task in tuple(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._idle:
            await self._idle.pop().disconnect(nowait=True)

    def _spawn(self) -> None:
        self._scheduled = False
        task = asyncio.get_running_loop().create_task(self._flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self) -> None:
        async with self._free:
            batch, self._queued = [c for c in self._queued if not c[1].done()], []  # done: its caller left
            if not batch:
                return
            connection = self._idle.pop() if self._idle else self._new()
            try:
                async with asyncio.timeout(self._timeout):
                    await self._send(connection, batch, retry_stale=True, load_scripts=True)
            except BaseException as exc:
                await connection.disconnect(nowait=True)  # its stream is in an unknown state
                error = exc if isinstance(exc, Exception) else RedisConnectionError("the Redis pipeline was closed")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                if not isinstance(exc, Exception):
                    raise
            else:
                self._idle.append(connection)

    async def _send(self, connection: AbstractConnection, batch: list[_Command], *, retry_stale: bool,
                    load_scripts: bool) -> None:
        reused = connection.is_connected
        if not reused:
            await connection.connect()
        await connection.send_packed_command(connection.pack_commands([args for args, _ in batch]),
                                             check_health=False)
        missing: list[_Command] = []  # NOSCRIPT: run again once the scripts are loaded
        for position, (args, future) in enumerate(batch):
            try:
                reply = await connection.read_response()
            except NoScriptError as exc:
                if load_scripts:
                    missing.append((args, future))
                elif not future.done():
                    future.set_exception(exc)
                continue
            except ResponseError as exc:
                if not future.done():
                    future.set_exception(exc)
                continue
            except RedisConnectionError:
                if not (retry_stale and reused and position == 0):
                    raise
                await connection.disconnect(nowait=True)  # nothing came back: the batch never reached Redis
                await self._send(connection, batch, retry_stale=False, load_scripts=load_scripts)
                return
            if not future.done():
                future.set_result(reply)
        if missing:
            for sha in {args[1] for args, _ in missing}:
                await connection.send_packed_command(connection.pack_command("SCRIPT", "LOAD", self._scripts[sha]),
                                                     check_health=False)
                await connection.read_response()
            await self._send(connection, missing, retry_stale=False, load_scripts=False)
