"""OpenAIBackend against raw sockets that answer badly: a stream whose first payload is no JSON object is an
invalid response before anything is relayed, an endless SSE line ends the stream at MAX_SSE_LINE, a long line
split into many pieces arrives whole, empty `data:` lines are skipped, and JSON nested too deeply to decode is an
invalid response, not a crash."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from backends import openai_upstream
from backends.openai_upstream import OpenAIBackend
from config.schema import OpenAIModel
from protocol.errors import UpstreamInvalidResponse
from protocol.openai import ChatCompletionRequest, decode_request
from tests.backends.test_http1 import RawServer, read_request

pytestmark = pytest.mark.asyncio(loop_scope="session")

SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
DEEP = b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"


def chunk(content: str, finish: str | None = None) -> bytes:
    return json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "ours",
                       "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]},
                      separators=(",", ":")).encode()


def answering(*pieces: bytes):
    """A handler that reads one request and writes `pieces` one by one, then closes."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
    return handler


def backend(url: str) -> OpenAIBackend:
    return OpenAIBackend(msgspec.convert({"id": "ours", "base_url": url + "/v1", "timeout_s": 5}, OpenAIModel))


def request(stream: bool):
    return decode_request({"model": "ours", "messages": [{"role": "user", "content": "hi"}], "stream": stream},
                          ChatCompletionRequest)


async def collect(b: OpenAIBackend) -> list[bytes]:
    return [payload async for payload in b.stream(request(True))]


@pytest.mark.parametrize("first", [b"{not json", b"[1, 2]", b"\xff\xfe", DEEP], ids=["bad", "array", "binary", "deep"])
async def test_a_first_payload_that_is_no_json_object_is_invalid(first: bytes) -> None:
    events = SSE_HEAD + b"data: " + first + b"\n\ndata: " + chunk("hi", "stop") + b"\n\ndata: [DONE]\n\n"
    async with RawServer(answering(events)) as server:
        b = backend(server.url)
        stream = b.stream(request(True))
        with pytest.raises(UpstreamInvalidResponse):
            await anext(stream)
        await b.aclose()


async def test_an_endless_sse_line_ends_the_stream(monkeypatch) -> None:
    monkeypatch.setattr(openai_upstream, "MAX_SSE_LINE", 100_000)
    pieces = [SSE_HEAD, b"data: " + chunk("hi") + b"\n\n", b"data: ", *[b"a" * 10_000] * 30]
    async with RawServer(answering(*pieces)) as server:
        b = backend(server.url)
        seen: list[bytes] = []
        with pytest.raises(UpstreamInvalidResponse, match="SSE line over 100000 bytes"):
            async for payload in b.stream(request(True)):
                seen.append(payload)
        assert seen == [chunk("hi")]
        await b.aclose()


async def test_a_long_line_in_many_pieces_arrives_whole() -> None:
    text = "x" * 300_000
    line = b"data: " + chunk(text, "stop") + b"\n\n"
    pieces = [SSE_HEAD, *[line[i:i + 1000] for i in range(0, len(line), 1000)], b"data: [DONE]\n\n"]
    async with RawServer(answering(*pieces)) as server:
        b = backend(server.url)
        payloads = await collect(b)
        assert [json.loads(p)["choices"][0]["delta"]["content"] for p in payloads] == [text]
        await b.aclose()


async def test_empty_data_lines_are_skipped() -> None:
    events = [b"data:\n\n", b"data: " + chunk("hi") + b"\n\n", b"data: \r\n\r\n",
              b"data: " + chunk("!", "stop") + b"\n\n"]
    async with RawServer(answering(SSE_HEAD, *events, b"data: [DONE]\n\n")) as server:
        b = backend(server.url)
        assert await collect(b) == [chunk("hi"), chunk("!", "stop")]
        await b.aclose()


async def test_a_plain_answer_nested_too_deeply_is_invalid() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(DEEP)
    async with RawServer(answering(head + DEEP)) as server:
        b = backend(server.url)
        with pytest.raises(UpstreamInvalidResponse):
            await b.complete(request(False))
        await b.aclose()
