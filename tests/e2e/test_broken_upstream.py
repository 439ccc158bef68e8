"""Broken upstreams through a live gateway: malformed SSE, malformed chunked encoding, bad status lines and
headers, truncated answers, upstreams that never answer or stall. Every case, plain and streamed, gets a clear
error in its format's shape (an HTTP error, or once a stream has started one error event and its end), never a
500 or a hang, and the gateway answers /health after each."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Process, start_gateway
from tests.e2e.raw_upstream import CASES, ENDINGS, RawUpstream
from tests.spec.openai import validate

TIMEOUT_S = 1  # the models' upstream timeout: the stalling cases wait this long
CLIENT_TIMEOUT_S = 30  # a hang fails the test here, far past what any case needs


def broken_config(upstream_url: str, extra: tuple[str, ...] = ("raw-ok", *ENDINGS)) -> str:
    """One model per case (the raw upstream picks its answer by the model's name), plus `extra` ones that it
    answers well."""
    models = "".join(f"""
  - id: {name}
    backend: openai
    base_url: {upstream_url}
    timeout_s: {TIMEOUT_S}
    connect_timeout_s: {TIMEOUT_S}
""" for name in [*CASES, *extra])
    # breakers that never open: each case must be answered for what it is, however often it is tried
    return f"""
models:{models}
routing: {{health_check_s: 0, retries: 0, circuit_breaker: {{failures: 100000, min_requests: 100000}}}}
"""


@pytest.fixture(scope="module")
def raw() -> Iterator[RawUpstream]:
    with RawUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(raw, tmp_path_factory) -> Iterator[Process]:
    server = start_gateway(tmp_path_factory.mktemp("broken"), broken_config(raw.url))
    yield server
    server.stop()


def ask(gateway: Process, path: str, body: dict) -> httpx.Response:
    return httpx.post(gateway.url + path, json=body, timeout=CLIENT_TIMEOUT_S)


def chat(model: str, stream: bool) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def sse_events(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n"), raw[-200:]
    return raw[:-2].split(b"\n\n")


def check_chat_stream(response: httpx.Response) -> dict:
    """A chat stream that broke after it started: well-formed chunks, one OpenAI error event, then [DONE]. Returns
    the error."""
    assert response.status_code == 200, response.text[:500]
    *chunks, error, done = sse_events(response.content)
    assert done == b"data: [DONE]"
    assert chunks, "the stream broke before its first chunk: it should have been an HTTP error"
    for event in chunks:  # nothing the upstream garbled reaches the client
        assert json.loads(event.removeprefix(b"data: "))["object"] == "chat.completion.chunk"
    body = json.loads(error.removeprefix(b"data: "))
    validate(body, "ErrorResponse")
    return body["error"]


def check_http_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text[:500]
    body = response.json()
    validate(body, "ErrorResponse")
    return body["error"]


def check_up(gateway: Process) -> None:
    assert gateway.proc.poll() is None, gateway.output()[-3000:]
    assert httpx.get(gateway.url + "/health", timeout=10).status_code == 200


def test_the_raw_upstream_serves_well_formed_answers_through_the_gateway(gateway):
    plain = ask(gateway, "/v1/chat/completions", chat("raw-ok", False))
    assert plain.status_code == 200 and plain.json()["choices"][0]["message"]["content"] == "hi"
    streamed = ask(gateway, "/v1/chat/completions", chat("raw-ok", True))
    *chunks, done = sse_events(streamed.content)
    assert done == b"data: [DONE]" and len(chunks) == 3


def test_a_stream_cut_after_every_choice_finished_is_the_answer(gateway):
    """It ended in an upstream_unavailable error event after the whole answer: the SDK raised on it."""
    streamed = ask(gateway, "/v1/chat/completions", chat("raw-finished-cut", True))
    *chunks, done = sse_events(streamed.content)
    assert done == b"data: [DONE]" and [json.loads(c.removeprefix(b"data: "))["choices"][0]["finish_reason"]
                                         for c in chunks] == [None, None, "stop"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("name", list(CASES))
def test_a_broken_upstream_gets_a_clear_error(gateway, raw, name, stream):
    case = CASES[name]
    response = ask(gateway, "/v1/chat/completions", chat(name, stream))
    expected = case.stream_status if stream else case.status
    if expected == 200:
        error = check_chat_stream(response)
    else:
        error = check_http_error(response, expected)
    assert error["type"] == "api_error" and error["code"] != "internal_error", error
    if expected == 504 or (stream and case.stalls):
        assert error["code"] == "upstream_timeout"
    check_up(gateway)


@pytest.mark.parametrize("name", ["sse-bad-json", "sse-binary", "chunked-bad-hex", "stall-mid-answer"])
def test_a_stream_broken_midway_ends_with_an_anthropic_error_event(gateway, name):
    body = {"model": name, "max_tokens": 16, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    response = ask(gateway, "/v1/messages", body)
    assert response.status_code == 200
    events = sse_events(response.content)
    kinds = [e.split(b"\n", 1)[0] for e in events]
    assert kinds[0] == b"event: message_start" and kinds[-1] == b"event: error", kinds
    error = json.loads(events[-1].split(b"data: ", 1)[1])
    assert error["type"] == "error" and error["error"]["type"] in ("api_error", "timeout_error"), error
    assert "inside the gateway" not in error["error"]["message"]
    check_up(gateway)


@pytest.mark.parametrize("name", ["sse-bad-json", "sse-binary", "chunked-bad-hex", "stall-mid-answer"])
def test_a_stream_broken_midway_ends_with_a_responses_error_event(gateway, name):
    body = {"model": name, "input": "hi", "stream": True, "store": False}
    response = ask(gateway, "/v1/responses", body)
    assert response.status_code == 200
    events = [json.loads(e.split(b"data: ", 1)[1]) for e in sse_events(response.content)]
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.failed", events
    error = events[-1]["response"]["error"]
    assert error["code"] == "server_error" and "inside the gateway" not in error["message"], error
    check_up(gateway)


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/responses"])
@pytest.mark.parametrize("name", ["bad-status-line", "sse-bad-json-first", "never-answers"])
def test_a_stream_that_never_started_is_an_http_error_in_its_format(gateway, path, name):
    body = ({"model": name, "max_tokens": 16, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            if path == "/v1/messages" else {"model": name, "input": "hi", "stream": True, "store": False})
    response = ask(gateway, path, body)
    assert response.status_code == CASES[name].stream_status
    if path == "/v1/messages":
        assert response.json()["type"] == "error"
        assert response.json()["error"]["type"] in ("api_error", "timeout_error")
    else:
        validate(response.json(), "ErrorResponse")
    check_up(gateway)


def test_the_gateway_logged_no_unhandled_error(gateway):
    """Run last in this module: every broken answer above was handled as an upstream error."""
    check_up(gateway)
    log = gateway.output()
    assert "unhandled error" not in log and "stream failed" not in log, log[-5000:]
