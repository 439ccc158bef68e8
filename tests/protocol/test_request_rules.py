"""Request rules OpenAI enforces that decode_request and the routing errors follow: `stream_options` only on a
stream, and a too-long prompt's error naming the field that holds the prompt."""

from __future__ import annotations

import asyncio

import pytest

from config.loader import parse_config
from gateway.service import Gateway
from protocol.errors import BadRequest
from protocol.openai import ChatCompletionRequest, CompletionRequest, decode_request

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}
BODIES = [(CHAT, ChatCompletionRequest), (COMPLETION, CompletionRequest)]


@pytest.mark.parametrize("body,kind", BODIES)
@pytest.mark.parametrize("stream", [{}, {"stream": False}])
@pytest.mark.parametrize("options", [{"include_usage": True}, {"include_usage": False}, {}])
def test_stream_options_without_a_stream_is_a_400(body, kind, stream, options):
    with pytest.raises(BadRequest) as caught:
        decode_request({**body, **stream, "stream_options": options}, kind)
    error = caught.value.payload()["error"]
    assert error == {"message": "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                     "type": "invalid_request_error", "param": "stream_options", "code": None}


@pytest.mark.parametrize("body,kind", BODIES)
def test_stream_options_null_or_on_a_stream_is_accepted(body, kind):
    assert decode_request({**body, "stream_options": None}, kind).include_usage is False
    assert decode_request({**body, "stream": False, "stream_options": None}, kind).body.stream is False
    streamed = decode_request({**body, "stream": True, "stream_options": {"include_usage": True}}, kind)
    assert streamed.include_usage is True


def test_a_prompt_too_long_for_every_model_names_its_field():
    """/v1/completions names `prompt`, as OpenAI does; chat completions `messages`."""
    gateway = Gateway(parse_config(
        "models: [{id: m, backend: openai, base_url: 'http://127.0.0.1:9/v1', context_window: 64}]"))
    long = "word " * 400
    for raw, kind, param in [({**CHAT, "messages": [{"role": "user", "content": long}]}, ChatCompletionRequest,
                              "messages"), ({**COMPLETION, "prompt": long}, CompletionRequest, "prompt")]:
        request = decode_request(raw, kind)
        decision = asyncio.run(gateway.decide(request))
        error = gateway.nothing_to_try(decision, request)
        assert isinstance(error, BadRequest) and error.code == "context_length_exceeded"
        assert error.param == param and "m: context window 64 too small" in error.message
        assert request.prompt_param == param
