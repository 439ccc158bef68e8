"""uvicorn's httptools protocol with read timeouts, a header size limit, RFC 9112's Host and transfer-coding checks,
close-delimited HTTP/1.0 streams, and a response head checked in two passes rather than two regex searches per
header and written with its body."""

from __future__ import annotations

import asyncio
import functools
import http
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from gateway.anthropic import under_messages
from protocol.anthropic import error_body as anthropic_error_body
from protocol.errors import error_body

__all__ = ["GuardedHttpToolsProtocol", "http_protocol"]

# where the parser is in the request it is reading; set from the parser callbacks
_IDLE, _HEADERS, _BODY = 0, 1, 2

# uvicorn's callbacks, called directly rather than through super(): these run on every request
_begin = HttpToolsProtocol.on_message_begin
_headers_complete = HttpToolsProtocol.on_headers_complete
_message_complete = HttpToolsProtocol.on_message_complete


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing and refuse the request with `status` (and close);
    httptools hands it back as the error's __context__."""

    def __init__(self, status: int, message: str | None = None) -> None:
        super().__init__(status, message)
        self.status, self.message = status, message


def http_protocol(
    header_timeout_s: float = 10.0, body_timeout_s: float = 30.0, max_header_bytes: int = 65536
) -> Callable[..., asyncio.Protocol]:
    """The protocol factory to pass as `uvicorn.run(http=...)`.

    A partial of an importable class, so it pickles into the worker processes `workers > 1` spawns.
    """
    return functools.partial(
        GuardedHttpToolsProtocol,
        header_timeout_s=header_timeout_s,
        body_timeout_s=body_timeout_s,
        max_header_bytes=max_header_bytes,
    )


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """Cuts off clients that send their request too slowly or with too large a head, and frames HTTP/1.0 replies.

    - headers: a request's line and headers must arrive within `header_timeout_s` of the connection opening (the
      first request) or of its first byte (later ones), else 408 and close; a connection that sent nothing is just
      closed, as an expired keep-alive is.
    - body: while the request body is incomplete, each gap between reads must stay under `body_timeout_s`, else
      close, with 408 if the response has not started. The clock stops while the client is waiting on us: reading
      paused because the app has not taken the body yet, or an `Expect: 100-continue` not answered yet.
    - size: request line plus headers over `max_header_bytes` gets 431 and close. Counted exactly when the head
      completes, and as raw bytes read while it is still incomplete (so one endless header is cut off early).
    - head: a request past HTTP/1.0 without a Host header, or any with two, gets 400 (RFC 9112 3.2); a transfer
      coding other than chunked, which llhttp lets pass before a final chunked, 501 (6.1). Either is answered after
      the responses to the requests pipelined before it, then the connection closes.
    - HTTP/1.0: a response with no content-length goes out unframed, ended by closing the connection, since
      HTTP/1.0 clients cannot read chunked transfer-encoding.
    - keep-alive: a connection idle for uvicorn's `timeout_keep_alive` after a response is closed quietly.

    At most one `call_at` timer per connection, armed at connect and when a read ends inside a request; later reads
    only move its deadline. The keep-alive timeout shares it: a response's end moves the idle deadline, and the
    timer, when it fires between requests, closes the connection or sleeps until that deadline. So a keep-alive
    request that arrives whole in one read arms and cancels no timer, where uvicorn arms one on every response
    and cancels it on the next request (3.1 us a request here, timeit).
    """

    def __init__(
        self, *args: Any, header_timeout_s: float, body_timeout_s: float, max_header_bytes: int, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout_s
        self._body_timeout = body_timeout_s
        self._max_header_bytes = max_header_bytes
        self._phase = _HEADERS  # until the first request arrives, the connection is waiting for headers
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0  # 0.0: the current phase's clock has not started yet
        self._header_bytes = 0  # raw bytes of earlier reads that ended inside this request's head
        self._read_len = 0
        self._held_for_app = False  # the last timeout found the app not yet asking for an Expect: 100 body
        self._idle_until = 0.0  # loop time when the keep-alive ends, set as each response completes
        # this request's Host headers plus twice its Transfer-Encoding ones: 1, the usual head, needs no closer look
        self._marks = 0

    # connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline = self.loop.time() + self._header_timeout
        self._timer = self.loop.call_at(self._deadline, self._on_read_timeout)

    def _invalid_request(self) -> None:
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self.send_400_response(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._cancel_timer()

    def data_received(self, data: bytes) -> None:
        # uvicorn 0.54's version, plus the 431 and the timer bookkeeping once the read is parsed; without its
        # cancelling of the keep-alive timer, which this protocol never arms (see on_response_complete)
        while True:  # once more for each upgrade not taken in this read, with the bytes after its head
            self._read_len = len(data)
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                refused = exc.__context__
                if isinstance(refused, _Refused):
                    self._refuse(refused.status, refused.message)
                    return
                self._invalid_request()
                return
            except httptools.HttpParserUpgrade as upgrade:
                if self._should_upgrade():
                    self._phase = _IDLE
                    self._cancel_timer()
                    self.handle_websocket_upgrade()
                    return
                # an upgrade not taken (h2c, or any but WebSocket; CONNECT too): llhttp ended the request at its
                # head, skipping its body, and would read that body as the next request (uvicorn 0.54 answered the
                # request with no body, then the request smuggled in it: Kludex/uvicorn#2722). It is plain
                # HTTP/1.1 instead (RFC 9110 7.8): a parser that knows only its framing headers reads its body, and
                # the requests after it
                try:
                    _PlainAfterUpgrade(self)  # becomes self.parser
                except httptools.HttpParserError:  # framing llhttp let pass for an upgrade (transfer-encoding gzip)
                    self._invalid_request()
                    return
                data = data[upgrade.args[0]:]
                continue
            break

        # a read that ends between requests (the hot path) leaves the timer as it is: it finds the connection idle
        # or busy when it fires
        phase = self._phase
        if phase == _HEADERS:
            self._header_bytes += len(data)
            if self._header_bytes > self._max_header_bytes:
                self._refuse(431)
            elif not self._deadline:
                self._deadline = self.loop.time() + self._header_timeout
                self._arm(self._deadline)
        elif phase == _BODY:
            started = self._deadline
            self._deadline = self.loop.time() + self._body_timeout  # each read restarts the gap
            if not started:
                self._arm(self._deadline)

    # parser callbacks
    def on_message_begin(self) -> None:
        _begin(self)
        self._marks = 0  # here, not only once the head is checked: a chunked body's trailers pass on_header too
        if self._phase != _HEADERS:  # a later request (not the first): its clock starts when this read ends
            self._phase = _HEADERS
            self._deadline = 0.0
            self._header_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        # uvicorn 0.54's, also marking the headers _check_head reads: one set lookup where uvicorn compared once
        name = name.lower()
        if name in _MARKED:
            if name == b"host":
                self._marks += 1
            elif name == b"transfer-encoding":
                self._marks += 2
            elif value.lower() == b"100-continue":
                self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        limit = self._max_header_bytes
        # the head is no bigger than the bytes read since it began: count it exactly only when those could exceed
        if self._header_bytes + self._read_len > limit and self._head_size() > limit:
            raise _Refused(431)
        if self._marks != 1 and (refused := self._check_head()) is not None:  # not the usual head: a closer look
            self._answer_in_turn(refused)
            return
        self._phase = _BODY
        self._deadline = 0.0
        _headers_complete(self)
        cycle = self.cycle
        if cycle is not None and cycle.scope is self.scope:  # the ASGI task has not run yet: it calls this `send`
            cycle.__class__ = _CloseDelimitedCycle if self.scope["http_version"] == "1.0" else _Cycle

    def on_message_complete(self) -> None:
        if self.parser.should_upgrade():  # ended at the head by an upgrade: data_received reads on (or hands over)
            return
        self._phase = _IDLE
        _message_complete(self)

    def on_response_complete(self) -> None:
        # uvicorn 0.54's version, with the keep-alive timeout kept on the connection's timer (see the class docstring)
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        until = self._idle_until = self.loop.time() + self.timeout_keep_alive
        if self._timer is None or self._timer.when() > until:  # none armed, or armed for later (a read deadline)
            self._arm(until)

    def _check_head(self) -> _Refused | None:
        """The refusal of a head RFC 9112 refuses: no Host in a request past HTTP/1.0 or more than one (3.2, a 400),
        a transfer coding besides chunked, which llhttp passes but nothing here decodes (6.1, a 501), or chunked
        twice or not last (6.3, a 400)."""
        hosts = 0
        codings: list[bytes] = []
        for name, value in self.headers:
            if name == b"host":
                hosts += 1
            elif name == b"transfer-encoding":  # a list, possibly over several lines; empty elements are ignored
                codings += [coding for part in value.split(b",") if (coding := part.strip().lower())]
        if hosts > 1:
            return _Refused(400, "Invalid HTTP request: more than one Host header.")
        if not hosts and self.parser.get_http_version() != "1.0":
            return _Refused(400, "Invalid HTTP request: HTTP/1.1 requires a Host header.")
        if codings and codings != [b"chunked"]:
            if codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
                return _Refused(400, "Invalid HTTP request: chunked must be the last transfer coding, and only once.")
            unknown = ", ".join(c.decode("latin-1") for c in codings[:-1])
            return _Refused(501, f"Transfer-Encoding {unknown} is not supported: send the body chunked only.")
        return None

    def _answer_in_turn(self, refused: _Refused) -> None:
        """Answer this request with `refused` and close, but after the responses to the requests before it (a
        pipeline): uvicorn's own exchange, given an app that answers the refusal with `connection: close`."""
        if self.parser.should_upgrade():  # uvicorn starts no exchange for an upgrade: refused (and closed) now
            raise refused
        self._marks = 1  # checked: the ordinary path starts the exchange
        app, self.app = self.app, _Refusal(refused.status, refused.message or "")
        try:
            self.on_headers_complete()
        finally:
            self.app = app

    # timeouts
    def _head_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(when, self._on_read_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_read_timeout(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        cycle = self.cycle
        if self._phase == _IDLE:  # between requests: the keep-alive's clock, unless a request is still being answered
            if cycle is None or not cycle.response_complete:
                return  # its response's end arms the timer again
            # a later response moved the idle deadline (uvloop's clock counts whole milliseconds: one less than a
            # millisecond away has come, rather than a 0 ms timer firing until the clock ticks)
            if now < self._idle_until - 0.001:
                self._arm(self._idle_until)
            else:
                self.transport.close()  # what uvicorn's timeout_keep_alive_handler does
            return
        if self._phase == _HEADERS:
            if cycle is not None and not cycle.response_complete:  # a pipelined request waits on our reply
                self._deadline = now + self._header_timeout
            elif not self._header_bytes:  # nothing of a request arrived: close quietly, like keep-alive expiry
                self.transport.close()
                return
        elif self.flow.read_paused or cycle.waiting_for_100_continue:  # the client waits on the app, not we on it
            self._deadline = now + self._body_timeout
            self._held_for_app = cycle.waiting_for_100_continue
        elif self._held_for_app:  # the app asked since (100 Continue sent): the client gets a whole gap to answer
            self._held_for_app = False
            self._deadline = now + self._body_timeout
        if now < self._deadline:  # a later read pushed the deadline out: sleep again instead of resetting per read
            self._timer = self.loop.call_at(self._deadline, self._on_read_timeout)
            return
        self._refuse(408)

    def _refuse(self, status: int, message: str | None = None) -> None:
        """Close the connection, answering `status` (with `message`, else its phrase) first unless a response is
        already on the wire."""
        cycle = self.cycle
        if self._phase == _BODY:  # the app holds this request: it now reads http.disconnect, its replies are dropped
            answer = not cycle.response_started
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        else:
            answer = cycle is None or cycle.response_complete
        if answer:
            self._write_error(status, message or http.HTTPStatus(status).phrase)
        self._phase = _IDLE
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse, in OpenAI's error shape rather than plain text."""
        self._write_error(400, msg)
        self.transport.close()

    def _write_error(self, status: int, message: str) -> None:
        """A closing error response whose body is OpenAI's error object, as the app's own errors are."""
        body = _refusal_body(status, message)
        head = [b"HTTP/1.1 %d %s\r\n" % (status, http.HTTPStatus(status).phrase.encode())]
        head += [b"%s: %s\r\n" % pair for pair in self.server_state.default_headers]
        head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
        self.transport.write(b"".join(head) + b"connection: close\r\n\r\n" + body)


def _refusal_body(status: int, message: str) -> bytes:
    return error_body(message, "invalid_request_error", _PROTOCOL_ERROR_CODES.get(status))


class _Refusal:
    """An ASGI app that answers with a refusal of the protocol's own, as _write_error words it (in Anthropic's
    shape under /v1/messages, as every error there is), and closes."""

    __slots__ = ("message", "status")

    def __init__(self, status: int, message: str) -> None:
        self.status, self.message = status, message

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if under_messages(scope.get("path", "")):
            body = anthropic_error_body(self.status, self.message)
        else:
            body = _refusal_body(self.status, self.message)
        await send({"type": "http.response.start", "status": self.status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _PlainAfterUpgrade:
    """The callbacks of the parser that goes on where an upgrade not taken stopped the connection's: it is first fed
    a head of just the request's framing headers (content-length, transfer-encoding), whose callbacks stop here, so
    that it reads the request's body as llhttp would have without the upgrade; everything after reaches the
    protocol (its body, its end, the requests that follow), one call through this object each."""

    __slots__ = ("on_body", "on_message_complete", "protocol", "replaying")

    def __init__(self, protocol: GuardedHttpToolsProtocol) -> None:
        self.protocol, self.replaying = protocol, True
        self.on_body, self.on_message_complete = protocol.on_body, protocol.on_message_complete
        parser = protocol.parser = httptools.HttpRequestParser(self)  # before the head: a request with no body ends
        parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn sets its own
        framing = [b"%s: %s\r\n" % pair for pair in protocol.headers if pair[0] in _BODY_FRAMING]
        parser.feed_data(b"POST / HTTP/1.1\r\n%s\r\n" % b"".join(framing))  # may raise: see data_received
        self.replaying = False

    def on_message_begin(self) -> None:
        if not self.replaying:
            self.protocol.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self.replaying:
            self.protocol.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.replaying:
            self.protocol.on_header(name, value)

    def on_headers_complete(self) -> None:
        if not self.replaying:
            self.protocol.on_headers_complete()


_BODY_FRAMING = frozenset((b"content-length", b"transfer-encoding"))
# the `code` of each refusal the protocol itself sends (the request never reached the app)
_PROTOCOL_ERROR_CODES = {400: "invalid_http_request", 408: "request_timeout", 431: "request_header_fields_too_large",
                         501: "unsupported_transfer_coding"}
# the request headers on_header marks for _check_head; `expect`, which uvicorn reads, in the same lookup
_MARKED = frozenset((b"host", b"transfer-encoding", b"expect"))
_COPY_BYTES = 64 * 1024  # a body up to this size is copied behind its head (one buffer); a larger one goes by writev
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection"))
# the bytes uvicorn allows in a header name and in a value: each of its two patterns is one character class, so
# deleting the allowed bytes (bytes.translate) leaves something exactly when its search would find a match, at a
# fifth of the search's cost here (0.3 us against 1.2-1.5 for a completion's ~14 headers)
_NAME_BYTES = bytes(b for b in range(256) if HEADER_RE.search(bytes((b,))) is None)
_VALUE_BYTES = bytes(b for b in range(256) if HEADER_VALUE_RE.search(bytes((b,))) is None)


class _Cycle(RequestResponseCycle):
    """uvicorn 0.54's exchange, with the response head checked in two passes over all the names and all the
    values, where uvicorn makes two regex searches per header (a completion's head has 10-16 headers). What it
    writes and refuses is uvicorn's: a name or value it rejects goes to its own `send`, which raises the same
    error; so do heads that must wait (writes paused), go nowhere (client gone) or are logged (access log on). The
    head of a sized response is held and written with the first part of its body: one write and one TCP segment
    rather than two (wrk, no policies: +8% c16 RPS, -11 us CPU a request)."""

    _held: bytes | None = None  # a plain response's head, written with its body

    async def send(self, message: Any) -> None:
        if self._held is not None and message["type"] == "http.response.body":
            await self._send_body(message)
            return
        if (message["type"] != "http.response.start" or self.response_started or self.disconnected
                or self.flow.write_paused or self.access_log):
            await super().send(message)
            return
        headers = [*self.default_headers, *message.get("headers", ())]
        names = [name.lower() for name, _ in headers]
        if (b"".join(names).translate(None, _NAME_BYTES)
                or b"".join([value for _, value in headers]).translate(None, _VALUE_BYTES)):
            await super().send(message)  # raises uvicorn's error for the offending header
            return
        self.response_started = True
        self.waiting_for_100_continue = False
        status = message["status"]
        content = [STATUS_LINE[status]]
        close = False
        for name, (_, value) in zip(names, headers, strict=True):
            if name in _FRAMING:
                if name == b"content-length":
                    if self.chunked_encoding is None:
                        self.expected_content_length = int(value.decode())
                        self.chunked_encoding = False
                elif name == b"transfer-encoding":
                    if value.lower() == b"chunked":
                        self.expected_content_length = 0
                        self.chunked_encoding = True
                elif b"close" in [token.lower().strip() for token in value.split(b",")]:  # connection
                    self.keep_alive = False
                    close = True
            content += (name, b": ", value, b"\r\n")
        if not self.keep_alive and not close:
            content.append(b"connection: close\r\n")
        if self.chunked_encoding is None and self.scope["method"] != "HEAD" and status not in (204, 304):
            self.chunked_encoding = True  # neither content-length nor transfer-encoding given
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        if self.chunked_encoding is False and self.expected_content_length and self.scope["method"] != "HEAD":
            self._held = b"".join(content)  # goes out with the body: one write, one segment
        else:
            self.transport.write(b"".join(content))

    async def _send_body(self, message: Any) -> None:
        """The first body message of a response whose head is held: both in one write. uvicorn's body step
        otherwise, its errors included."""
        held, self._held = self._held, None
        body = message.get("body", b"")
        if len(body) > self.expected_content_length or self.flow.write_paused or self.disconnected:
            if not self.disconnected:
                self.transport.write(held)
            await super().send(message)
            return
        if len(body) <= _COPY_BYTES:
            self.transport.write(held + body)
        else:  # one writev, without copying a large body
            self.transport.writelines((held, body))
        self.expected_content_length -= len(body)
        if not message.get("more_body", False):
            if self.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()


class _CloseDelimitedCycle(_Cycle):
    """An HTTP/1.0 exchange: a body of unknown length is written raw and ended by closing the connection."""

    unframed = False

    async def send(self, message: Any) -> None:
        if self.unframed and message["type"] == "http.response.body" and not self.response_complete:
            if self.flow.write_paused and not self.disconnected:
                await self.flow.drain()
            if self.disconnected:
                return
            if body := message.get("body", b""):
                self.transport.write(body)
            if not message.get("more_body", False):
                self.response_complete = True
                self.message_event.set()
                self.transport.close()
                self.on_response()
            return
        if message["type"] == "http.response.start" and not self.response_started and self._unframed(message):
            self.unframed = True
            self.chunked_encoding = False  # uvicorn adds transfer-encoding: chunked only while this is None
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"transfer-encoding"]
            message = {**message, "headers": headers}
        await super().send(message)

    def _unframed(self, message: Any) -> bool:
        if self.scope["method"] == "HEAD" or message["status"] in (204, 304):
            return False
        return all(name.lower() != b"content-length" for name, _ in message.get("headers", []))
