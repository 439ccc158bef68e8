"""Chat completions over a WebSocket (/v1/chat/completions/ws): JSON requests in, the SSE stream's chunks out."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import msgspec
from litestar import Router, WebSocket, websocket
from litestar.exceptions import WebSocketDisconnect
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import HeaderLineTooLong, RequestLineTooLong, TooManyHeaders

from gateway.auth import principal_of
from gateway.generate import POLICY_HEADERS
from gateway.pipeline import Pipeline
from gateway.request_id import request_id_of
from policies.context import Outcome, Reply, RequestContext
from protocol.errors import INTERNAL_ERROR_BODY, GatewayError, error_body
from protocol.openai import ChatCompletionRequest, decode_object, decode_request

__all__ = ["MAX_PENDING", "WebSocketProtocol", "websocket_router"]

log = logging.getLogger("pointsman")

# requests a client may send ahead of the one being answered; past that its reads wait (TCP backpressure)
MAX_PENDING = 16
_DONE_KEY = "done"
_GONE = (OSError, WebSocketDisconnect)  # uvicorn's ClientDisconnected is an OSError


# uvicorn's and websockets' INFO lines per upgrade ('"WebSocket /path" 401', 'connection rejected', 'connection
# open': an access log, which the gateway turns off) go here and no further; warnings and errors reach uvicorn's
# log. A filter, not a level: uvicorn's logging dictConfig resets the levels of the loggers below its own.
# A text message that is not UTF-8 is the client's fault: it gets close code 1007, and the server's log no ERROR
# with a traceback (uvicorn's logger.exception), which a client could have written at will.
_SERVER_LOG = logging.getLogger("uvicorn.error.websocket")
_NOT_UTF8 = "Invalid UTF-8 sequence received from client."
_SERVER_LOG.addFilter(lambda record: record.levelno >= logging.WARNING and record.msg != _NOT_UTF8)


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol (`uvicorn.run(ws=...)`), with a refused upgrade's HTTP response (our 401/403
    with its OpenAI error body) counted as the end of the handshake: uvicorn 0.54 leaves it unfinished there and
    logs "ASGI callable returned without completing handshake." at ERROR for every refused client. Importable, so
    it pickles into the worker processes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = self.conn.logger = _SERVER_LOG

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            self.handshake_complete = True

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_initiated and self.conn.handshake_exc is not None and not self.transport.is_closing():
            self._refuse_handshake(self.conn.handshake_exc)

    def _refuse_handshake(self, exc: Exception) -> None:
        """websockets could not read the upgrade request (a body, a line too long, too many headers): it
        queues a reply or an EOF that uvicorn 0.54 never writes, so the client waited with no answer and no timer
        (the HTTP protocol stops its clock when it hands over). Answered here, in OpenAI's error shape, and closed."""
        self.conn.data_to_send()  # dropped: ours replaces it
        status = 400
        if isinstance(exc, RequestLineTooLong):
            status = 414
        elif isinstance(exc, (HeaderLineTooLong, TooManyHeaders)):
            status = 431
        reason = exc.__cause__ or exc
        body = error_body(f"Invalid WebSocket handshake: {reason}.", "invalid_request_error", _REFUSAL_CODES[status])
        head = [b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())]
        head += [b"%s: %s\r\n" % pair for pair in self.default_headers]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        self.handshake_initiated = self.handshake_complete = self.close_sent = True
        self.transport.write(b"".join(head) + body)
        self.transport.close()


_REFUSAL_CODES = {400: "invalid_http_request", 414: "uri_too_long", 431: "request_header_fields_too_large"}


def _fresh_request_id() -> str:
    """A new id per request on the connection (the upgrade's x-request-id, if any, names the first)."""
    return request_id_of({"headers": ()})


class _Connection:
    """One accepted socket: its requests are answered one after another, in the order they arrive; a reader task
    queues them and, when the client leaves, cancels the request being streamed (settled as `cancelled`), but not
    one whose answer is complete: its booking and settle run to their end (`settling`), as the HTTP routes stop
    their disconnect watch before the last message. The key is checked again before each request (from the
    authenticator's cache: a revocation or an expiry reaches it as it reaches the HTTP routes), so a socket opened
    with a key that stops working ends with its error and 1008."""

    __slots__ = ("gone", "guards", "pipeline", "policy_headers", "principal", "settling", "socket", "task", "user")

    def __init__(self, socket: WebSocket, pipeline: Pipeline, guards: Sequence) -> None:
        self.socket, self.pipeline, self.guards = socket, pipeline, guards
        self.principal = principal_of(socket.scope)
        self.user: str | None = None
        self.policy_headers: dict[str, str] = {}
        for key, value in socket.scope["headers"]:
            if key == b"x-pointsman-user":
                self.user = value.decode("latin-1")
            elif key in POLICY_HEADERS:  # as on the HTTP routes
                self.policy_headers[key.decode("latin-1")] = value.decode("latin-1")
        self.gone = self.settling = False
        self.task: asyncio.Task | None = None

    async def run(self) -> None:
        self.task = asyncio.current_task()
        inbox: asyncio.Queue[bytes] = asyncio.Queue(MAX_PENDING)
        reader = asyncio.get_running_loop().create_task(self._read(inbox))
        first = True
        try:
            while True:
                self.settling = False
                message = await inbox.get()
                if not first and self.guards:
                    allowed = await self._still_authorized()
                    if allowed is None:
                        continue  # the check itself failed: this request was answered with the error
                    if not allowed:
                        return
                rid = request_id_of(self.socket.scope) if first else _fresh_request_id()
                first = False
                await self._answer(message, rid)
                if self.gone:
                    return  # the client left while that answer was being settled
        except asyncio.CancelledError:
            if not self.gone:
                raise
            self.task.uncancel()  # the client left: the connection just ends
        except _GONE:
            pass
        finally:
            reader.cancel()

    async def _read(self, inbox: asyncio.Queue[bytes]) -> None:
        receive = self.socket.receive
        try:
            while True:
                message = await receive()
                if message["type"] != "websocket.receive":
                    break  # websocket.disconnect
                text = message.get("text")
                await inbox.put(text.encode() if text is not None else message.get("bytes") or b"")
        except _GONE:
            pass
        self.gone = True
        if self.task is not None and not self.settling:
            self.task.cancel()

    async def _still_authorized(self) -> bool | None:
        """Whether the socket's key still works (the upgrade's guards, again); if not, its error is sent and the
        socket closed with 1008 (policy violation). None when the check itself failed (the key store could not be
        read): that request is answered with internal_error and the socket goes on, as the HTTP routes answer it."""
        try:
            refused = await _authorize(self.socket, self.guards)
        except _GONE:
            raise
        except Exception:
            log.exception("websocket: checking the API key failed")
            await self._send(error_body("The gateway could not check the API key.", "api_error", "internal_error"))
            return None
        if refused is None:
            self.principal = principal_of(self.socket.scope)  # the key's current role, limits and budget
            return True
        await self._send(refused.body())
        await _close_refused(self.socket, refused)
        return False

    async def _send(self, payload: bytes | str) -> None:
        text = payload if isinstance(payload, str) else payload.decode()
        await self.socket.send({"type": "websocket.send", "text": text})

    def _context(self, data: bytes, rid: str) -> RequestContext:
        raw = decode_object(data)
        raw["stream"] = True  # implied: a socket only streams
        parsed = decode_request(raw, ChatCompletionRequest)
        ctx = RequestContext(parsed, self.principal, rid, parsed.body.user or self.user)
        if self.policy_headers and self.pipeline.has_policies:
            ctx.state["request_headers"] = dict(self.policy_headers)
        if self.pipeline.tracing is not None:  # the upgrade's traceparent: each request's span becomes its child
            self.pipeline.tracing.accept(ctx, self.socket.scope["headers"])
        return ctx

    async def _answer(self, data: bytes, rid: str) -> None:
        """One request: its chunks, one per message, then `{"done": true}`; an error is one message and the
        connection stays open. Settled exactly once, as over SSE."""
        pipeline = self.pipeline
        try:
            ctx = self._context(data, rid)
            result = await pipeline.stream(ctx)  # settles itself when it fails or is cancelled
        except GatewayError as exc:
            await self._send(exc.body())
            return
        except _GONE:
            raise
        except Exception:  # as the HTTP routes answer it (a 500), but the connection and its other requests go on
            log.exception("websocket request %s failed", rid)
            await self._send(INTERNAL_ERROR_BODY)
            return
        if isinstance(result, Reply):  # a policy answered (a cache hit)
            for chunk in result.chunks:
                await self._send(chunk)
            self.settling = True
            try:
                await self._send(msgspec.json.encode({_DONE_KEY: True, "request_id": rid}))
            finally:
                await pipeline.settle(ctx, Outcome("answered"))
            return
        outcome = Outcome("ok", body=result.assembled)
        tail = None
        try:
            if result.first is not None:
                await self._send(result.first)
            async for payload in result.rest:
                await self._send(payload)
        except GatewayError as exc:
            outcome, tail = Outcome("error", error=exc), exc.body()
        except Exception as exc:
            if isinstance(exc, _GONE):
                await self._cancelled(ctx, result.rest)
                raise
            log.exception("websocket stream failed")
            failure = GatewayError(f"The stream failed inside the gateway: {type(exc).__name__}")
            body = error_body("The stream failed inside the gateway.", "api_error", "internal_error")
            outcome, tail = Outcome("error", error=failure), body
        except BaseException:  # cancelled: the client left, or the server is stopping
            await self._cancelled(ctx, result.rest)
            raise
        self.settling = True
        await result.rest.aclose()  # type: ignore[attr-defined]  # books the lease
        try:
            await self._send(tail if tail is not None else msgspec.json.encode({_DONE_KEY: True, "request_id": rid}))
        finally:  # the answer was served even if the client left before its last message
            await pipeline.settle(ctx, outcome)

    async def _cancelled(self, ctx: RequestContext, rest) -> None:
        # closing the relay's iterator stops the upstream and books its lease
        await rest.aclose()
        await self.pipeline.settle(ctx, Outcome("cancelled"))


async def _authorize(socket: WebSocket, guards: Sequence) -> GatewayError | None:
    """The /v1 guards, run here so a refusal is an HTTP answer to the upgrade, not a close code 4500."""
    try:
        for guard in guards:
            result = guard(socket, socket.route_handler)
            if inspect.isawaitable(result):
                await result
    except GatewayError as exc:
        return exc
    return None


async def _refuse(socket: WebSocket, exc: GatewayError) -> None:
    """Answer the upgrade with the error's status and OpenAI JSON where the server can (the ASGI WebSocket
    denial extension), else close it with 1008 (policy violation) before accepting."""
    if "websocket.http.response" in (socket.scope.get("extensions") or {}):
        body = exc.body()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                   *((k.encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items())]
        await socket.send({"type": "websocket.http.response.start", "status": exc.status, "headers": headers})
        await socket.send({"type": "websocket.http.response.body", "body": body})
    else:
        await _close_refused(socket, exc)


async def _close_refused(socket: WebSocket, exc: GatewayError) -> None:
    """Close with 1008 (policy violation), the refusal's message as the reason (at most 123 bytes are allowed)."""
    await socket.send({"type": "websocket.close", "code": 1008, "reason": exc.message[:120]})


def websocket_router(guards: Sequence) -> Router:
    """The /v1/chat/completions/ws route, behind the same guards as the other /v1 routes."""

    @websocket("/chat/completions/ws", name="chat_completions_ws")
    async def chat_completions_ws(socket: WebSocket) -> None:
        refused = await _authorize(socket, guards)
        if refused is not None:
            await _refuse(socket, refused)
            return
        pipeline: Pipeline = socket.app.state.pipeline
        await socket.accept()
        await _Connection(socket, pipeline, guards).run()

    return Router(path="/v1", route_handlers=[chat_completions_ws])

