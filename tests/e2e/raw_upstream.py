"""A raw-socket "upstream" that answers each POST with the bytes of one scripted case, chosen by the request's
`model`: well-formed chat answers (`ok`) or broken ones (bad SSE, bad chunked framing, bad heads, stalls).

Run in a thread with its own event loop, so sync tests and benchmarks can use it beside a gateway process. GETs
(the gateway's health probes of /models) always get a small 200. Every answer ends with the connection closed
(or never, for the stalling cases, until the gateway gives up).
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tests.conftest import free_port

__all__ = ["CASES", "ENDINGS", "Case", "RawUpstream"]

Script = Callable[[str, bool], list["bytes | None"]]  # (model, stream) -> bytes to write in turn; None: stall


def _chunk(model: str, content: str | None = "hi", finish: str | None = None) -> bytes:
    """One well-formed chat.completion.chunk payload."""
    delta = {} if content is None else {"content": content}
    return json.dumps({"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": 1, "model": model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]},
                      separators=(",", ":")).encode()


def _completion(model: str) -> bytes:
    return json.dumps({"id": "chatcmpl-raw", "object": "chat.completion", "created": 1, "model": model,
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()


def _event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def _head(status: bytes = b"200 OK", kind: bytes = b"text/event-stream", framing: bytes = b"") -> bytes:
    return b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind + b"\r\nConnection: close\r\n" + framing + b"\r\n"


def _sized(body: bytes, kind: bytes) -> bytes:
    return _head(kind=kind, framing=b"Content-Length: %d\r\n" % len(body)) + body


def _chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)


_CHUNKED = b"Transfer-Encoding: chunked\r\n"


def _ok(model: str, stream: bool) -> list:
    if not stream:
        return [_sized(_completion(model), b"application/json")]
    body = _event(_chunk(model, "")) + _event(_chunk(model, "hi")) + _event(_chunk(model, None, "stop"))
    return [_sized(body + b"data: [DONE]\n\n", b"text/event-stream")]


def _sse(*events: bytes) -> Script:
    """An SSE answer whose body is `events` as they are (close-delimited), to a streamed request or not."""
    def script(model: str, stream: bool) -> list:
        return [_head(), *(e.replace(b"MODEL", model.encode()) for e in events)]
    return script


_NOISE = random.Random(13).randbytes(4096)  # binary garbage, the same on every run
GOOD = b'data: {"id":"chatcmpl-raw","object":"chat.completion.chunk","created":1,"model":"MODEL",' \
       b'"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n'


def _framed(kind: str) -> Script:
    """Chunked transfer encoding broken in one way, after one good piece (a chunk, or the body's start)."""
    def script(model: str, stream: bool) -> list:
        first = _event(_chunk(model)) if stream else _completion(model)[:20]
        mime = b"text/event-stream" if stream else b"application/json"
        head = _head(kind=mime, framing=_CHUNKED) + _chunked(first)
        tails = {
            "bad_hex": b"zz\r\n" + b"x" * 10 + b"\r\n0\r\n\r\n",
            "short": b"100\r\n" + b"x" * 10,  # 256 bytes announced, 10 sent, then the close
            "missing_crlf": b"5\r\nhelloXX5\r\nworld\r\n0\r\n\r\n",
            # the rest of an answer that never finishes: no finish_reason, no [DONE], no final 0 chunk
            "no_final": _chunked(_event(_chunk(model)) if stream else _completion(model)[20:]),
        }
        return [head + tails[kind]]
    return script


def _truncated(model: str, stream: bool) -> list:
    body = _event(_chunk(model)) + _event(_chunk(model)) if stream else _completion(model)
    kind = b"text/event-stream" if stream else b"application/json"
    cut = len(_event(_chunk(model))) + 10 if stream else len(body) // 2
    return [_head(kind=kind, framing=b"Content-Length: %d\r\n" % len(body)) + body[:cut]]


def _stall_after_first(model: str, stream: bool) -> list:
    if not stream:
        return [_head(kind=b"application/json", framing=b"Content-Length: 500\r\n") + b'{"id":', None]
    return [_head(), _event(_chunk(model)), None]


_DEEP = b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # a JSON object nested too deeply to decode


def _deep(model: str, stream: bool) -> list:
    if not stream:
        return [_sized(_DEEP, b"application/json")]
    return [_sized(b"data: " + _DEEP + b"\n\ndata: [DONE]\n\n", b"text/event-stream")]


@dataclass(frozen=True)
class Case:
    """One broken upstream answer, and what the gateway must make of it."""

    script: Script
    status: int  # a plain request's answer
    # a streamed request: an HTTP status before the stream starts, or 200 with one error event then [DONE]
    stream_status: int
    stalls: bool = False  # it waits on the gateway's upstream timeout


CASES: dict[str, Case] = {
    "sse-bad-json": Case(_sse(GOOD, b'data: {"choices": oops}\n\n', GOOD, b"data: [DONE]\n\n"), 502, 200),
    "sse-bad-json-first": Case(_sse(b"data: {not json\n\n", GOOD, b"data: [DONE]\n\n"), 502, 502),
    "sse-not-an-object": Case(_sse(GOOD, b"data: [1, 2]\n\n", b"data: [DONE]\n\n"), 502, 200),
    "sse-no-data-prefix": Case(_sse(b'{"choices": []}\n\n', b"event: x\n: comment\n\n"), 502, 502),
    "sse-cut-mid-line": Case(_sse(GOOD, b'data: {"id":"chatcmpl-raw","cho'), 502, 200),
    "sse-huge-line": Case(_sse(GOOD, b"data: " + b"a" * (3 << 20)), 502, 200),
    "sse-binary": Case(_sse(GOOD, _NOISE, b"\n\ndata: \xff\xfe\x00\n\n"), 502, 200),
    "chunked-bad-hex": Case(_framed("bad_hex"), 502, 200),
    "chunked-short": Case(_framed("short"), 502, 200),
    "chunked-missing-crlf": Case(_framed("missing_crlf"), 502, 200),
    "chunked-no-final": Case(_framed("no_final"), 502, 200),
    "bad-status-line": Case(lambda m, s: [b"HTTP/1.1 2x0 WHAT\r\nContent-Length: 2\r\n\r\n{}"], 502, 502),
    "bad-header": Case(lambda m, s: [b"HTTP/1.1 200 OK\r\nContent-Type application/json\r\n\r\n{}"], 502, 502),
    "deep-json": Case(_deep, 502, 502),
    "deep-json-midway": Case(_sse(GOOD, b"data: " + _DEEP + b"\n\n"), 502, 200),
    "not-http": Case(lambda m, s: [_NOISE[:64] + b"\r\n\r\n"], 502, 502),
    "truncated": Case(_truncated, 502, 200),
    "never-answers": Case(lambda m, s: [None], 504, 504, stalls=True),
    "headers-then-stall": Case(lambda m, s: [_head(kind=b"application/json", framing=_CHUNKED), None],
                               504, 504, stalls=True),
    "stall-mid-answer": Case(_stall_after_first, 504, 200, stalls=True),
}


def _finished_then_cut(model: str, stream: bool) -> list:
    """A whole streamed answer, every choice finished, then the connection broken mid-frame (no usage, no
    [DONE]): the answer stands."""
    pieces = _chunked(_event(_chunk(model, "")), _event(_chunk(model, "hi")), _event(_chunk(model, None, "stop")))
    return [_head(framing=_CHUNKED) + pieces + b"100\r\n" + b"x" * 10]


# well-formed answers that end oddly, by model name: what the gateway must still relay as answers
ENDINGS: dict[str, Script] = {"raw-finished-cut": _finished_then_cut}


class RawUpstream:
    """The server, on a free port: `url` is its /v1 base."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> RawUpstream:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the raw upstream did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()
        self._server.close()
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.run_until_complete(asyncio.sleep(0))
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method = head.split(b" ", 1)[0]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = json.loads(await reader.readexactly(length)) if length else {}
            if method != b"POST":
                writer.write(_sized(b'{"object":"list","data":[]}', b"application/json"))
                await writer.drain()
                return
            model = str(body.get("model"))
            case = CASES.get(model)
            script = case.script if case is not None else ENDINGS.get(model, _ok)
            for step in script(model, bool(body.get("stream"))):
                if step is None:  # stall until the gateway hangs up
                    await reader.read()
                    return
                writer.write(step)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass  # the gateway hung up (or sent what this server does not parse): nothing more to say
        finally:
            writer.close()
