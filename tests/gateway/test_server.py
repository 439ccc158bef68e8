"""The server protocol over raw sockets: slow clients cut off, 431 on huge heads, HTTP/1.0 streams, keep-alive."""

from __future__ import annotations

import asyncio
import http
import json
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from gateway.server import http_protocol
from gateway.websocket import WebSocketProtocol
from tests.conftest import free_port, start_gateway

HEADER_TIMEOUT = 0.5
BODY_TIMEOUT = 1.5  # roomy: a loaded 2-core machine can delay a client's next send by a good fraction of 1 s
MAX_HEADER_BYTES = 4096
CHUNKS = [b"data: %d\n\n" % i for i in range(5)]


async def app(scope, receive, send) -> None:
    """`/stream` streams CHUNKS with no content-length; `/slow-read` waits 1 s before reading; else echoes a size."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for chunk in CHUNKS:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    if scope["path"] == "/slow-read":
        await asyncio.sleep(2 * BODY_TIMEOUT)
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size, more = size + len(message.get("body", b"")), message.get("more_body", False)
    body = b"%d" % size
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def serve(**settings: float) -> Iterator[tuple[str, int]]:
    """`app` behind the guarded protocol on a free port, with uvicorn's other `settings` (e.g. timeout_keep_alive)."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        lifespan="off",
        log_level="warning",
        http=http_protocol(HEADER_TIMEOUT, BODY_TIMEOUT, MAX_HEADER_BYTES),
        **settings,
    )
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not instance.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.01)
    assert instance.started
    yield "127.0.0.1", port
    instance.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, int]]:
    yield from serve()


KEEP_ALIVE = 0.5


@pytest.fixture(scope="module")
def short_keep_alive() -> Iterator[tuple[str, int]]:
    yield from serve(timeout_keep_alive=KEEP_ALIVE)


def connect(address: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(address, timeout=timeout)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends before it closes the connection (the socket timeout bounds the wait)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_response(sock: socket.socket) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One content-length framed response off a kept-alive connection: (status line, headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += _received(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines)
    while len(body) < int(headers[b"content-length"]):
        body += _received(sock)
    return status, headers, body


def _received(sock: socket.socket) -> bytes:
    if not (chunk := sock.recv(65536)):
        raise ConnectionError("the server closed the connection before the whole response")
    return chunk


def split(raw: bytes) -> tuple[bytes, list[bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    return status, [line.lower() for line in lines], body


def test_slow_headers_are_cut_off_with_408(server):
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        raw = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert raw.startswith(b"HTTP/1.1 408 ") and b"connection: close" in raw
    assert HEADER_TIMEOUT * 0.8 <= elapsed < HEADER_TIMEOUT + 2
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"


def test_the_header_clock_does_not_restart_with_each_byte(server):
    with connect(server) as sock:
        started = time.monotonic()
        stop = threading.Event()

        def dribble() -> None:  # one byte every 50 ms, forever: never a gap near the timeout
            try:
                for byte in b"GET / HTTP/1.1\r\nX-Drip: " + b"a" * 1000:
                    if stop.wait(0.05):
                        return
                    sock.send(bytes([byte]))
            except OSError:
                return

        dripper = threading.Thread(target=dribble)
        dripper.start()
        raw = read_until_closed(sock)
        elapsed = time.monotonic() - started
        stop.set()
        dripper.join()
    assert raw.startswith(b"HTTP/1.1 408 ")
    assert elapsed < HEADER_TIMEOUT + 2


def test_an_idle_new_connection_is_closed_quietly(server):
    with connect(server) as sock:
        assert read_until_closed(sock) == b""


def test_a_stalled_body_is_cut_off_with_408(server):
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        raw = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert raw.startswith(b"HTTP/1.1 408 ")
    assert BODY_TIMEOUT * 0.8 <= elapsed < BODY_TIMEOUT + 2


def test_a_body_sent_slowly_but_steadily_is_accepted(server):
    # twenty pieces 200 ms apart: over twice the body timeout in all, but no gap near it
    with connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        for _ in range(20):
            time.sleep(0.2)
            sock.sendall(b"y" * 5)
        status, _, body = read_response(sock)
    assert status.startswith(b"HTTP/1.1 200") and body == b"100"


def test_expect_100_continue_waits_on_the_app_not_the_clock(server):
    # the app reads the body only after twice the body timeout: the client is waiting on us, not stalling
    with connect(server) as sock:
        sock.sendall(b"POST /slow-read HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(b"hello")
        status, _, body = read_response(sock)
    assert status.startswith(b"HTTP/1.1 200") and body == b"5"


@pytest.mark.parametrize("complete", [True, False], ids=["whole-head", "unfinished-head"])
def test_a_head_over_the_limit_gets_431(server, complete):
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * (2 * MAX_HEADER_BYTES) + b"\r\n"
    with connect(server) as sock:
        sock.sendall(head + b"\r\n" if complete else head)
        raw = read_until_closed(sock)
    assert raw.startswith(b"HTTP/1.1 431 ") and b"connection: close" in raw
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_header_fields_too_large"


def test_a_request_that_does_not_parse_gets_400_in_openai_shape(server):
    with connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
        raw = read_until_closed(sock)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head
    assert json.loads(body) == {"error": {"message": "Invalid HTTP request received.",
                                          "type": "invalid_request_error", "param": None,
                                          "code": "invalid_http_request"}}


def refusal(raw: bytes) -> tuple[int, dict]:
    """The status and error object of a closing refusal, checked to be OpenAI-shaped and to say it closes."""
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"connection: close" in head and b"content-type: application/json" in head
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["param"] is None
    return int(head.split(b" ", 2)[1]), error


@pytest.mark.parametrize("request_,why", [
    (b"GET / HTTP/1.1\r\n\r\n", "requires a Host"),
    (b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nok", "requires a Host"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", "more than one Host"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nhost: x\r\n\r\n", "more than one Host"),
    (b"GET / HTTP/1.0\r\nHost: x\r\nHost: y\r\n\r\n", "more than one Host"),
])
def test_a_missing_or_repeated_host_gets_400_and_close(server, request_, why):
    """RFC 9112 3.2: an HTTP/1.1 request without Host, or any request with more than one, is a 400."""
    with connect(server) as sock:
        sock.sendall(request_)
        status, error = refusal(read_until_closed(sock))
    assert status == 400 and why in error["message"] and error["code"] == "invalid_http_request"


def test_http10_needs_no_host(server):
    with connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc")
        status, _, body = split(read_until_closed(sock))
    assert status.startswith(b"HTTP/1.1 200") and body == b"3"


@pytest.mark.parametrize("codings", [[b"gzip, chunked"], [b"gzip", b"chunked"], [b"deflate,  , Chunked"]])
def test_a_transfer_coding_besides_chunked_gets_501_and_close(server, codings):
    """RFC 9112 6.1: a transfer coding the server does not understand is a 501, and the connection closes (its
    body cannot be read); llhttp passes any coding before a final chunked."""
    head = b"".join(b"Transfer-Encoding: %s\r\n" % value for value in codings)
    with connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n3\r\nabc\r\n0\r\n\r\n" + LAST)
        raw = read_until_closed(sock)
    status, error = refusal(raw)
    assert status == 501 and error["code"] == "unsupported_transfer_coding" and "not supported" in error["message"]
    assert raw.count(b"HTTP/1.1 ") == 1  # nothing after it is read


def test_chunked_twice_gets_400(server):
    with connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"
                     b"\r\n3\r\nabc\r\n0\r\n\r\n")
        assert refusal(read_until_closed(sock))[0] == 400


def test_each_request_on_a_connection_is_checked_on_its_own(server):
    """The marks on_header leaves start again with each request: a chunked request then plain ones are served,
    and a later request without Host is refused after them."""
    with connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                     b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        *served, (status, body) = sized_responses(read_until_closed(sock))
    assert served == [(b"HTTP/1.1 200 OK", b"3"), (b"HTTP/1.1 200 OK", b"0")]
    assert status.startswith(b"HTTP/1.1 400 ") and "Host" in json.loads(body)["error"]["message"]


def test_a_request_after_an_upgrade_not_taken_is_checked_too(server):
    with connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                     b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nHost: x\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        served, (status, _) = sized_responses(read_until_closed(sock))
    assert served == (b"HTTP/1.1 200 OK", b"0") and status.startswith(b"HTTP/1.1 501 ")


def sized_responses(raw: bytes) -> list[tuple[bytes, bytes]]:
    """(status line, body) of each content-length framed response in `raw`, in order."""
    out = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        length = int(dict(line.lower().split(b": ", 1) for line in lines)[b"content-length"])
        out.append((status, raw[:length]))
        raw = raw[length:]
    return out


SMUGGLED = b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n"  # answered chunked: it must never be
LAST = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("writes", [1, 3])
def test_an_upgrade_not_taken_is_plain_http_with_its_body(server, framing, writes):
    """An h2c offer with a body is served as plain HTTP/1.1 (RFC 9110 7.8): one request, one answer, the body
    read. llhttp ends an upgrade's request at its head: uvicorn answered it with no body, then parsed the body as a
    request of its own (smuggled past whatever checked the first), or dropped it and what followed it."""
    if framing == "chunked":
        body, sent = SMUGGLED, b"%x\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
        head = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    else:
        body = sent = SMUGGLED
        head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % len(SMUGGLED)
    head += b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
    parts = [head + sent + LAST] if writes == 1 else [head, sent, LAST]
    with connect(server) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for part in parts:
            sock.sendall(part)
        raw = read_until_closed(sock)
    assert b"HTTP/1.1 101" not in raw
    assert sized_responses(raw) == [(b"HTTP/1.1 200 OK", b"%d" % len(body)), (b"HTTP/1.1 200 OK", b"0")]


def test_an_upgrade_not_taken_without_a_body_answers_the_requests_after_it(server):
    """A GET offering h2c, then a request in the same read: both answered (the second was dropped)."""
    with connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                     b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc" + LAST)
        raw = read_until_closed(sock)
    assert [answer for _, answer in sized_responses(raw)] == [b"0", b"3", b"0"]


def test_an_upgrade_with_framing_only_an_upgrade_lets_pass_is_a_400(server):
    """llhttp takes Transfer-Encoding identity or gzip on an upgrade's head; the plain parser refused it inside the
    upgrade handler: an uncaught error, a traceback and no answer."""
    with connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\nConnection: Upgrade\r\n"
                     b"Upgrade: h2c\r\n\r\n")
        raw = read_until_closed(sock)
    (line, body), = sized_responses(raw)
    assert line == b"HTTP/1.1 400 Bad Request" and b"invalid_http_request" in body


def test_many_upgrades_not_taken_in_one_read_are_all_answered(server):
    """Each one recursed once into data_received: 2,000 in one write were a RecursionError, no answer at all and
    thousands of traceback lines."""
    requests = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n" * 2000
    with connect(server) as sock:
        sock.sendall(requests + LAST)
        raw = read_until_closed(sock)
    assert len(sized_responses(raw)) == 2001


@pytest.fixture(scope="module")
def ws_server() -> Iterator[tuple[str, int]]:
    yield from serve(ws=WebSocketProtocol)


WS_HEAD = (b"Host: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")


@pytest.mark.parametrize(("request_", "status", "reason"), [
    (b"GET /ws HTTP/1.1\r\n" + WS_HEAD + b"Content-Length: 5\r\n\r\nhello", 400, "unsupported request body"),
    (b"GET /ws HTTP/1.1\r\n" + WS_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 400,
     "transfer codings aren't supported"),
    (b"GET /ws HTTP/1.1\r\n" + WS_HEAD + b"X-A: b\r\n" * 130 + b"\r\n", 431, "no more than 128 headers"),
    # the protocol's own checks (RFC 9112), before any handover
    (b"GET /ws HTTP/1.1\r\n" + WS_HEAD.replace(b"Host: x\r\n", b"") + b"\r\n", 400, "requires a Host"),
    (b"GET /ws HTTP/1.1\r\n" + WS_HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501,
     "not supported"),
])
def test_a_websocket_upgrade_websockets_cannot_read_is_refused_and_closed(ws_server, request_, status, reason):
    """websockets refuses such a handshake and queues a reply or an EOF that uvicorn never writes: the connection
    hung, unanswered and with no clock running (the HTTP protocol stops its own when it hands over)."""
    with connect(ws_server) as sock:
        sock.sendall(request_)
        raw = read_until_closed(sock)
    (line, body), = sized_responses(raw)
    assert line == b"HTTP/1.1 %d %s" % (status, http.HTTPStatus(status).phrase.encode())
    assert b"connection: close" in raw and b"content-type: application/json" in raw
    assert reason in json.loads(body)["error"]["message"]


def test_a_head_under_the_limit_with_a_large_body_is_served(server):
    # one read holds more than the limit, but most of it is body
    body = b"z" * (4 * MAX_HEADER_BYTES)
    head = b"POST / HTTP/1.1\r\nHost: x\r\nX-Fill: " + b"f" * (MAX_HEADER_BYTES - 200) + b"\r\n"
    with connect(server) as sock:
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        status, _, answer = read_response(sock)
    assert status.startswith(b"HTTP/1.1 200") and answer == b"%d" % len(body)


def test_http10_stream_is_close_delimited(server):
    with connect(server) as sock:
        sock.sendall(b"GET /stream HTTP/1.0\r\n\r\n")
        status, headers, body = split(read_until_closed(sock))
    assert status.startswith(b"HTTP/1.1 200")
    assert not any(h.startswith(b"transfer-encoding") or h.startswith(b"content-length") for h in headers)
    assert b"connection: close" in headers
    assert body == b"".join(CHUNKS)


def test_http11_stream_stays_chunked(server):
    with connect(server) as sock:
        sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, body = split(read_until_closed(sock))
    assert b"transfer-encoding: chunked" in headers
    assert body == b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in CHUNKS) + b"0\r\n\r\n"


def test_http10_sized_reply_is_unchanged(server):
    with connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc")
        status, headers, body = split(read_until_closed(sock))
    assert status.startswith(b"HTTP/1.1 200") and b"content-length: 1" in headers and body == b"3"


def test_keep_alive_reuses_the_connection_past_the_timeouts(server):
    with connect(server) as sock:
        for i in range(3):
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (i, b"k" * i))
            status, headers, body = read_response(sock)
            assert status.startswith(b"HTTP/1.1 200") and body == b"%d" % i and b"connection" not in headers
        # idle between requests longer than both timeouts: only the keep-alive timeout (5 s) applies
        sock.settimeout(HEADER_TIMEOUT + BODY_TIMEOUT + 0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        sock.settimeout(5)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[2] == b"0"


def test_an_idle_kept_alive_connection_is_closed_after_the_keep_alive_timeout(short_keep_alive):
    with connect(short_keep_alive) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[2] == b"0"
        answered = time.monotonic()
        assert read_until_closed(sock) == b""  # closed quietly, as uvicorn closes an expired keep-alive
        assert time.monotonic() - answered >= KEEP_ALIVE - 0.05


def test_each_response_starts_the_keep_alive_timeout_again(short_keep_alive):
    with connect(short_keep_alive) as sock:
        started = time.monotonic()
        for i in range(6):  # 6 x 0.2 s idle: well past the keep-alive timeout in all, never in one gap
            sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (i, b"k" * i))
            assert read_response(sock)[2] == b"%d" % i
            sock.settimeout(KEEP_ALIVE * 0.4)
            with pytest.raises(TimeoutError):  # nothing arrives, and the connection stays open (recv would give b"")
                sock.recv(1)
            sock.settimeout(5)
        assert time.monotonic() - started > 2 * KEEP_ALIVE


def test_a_request_answered_slower_than_the_keep_alive_is_not_cut_off(short_keep_alive):
    with connect(short_keep_alive) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # a first response arms the keep-alive clock
        assert read_response(sock)[2] == b"0"
        sock.sendall(b"POST /slow-read HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok")  # 3 s in the app
        assert read_response(sock)[2] == b"2"
        assert read_until_closed(sock) == b""  # then idle again: closed


def test_many_dribbling_connections_are_all_closed(server):
    socks = [connect(server) for _ in range(50)]
    try:
        for sock in socks:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        started, open_ = time.monotonic(), set(socks)
        while open_ and time.monotonic() - started < HEADER_TIMEOUT + 5:
            readable, _, _ = select.select(list(open_), [], [], 1)
            for sock in readable:
                if not sock.recv(65536):
                    open_.discard(sock)
        assert not open_, f"{len(open_)} of 50 still open"
        with connect(server) as sock:  # and the server still serves
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock)[0].startswith(b"HTTP/1.1 200")
    finally:
        for sock in socks:
            sock.close()


def test_pointsman_serve_applies_the_server_settings(upstream, tmp_path):
    # two workers: the settings must reach the spawned worker processes too
    config = f"""
server: {{workers: 2, header_timeout_s: 0.5, body_timeout_s: 0.5, max_header_bytes: 2048}}
models:
  - id: remote-a
    backend: openai
    base_url: {upstream.url}
    upstream_model: mock-model
"""
    gateway = start_gateway(tmp_path, config)
    address = ("127.0.0.1", gateway.port)
    try:
        with connect(address) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")
        with connect(address) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 4096 + b"\r\n\r\n")
            assert read_until_closed(sock).startswith(b"HTTP/1.1 431 ")
        body = json.dumps({"model": "remote-a", "stream": True, "messages": [{"role": "user", "content": "a b c"}]})
        with connect(address, timeout=30) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body.encode())
            )
            status, headers, raw = split(read_until_closed(sock))
        assert status.startswith(b"HTTP/1.1 200") and b"connection: close" in headers
        assert not any(h.startswith(b"transfer-encoding") for h in headers)
        events = [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]"
        text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
        assert text == "echo: a b c"
    finally:
        gateway.stop()


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writelines(self, data) -> None:  # one writev
        self.written.append(b"".join(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def _exchange(cycle_class: type, messages: list[dict], method: str = "GET", keep_alive: bool = True):
    """What a cycle of `cycle_class` writes and decides for one response's messages (or the error it raises): the
    bytes it wrote, joined, then its state; the number of writes is returned apart (it may differ)."""
    from uvicorn.protocols.http.flow_control import FlowControl

    transport = _Transport()
    done: list[bool] = []
    cycle = cycle_class(
        scope={"method": method, "http_version": "1.1"}, transport=transport, flow=FlowControl(transport),
        logger=None, access_logger=None, access_log=False, default_headers=[(b"server", b"uvicorn")],
        message_event=asyncio.Event(), expect_100_continue=False, keep_alive=keep_alive,
        on_response=lambda: done.append(True))

    async def send_all() -> None:
        for message in messages:
            await cycle.send(message)

    try:
        asyncio.run(send_all())
    except RuntimeError as exc:
        return ("error", str(exc), b"".join(transport.written)), len(transport.written)
    state = (b"".join(transport.written), cycle.keep_alive, cycle.chunked_encoding, cycle.expected_content_length,
             cycle.response_started, cycle.response_complete, transport.closed, done)
    return state, len(transport.written)


def _body(body: bytes = b"", more: bool = False) -> dict:
    return {"type": "http.response.body", "body": body, "more_body": more}


@pytest.mark.parametrize("message,method,keep_alive,bodies", [
    ({"type": "http.response.start", "status": 200, "headers": [(b"Content-Type", b"application/json"),
                                                                (b"content-length", b"12"), (b"X-A", b"1")]},
     "GET", True, [_body(b"hello world!")]),
    ({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"12")]},
     "GET", True, [_body(b"hello ", more=True), _body(b"world!")]),  # a sized body in parts
    ({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"70000")]},
     "GET", True, [_body(b"x" * 70000)]),  # written without a copy
    ({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"12")]},
     "GET", True, [_body(b"hello")]),  # shorter than its length: uvicorn's error
    ({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]},
     "GET", True, [_body(b"hello")]),  # longer than its length: uvicorn's error
    ({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}, "GET",
     True, [_body(b"data: 1\n\n", more=True), _body()]),  # no length: chunked
    ({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]}, "HEAD", True,
     [_body()]),
    ({"type": "http.response.start", "status": 204, "headers": []}, "GET", True, [_body()]),
    ({"type": "http.response.start", "status": 200, "headers": [(b"transfer-encoding", b"Chunked")]}, "GET", True,
     [_body(b"abc")]),
    ({"type": "http.response.start", "status": 200, "headers": [(b"transfer-encoding", b"gzip"),
                                                                (b"content-length", b"3")]}, "GET", True,
     [_body(b"abc")]),
    ({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"3"),
                                                                (b"content-length", b"9")]}, "GET", True,
     [_body(b"abc")]),
    ({"type": "http.response.start", "status": 200, "headers": [(b"Connection", b"keep-alive, Close"),
                                                                (b"content-length", b"2")]}, "GET", True,
     [_body(b"ok")]),
    ({"type": "http.response.start", "status": 500, "headers": [(b"content-length", b"0")]}, "GET", False,
     [_body()]),
    ({"type": "http.response.start", "status": 500, "headers": [(b"content-length", b"4")]}, "GET", False,
     [_body(b"oops")]),
    ({"type": "http.response.start", "status": 200, "headers": [(b"bad name", b"x")]}, "GET", True, []),
    ({"type": "http.response.start", "status": 200, "headers": [(b"x-ok", b"a\r\nb")]}, "GET", True, []),
    ({"type": "http.response.body", "body": b"x"}, "GET", True, []),  # before the start: uvicorn's own error
])
def test_responses_are_written_as_uvicorn_writes_them(message, method, keep_alive, bodies):
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    from gateway.server import _Cycle

    ours, _ = _exchange(_Cycle, [message, *bodies], method, keep_alive)
    assert ours == _exchange(RequestResponseCycle, [message, *bodies], method, keep_alive)[0]
    assert ours[0] != "error" or "header" in ours[1] or "Expected" in ours[1] or "Content-Length" in ours[1]


def test_a_sized_response_goes_out_in_one_write():
    """Head and body in one write: one TCP segment and one wakeup for the client, not two (+8% c16 RPS, wrk)."""
    from gateway.server import _Cycle

    start = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    (written, *_), writes = _exchange(_Cycle, [start, _body(b"{}")])
    assert writes == 1 and written.endswith(b"\r\n\r\n{}")
    (written, *_), writes = _exchange(_Cycle, [start, _body(b"{", more=True), _body(b"}")])
    assert writes == 2 and written.endswith(b"\r\n\r\n{}")  # the head goes with the first part


def test_the_head_check_finds_what_uvicorns_patterns_find():
    """The allowed-byte sets are read off uvicorn's patterns one byte at a time: right only while each pattern is
    one character class, which this checks on every byte and on mixed strings."""
    import random

    from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE

    from gateway.server import _NAME_BYTES, _VALUE_BYTES

    rng = random.Random(7)
    samples = [bytes((b,)) for b in range(256)]
    samples += [b"x-request-id", b"content-type", b"bad name", b"a\r\nb", b"Thu, 26 Nov 2026 23:00:00 GMT", b""]
    samples += [bytes(rng.choice(b"abc-XYZ09 :;\t\r\n\x00\x7f\xe9") for _ in range(rng.randint(1, 40)))
                for _ in range(2000)]
    for sample in samples:
        assert bool(sample.translate(None, _NAME_BYTES)) == bool(HEADER_RE.search(sample)), sample
        assert bool(sample.translate(None, _VALUE_BYTES)) == bool(HEADER_VALUE_RE.search(sample)), sample


def test_a_host_trailer_does_not_excuse_the_next_request_from_host(server):
    """A chunked body's trailers reach on_header too: one named Host counted for the next request's head."""
    with connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n0\r\nHost: y\r\n\r\n"   # a trailer named Host
                     b"GET / HTTP/1.1\r\n\r\n"             # no Host at all: RFC 9112 3.2 says 400
                     + LAST)                               # closes the connection either way
        first, (status, body), *_ = sized_responses(read_until_closed(sock))
    assert first == (b"HTTP/1.1 200 OK", b"3")
    assert status.startswith(b"HTTP/1.1 400 "), (status, body)


def test_a_hostless_request_after_a_chunked_one_is_refused(server):
    with connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n0\r\n\r\n"
                     b"GET / HTTP/1.1\r\n\r\n")
        first, (status, body) = sized_responses(read_until_closed(sock))
    assert first == (b"HTTP/1.1 200 OK", b"3")
    assert status.startswith(b"HTTP/1.1 400 ")
