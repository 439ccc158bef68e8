"""Hypothesis fuzzing of each wire format's request decoding, in process: near-valid bodies and raw bytes either
decode into a request the gateway can forward, or raise its typed 400, never anything else."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.anthropic import decode_count_tokens, decode_messages, error_body, to_chat
from protocol.errors import GatewayError
from protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    ParsedRequest,
    decode_object,
    decode_request,
)
from protocol.responses_api import chat_request, decode_responses_request, input_messages, routing_request
from tests.gateway.wire_bodies import BASES, body_bytes, raw_bytes, slots

SWEEP = [None, True, 0, -1, 1.5, 2**64, "", "x", "\ud800", [], [1], ["x"], [{}], {}, {"type": "text"}]
DROP = object()


def chat(data: bytes) -> list[ParsedRequest]:
    return [decode_request(data, ChatCompletionRequest)]


def completions(data: bytes) -> list[ParsedRequest]:
    return [decode_request(data, CompletionRequest)]


def websocket(data: bytes) -> list[ParsedRequest]:
    """A /v1/chat/completions/ws message: a chat body, streamed whatever it says."""
    raw = decode_object(data)
    raw["stream"] = True
    return [decode_request(raw, ChatCompletionRequest)]


def responses(data: bytes) -> list[ParsedRequest]:
    """Both of the Responses API's edges: translated onto chat completions, and relayed natively."""
    body, raw = decode_responses_request(data)
    translated = decode_request(chat_request(body, raw, input_messages(body.input)), ChatCompletionRequest)
    return [translated, decode_request(routing_request(body, raw), ChatCompletionRequest)]


def messages(data: bytes) -> list[ParsedRequest]:
    body, raw = decode_messages(data)
    return [decode_request(to_chat(body, raw), ChatCompletionRequest)]


def count_tokens(data: bytes) -> list[ParsedRequest]:
    body, raw = decode_count_tokens(data)
    return [decode_request(to_chat(body, raw), ChatCompletionRequest)]


# each decoder, with the format whose bodies it is fed
DECODERS: dict[str, tuple[str, Callable[[bytes], list[ParsedRequest]]]] = {
    "chat": ("chat", chat),
    "websocket": ("chat", websocket),
    "completions": ("completions", completions),
    "responses": ("responses", responses),
    "messages": ("messages", messages),
    "count_tokens": ("messages", count_tokens),
}
FUZZ = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
RAW = settings(FUZZ, max_examples=50)  # raw bytes mostly fail at the first byte: fewer tell as much


def check(decode: Callable[[bytes], list[ParsedRequest]], data: bytes) -> None:
    """The contract: requests the gateway can forward (their raw body encodes), or a typed 400 whose body renders
    in both error shapes."""
    try:
        parsed = decode(data)
    except GatewayError as exc:
        assert exc.status == 400, (exc.status, exc.message)
        error = msgspec.json.decode(exc.body())["error"]
        assert isinstance(error["message"], str) and error["type"] == "invalid_request_error"
        assert msgspec.json.decode(error_body(exc.status, exc.message))["error"]["type"] == "invalid_request_error"
        return
    for request in parsed:
        assert isinstance(request, ParsedRequest)
        msgspec.json.encode(request.raw)  # what an upstream is sent


@pytest.mark.parametrize("name", list(DECODERS))
def test_near_valid_bodies_decode_or_are_a_400(name):
    fmt, decode = DECODERS[name]

    @FUZZ
    @given(data=body_bytes(fmt))
    def run(data: bytes) -> None:
        check(decode, data)

    run()


@pytest.mark.parametrize("name", list(DECODERS))
def test_raw_bytes_decode_or_are_a_400(name):
    fmt, decode = DECODERS[name]

    @RAW
    @given(data=st.one_of(raw_bytes(fmt), st.binary(max_size=64)))
    def run(data: bytes) -> None:
        check(decode, data)

    run()


@pytest.mark.parametrize("name", list(DECODERS))
def test_every_field_with_every_wrong_type_or_dropped(name):
    """The systematic complement of the random search: each value of each base body, in turn, replaced by a value
    of every JSON type (and a lone surrogate, and 2**64), or dropped."""
    fmt, decode = DECODERS[name]
    tried = 0
    for base in BASES[fmt]:
        base = {**base, "model": "m"}
        for i in range(len(slots(base, []))):
            for value in [*SWEEP, DROP]:
                body = copy.deepcopy(base)
                parent, key = slots(body, [])[i]
                if value is DROP:
                    del parent[key]
                else:
                    parent[key] = copy.deepcopy(value)
                check(decode, json.dumps(body).encode())
                tried += 1
    assert tried > 100


@pytest.mark.parametrize("name", list(DECODERS))
def test_the_valid_bases_decode(name):
    """The strategies start from valid bodies: each base decodes as it is (so the fuzzing is near the target)."""
    fmt, decode = DECODERS[name]
    for base in BASES[fmt]:
        assert decode(msgspec.json.encode({**base, "model": "m"}))
