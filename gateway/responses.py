"""The hot path's ASGI responses (JSON, SSE, policy replies) and the watch that cancels a request whose client
left. Plain ASGI apps: Litestar passes a handler's ASGI app through untouched, skipping its response pipeline."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from litestar.types import Receive, Scope, Send

from policies.context import Outcome
from protocol.errors import GatewayError, error_body

__all__ = ["DONE", "WATCH_AFTER_S", "DisconnectWatch", "JSONBody", "SSEStream", "Watches", "nothing", "replay"]

log = logging.getLogger("pointsman")

DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]
Settle = Callable[[Outcome], Awaitable[None]]
WATCH_AFTER_S = 0.02


def _encode_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


class DisconnectWatch:
    """Cancels the request's task when its client disconnects (ASGI `http.disconnect`), so the upstream request
    is cancelled at once rather than left running until its timeout. Made by `Watches.watch`.

    `stop()` it before the response's last message is sent. Its task is never cancelled: once the response is
    complete the server reports `http.disconnect` anyway, and a stopped watch then just ends.
    """

    __slots__ = ("_owner", "_receive", "_target", "fired", "since", "stopped")

    def __init__(self, owner: Watches, receive: Receive, target: asyncio.Task | None, since: float) -> None:
        self._owner, self._receive, self._target, self.since = owner, receive, target, since
        self.fired = self.stopped = False

    def begin(self) -> None:
        asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if not self.stopped and self._target is not None:
            self.fired = True
            self._target.cancel()
        self._target = None

    def stop(self) -> None:
        self.stopped = True
        self._owner.pending.pop(self, None)

    def absorb(self, exc: BaseException) -> bool:
        """True when `exc` is the cancellation this watch caused: the caller then ends quietly."""
        if self.fired and isinstance(exc, asyncio.CancelledError):
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            return True
        return False


class Watches:
    """One app's disconnect watches. A request's watch starts WATCH_AFTER_S after the request did, so a client
    that leaves is noticed within about that time, while requests that end sooner (most, on a fast upstream)
    cost a dict entry, not a task and a timer each: one timer serves every pending watch. (A watching task per
    request, cancelled at its end, cost ~15% of c16 throughput here, and its exceptions' reference cycles
    brought on full garbage collections: see bench/RESULTS.md.)"""

    __slots__ = ("_timer", "pending")

    def __init__(self) -> None:
        self.pending: dict[DisconnectWatch, None] = {}  # insertion order is start order
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, receive: Receive) -> DisconnectWatch:
        """A watch for the current task's request (call it once the request body has been read)."""
        loop = asyncio.get_running_loop()
        watch = DisconnectWatch(self, receive, asyncio.current_task(loop), loop.time())
        self.pending[watch] = None
        if self._timer is None:
            self._timer = loop.call_at(watch.since + WATCH_AFTER_S, self._sweep)
        return watch

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() - WATCH_AFTER_S
        self._timer = None
        for watch in list(self.pending):
            if watch.since > due:
                self._timer = loop.call_at(watch.since + WATCH_AFTER_S, self._sweep)
                return
            del self.pending[watch]
            watch.begin()


async def nothing(scope: Scope, receive: Receive, send: Send) -> None:
    """The response to a client that already left: there is no one to send it to."""


class JSONBody:
    """An already-encoded JSON response; `after` (the policies' settle) runs once the body has been sent."""

    __slots__ = ("after", "body", "headers", "status")

    def __init__(self, body: bytes, headers: dict[str, str], status: int = 200,
                 after: Callable[[], Awaitable[None]] | None = None) -> None:
        self.body, self.status, self.after = body, status, after
        self.headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        self.headers += _encode_headers(headers)  # a comprehension: half the loop's cost for a dozen headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})
        if self.after is not None:
            await self.after()


class SSEStream:
    """Server-sent events: payloads are framed and written as they arrive. An error after the start becomes one
    error event and `[DONE]`; a client that leaves ends the stream (and its upstream) at once. `settle` runs
    exactly once, however the stream ends. With a `dialect` (gateway/generate.py), the chat chunks are handed to
    it and the frames it makes are written instead, its own error events too."""

    __slots__ = ("dialect", "first", "headers", "rest", "settle", "watch")

    def __init__(self, first: bytes | None, rest: AsyncIterator[bytes], headers: dict[str, str],
                 watch: DisconnectWatch, settle: Settle | None, dialect: Any = None) -> None:
        self.first, self.rest, self.watch, self.settle, self.dialect = first, rest, watch, settle, dialect
        self.headers = _SSE_HEADERS + _encode_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.dialect is not None:
            return await self._translated(send)
        outcome, tail = Outcome("ok"), DONE
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            if self.first is not None:
                await send({"type": "http.response.body", "body": b"data: %s\n\n" % self.first, "more_body": True})
            async for payload in self.rest:
                await send({"type": "http.response.body", "body": b"data: %s\n\n" % payload, "more_body": True})
        except GatewayError as exc:
            outcome, tail = Outcome("error", error=exc), b"data: " + exc.body() + b"\n\n" + DONE
        except Exception as exc:
            outcome, failure = Outcome("error", error=_failure(exc)), _FAILED
            tail = b"data: " + failure + b"\n\n" + DONE
        except BaseException as exc:  # cancelled: the client left, or the server is stopping
            await self._close(Outcome("cancelled"))
            if self.watch.absorb(exc):
                return
            raise
        await self._close(None)
        await send({"type": "http.response.body", "body": tail, "more_body": False})
        if self.settle is not None:
            await self.settle(outcome)

    async def _translated(self, send: Send) -> None:
        """The same, with the dialect's frames: it ends the stream itself (no `[DONE]`)."""
        outcome, tail = Outcome("ok"), b""
        joined = _joined(self.first, self.rest)
        frames = self.dialect.stream(joined)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            async for frame in frames:
                await send({"type": "http.response.body", "body": frame, "more_body": True})
        except GatewayError as exc:
            outcome, tail = Outcome("error", error=exc), self.dialect.stream_error(exc)
        except Exception as exc:
            failure = _failure(exc)
            outcome, tail = Outcome("error", error=failure), self.dialect.stream_error(failure)
        except BaseException as exc:
            await _closed(frames, joined)
            await self._close(Outcome("cancelled"))
            if self.watch.absorb(exc):
                return
            raise
        await _closed(frames, joined)
        await self._close(None)
        await send({"type": "http.response.body", "body": tail, "more_body": False})
        if self.settle is not None:
            await self.settle(outcome)

    async def _close(self, cancelled: Outcome | None) -> None:
        # closing the relay's iterator books its lease and stops the upstream (or local generation)
        self.watch.stop()
        await self.rest.aclose()  # type: ignore[attr-defined]
        if cancelled is not None and self.settle is not None:
            await self.settle(cancelled)


_FAILED = error_body("The stream failed inside the gateway.", "api_error", "internal_error")


def _failure(exc: Exception) -> GatewayError:
    log.exception("stream failed", exc_info=exc)
    return GatewayError(f"The stream failed inside the gateway: {type(exc).__name__}")


async def _closed(*iterators: AsyncIterator[bytes]) -> None:
    for iterator in iterators:
        await iterator.aclose()  # type: ignore[attr-defined]


async def _joined(first: bytes | None, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first is not None:
        yield first
    async for payload in rest:
        yield payload


async def replay(chunks: tuple[bytes, ...]) -> AsyncIterator[bytes]:
    """A policy's reply to a streamed request, as a stream."""
    for chunk in chunks:
        yield chunk
