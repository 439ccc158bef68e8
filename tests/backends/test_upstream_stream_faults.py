"""OpenAIBackend against raw sockets that answer badly: a stream whose first payload is no JSON object is an
invalid response before anything is relayed, an endless SSE line ends the stream at MAX_SSE_LINE, a long line
split into many pieces arrives whole, empty `data:` lines are skipped, and JSON nested too deeply to decode is an
invalid response, not a crash. An error object sent with a 200 (plain, or a stream's first event), a stream of
nothing but [DONE], bytes that never make a payload, and statuses no client takes (3xx, 600-999) are retryable
upstream failures; an error body of any depth, with any `code`, stays an upstream error."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from backends import openai_upstream
from backends.openai_upstream import OpenAIBackend
from config.schema import OpenAIModel
from protocol.errors import UpstreamInvalidResponse, UpstreamStatusError, UpstreamTimeout, UpstreamUnavailable
from protocol.openai import ChatCompletionRequest, decode_request
from tests.backends.raw_server import RawServer, read_request

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


# -- failures an upstream reports with a 2xx, statuses no client takes, heads and streams that never end --

ERROR = b'{"error": {"message": "overloaded", "type": "server_error", "param": null, "code": "overloaded"}}'


def sized(status: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)


async def test_a_stream_that_opens_with_an_error_event_is_a_retryable_failure() -> None:
    # before any payload reached the client: an HTTP error the pipeline can still retry elsewhere, not a 200
    async with RawServer(answering(SSE_HEAD + b"event: error\ndata: " + ERROR + b"\n\ndata: [DONE]\n\n")) as server:
        b = backend(server.url)
        with pytest.raises(UpstreamStatusError) as caught:
            await anext(b.stream(request(True)))
        assert caught.value.status == 502 and caught.value.retryable and caught.value.body() == ERROR
        await b.aclose()


async def test_an_error_object_in_a_2xx_with_a_4xx_code_is_that_refusal_not_retried() -> None:
    # vLLM puts the status in `code`: the request itself was refused, so it is relayed as that 4xx, as an upstream
    # HTTP 400 is, rather than retried on every deployment and ended as a 502
    refused = b'{"error": {"message": "too long", "type": "BadRequestError", "param": null, "code": 400}}'
    for reply, stream in ((SSE_HEAD + b"data: " + refused + b"\n\ndata: [DONE]\n\n", True),
                          (sized(b"200 OK", refused), False)):
        async with RawServer(answering(reply)) as server:
            b = backend(server.url)
            with pytest.raises(UpstreamStatusError) as caught:
                await (anext(b.stream(request(True))) if stream else b.complete(request(False)))
            assert caught.value.status == 400 and not caught.value.retryable and caught.value.body() == refused
            await b.aclose()


async def test_a_stream_of_nothing_but_done_is_a_retryable_failure() -> None:
    async with RawServer(answering(SSE_HEAD + b": ping\n\ndata: [DONE]\n\n")) as server:
        b = backend(server.url)
        with pytest.raises(UpstreamUnavailable) as caught:
            await anext(b.stream(request(True)))
        assert caught.value.code == "upstream_stream_broken" and caught.value.retryable
        await b.aclose()


async def test_bytes_without_a_payload_are_no_answer_past_the_timeout() -> None:
    """`: ping` comments kept coming faster than timeout_s, but no payload: the client (still waiting for its
    status) is answered 504 once timeout_s has passed, not held for as long as the upstream keeps pinging."""
    async def pinging(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD)
        while not writer.is_closing():  # until the gateway gives up and closes
            writer.write(b": ping\n\n")
            await writer.drain()
            await asyncio.sleep(0)  # a turn of the loop for the client, not a wait

    async with RawServer(pinging) as server:
        b = OpenAIBackend(msgspec.convert({"id": "ours", "base_url": server.url + "/v1", "timeout_s": 0.2},
                                          OpenAIModel))
        with pytest.raises(UpstreamTimeout):
            await asyncio.wait_for(anext(b.stream(request(True))), 10)
        await b.aclose()


async def test_a_payload_that_comes_after_the_deadline_in_time_is_still_the_answer() -> None:
    """The deadline judges what bytes brought, not when they came: a ping, then the payload in a piece that
    arrives past timeout_s from the head (each gap shorter than it) is relayed, not dropped for a 504."""
    async def late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD)
        for piece in (b": ping\n\n", b"data: " + chunk("hi", "stop") + b"\n\ndata: [DONE]\n\n"):
            await asyncio.sleep(0.2)  # the upstream's pace (timeout_s is 0.3): each gap 0.2 s, the payload at 0.4
            writer.write(piece)
            await writer.drain()
        writer.close()

    async with RawServer(late) as server:
        b = OpenAIBackend(msgspec.convert({"id": "ours", "base_url": server.url + "/v1", "timeout_s": 0.3},
                                          OpenAIModel))
        assert [json.loads(p)["choices"][0]["finish_reason"] async for p in b.stream(request(True))] == ["stop"]
        await b.aclose()


async def test_a_plain_answer_that_is_an_error_object_is_a_retryable_failure() -> None:
    async with RawServer(answering(sized(b"200 OK", ERROR))) as server:
        b = backend(server.url)
        with pytest.raises(UpstreamStatusError) as caught:
            await b.complete(request(False))
        assert caught.value.status == 502 and caught.value.retryable and caught.value.body() == ERROR
        await b.aclose()


@pytest.mark.parametrize("status", [b"302 Found", b"999 Made Up", b"600 Odd"])
async def test_a_status_no_client_takes_is_a_retryable_502(status: bytes) -> None:
    # 600-999 reached uvicorn's table of status lines (a KeyError: the client's connection dropped unanswered);
    # a 3xx body was read as the answer
    async with RawServer(answering(sized(status, b"moved"))) as server:
        b = backend(server.url)
        for stream in (False, True):
            with pytest.raises(UpstreamStatusError) as caught:
                await (b.complete(request(False)) if not stream else anext(b.stream(request(True))))
            error = caught.value
            assert error.status == 502 and error.retryable and status.split()[0].decode() in error.message
            assert json.loads(error.body())["error"]["code"] == "upstream_error"
        await b.aclose()


async def test_an_error_body_nested_too_deeply_is_still_an_upstream_error() -> None:
    deep_error = b'{"error":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_001
    for status, body in [(b"500 Internal Server Error", DEEP), (b"429 Too Many Requests", deep_error)]:
        async with RawServer(answering(sized(status, body))) as server:
            b = backend(server.url)
            with pytest.raises(UpstreamStatusError) as caught:  # was a RecursionError: a 500 internal_error
                await b.complete(request(False))
            assert caught.value.status == int(status[:3]) and json.loads(caught.value.body())["error"]
            await b.aclose()


async def test_an_error_code_that_is_a_number_is_kept_as_text() -> None:
    # vLLM's error objects carry the status as `code`: the usage row's error_code (text) refused it on PostgreSQL
    body = b'{"error": {"message": "too long", "type": "BadRequestError", "param": null, "code": 400}}'
    async with RawServer(answering(sized(b"400 Bad Request", body))) as server:
        b = backend(server.url)
        with pytest.raises(UpstreamStatusError) as caught:
            await b.complete(request(False))
        assert caught.value.code == "400" and caught.value.body() == body
        await b.aclose()
