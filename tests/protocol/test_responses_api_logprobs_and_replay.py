"""The Responses API's output text logprobs (`include: ["message.output_text.logprobs"]`) translated from chat
logprobs, plain and streamed, and stored Responses replayed as their event stream (protocol/responses_api.py);
every object and event checked against OpenAI's published schemas."""

from __future__ import annotations

import json

import msgspec
import pytest

from protocol.errors import BadRequest, UpstreamInvalidResponse
from protocol.openai import ChatCompletionRequest, decode_request
from protocol.responses_api import (
    ResponseShape,
    StreamTranslator,
    chat_request,
    decode_responses_request,
    input_messages,
    replay_events,
    response_of,
)
from tests.spec.openai import RESPONSES_EVENT_SCHEMAS, validate

INCLUDE = ["message.output_text.logprobs"]
TOOL = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}


def _request(**fields):
    return decode_responses_request(json.dumps({"model": "m", "input": "hi", **fields}).encode())


def _chat(**fields) -> dict:
    request, raw = _request(**fields)
    return chat_request(request, raw, input_messages(request.input))


def _token(token: str, logprob: float, top: list | None = None, raw_bytes: bool = True) -> dict:
    entry = {"token": token, "logprob": logprob, "bytes": list(token.encode()) if raw_bytes else None}
    return entry if top is None else {**entry, "top_logprobs": top}


# chat logprobs as an upstream sends them: the second token's bytes null (llama.cpp, some vLLM builds)
HELLO = _token("Hel", -0.1, [_token("Hel", -0.1), _token("He", -2.5)])
LO = _token("lo é", -0.2, [_token("lo é", -0.2, raw_bytes=False)], raw_bytes=False)
# as an output_text part holds them (OpenAI's LogProb), and as the text events carry them (ResponseLogProb)
PART = [HELLO, {**LO, "bytes": list("lo é".encode()), "top_logprobs": [_token("lo é", -0.2)]}]
EVENT = [{"token": "Hel", "logprob": -0.1, "top_logprobs": [{"token": "Hel", "logprob": -0.1},
                                                            {"token": "He", "logprob": -2.5}]},
         {"token": "lo é", "logprob": -0.2, "top_logprobs": [{"token": "lo é", "logprob": -0.2}]}]


def _completion(logprobs: dict | None, finish: str = "stop") -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "served",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello é"}, "finish_reason": finish,
                         "logprobs": logprobs}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}


def _chunk(delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
    return {"id": "c", "object": "chat.completion.chunk", "model": "served",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}


def _valid(events: list[dict]) -> list[dict]:
    events = json.loads(msgspec.json.encode(events))
    for event in events:
        validate(event, RESPONSES_EVENT_SCHEMAS[event["type"]])
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def _stream(shape: ResponseShape, chunks: list[dict]) -> tuple[list[dict], StreamTranslator]:
    translator = StreamTranslator(shape, "m")
    return _valid([e for c in chunks for e in translator.feed(c)] + translator.finish()), translator


# ---- include and top_logprobs onto the chat request ---------------------------------------------------------


def test_include_logprobs_asks_the_chat_request_for_them():
    chat = _chat(include=INCLUDE, top_logprobs=3)
    assert (chat["logprobs"], chat["top_logprobs"]) == (True, 3)
    assert "include" not in chat
    decode_request(chat, ChatCompletionRequest)
    assert _chat(include=INCLUDE)["logprobs"] is True and "top_logprobs" not in _chat(include=INCLUDE)
    # without the include nothing is asked for, top_logprobs or not
    for fields in ({}, {"top_logprobs": 5}, {"include": []}):
        assert not {"logprobs", "top_logprobs"} & set(_chat(**fields))


@pytest.mark.parametrize("include", [["no.such.field"], [*INCLUDE, "message.output_text"]])
def test_an_include_openai_does_not_define_is_a_400_naming_include(include):
    with pytest.raises(BadRequest) as caught:
        _chat(include=include)
    assert caught.value.status == 400 and caught.value.param == "include"
    assert repr(include[-1]) in caught.value.message and "message.output_text.logprobs" in caught.value.message


@pytest.mark.parametrize("include", [["reasoning.encrypted_content"], ["file_search_call.results"],
                                     ["message.input_image.image_url"]])
def test_an_include_of_data_never_translated_asks_for_nothing(include):
    chat = _chat(include=include)
    assert not {"include", "logprobs", "top_logprobs"} & set(chat)


@pytest.mark.parametrize("top", [-1, 21, "3"])
def test_top_logprobs_out_of_range_is_a_400(top):
    with pytest.raises(BadRequest) as caught:
        _request(include=INCLUDE, top_logprobs=top)
    assert caught.value.param == "top_logprobs"


# ---- chat logprobs onto output_text parts -----------------------------------------------------------------


def test_plain_answer_carries_the_logprobs_asked_for():
    request, _ = _request(include=INCLUDE, top_logprobs=2)
    response = response_of(ResponseShape(request), _completion({"content": [HELLO, LO], "refusal": None}), "m")
    validate(response, "Response")
    part = response["output"][0]["content"][0]
    assert part["logprobs"] == PART and part["text"] == "Hello é" and response["top_logprobs"] == 2
    # not asked for: the part's required list stays empty, whatever the upstream sent
    request, _ = _request()
    plain = response_of(ResponseShape(request), _completion({"content": [HELLO, LO]}), "m")
    assert plain["output"][0]["content"][0]["logprobs"] == [] and "top_logprobs" not in plain
    # asked for, but the upstream sent none: an empty list
    request, _ = _request(include=INCLUDE)
    assert response_of(ResponseShape(request), _completion(None), "m")["output"][0]["content"][0]["logprobs"] == []


def test_stream_deltas_carry_their_tokens_logprobs():
    request, _ = _request(include=INCLUDE, stream=True)
    events, translator = _stream(ResponseShape(request), [
        _chunk({"role": "assistant", "content": ""}), _chunk({"content": "Hel"}, logprobs={"content": [HELLO]}),
        _chunk({"content": "lo é"}, logprobs={"content": [LO], "refusal": None}), _chunk({}, "stop")])
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert [(d["delta"], d["logprobs"]) for d in deltas] == [("Hel", EVENT[:1]), ("lo é", EVENT[1:])]
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert done["logprobs"] == EVENT and done["text"] == "Hello é"
    part = next(e for e in events if e["type"] == "response.content_part.done")["part"]
    assert part["logprobs"] == PART
    assert next(e for e in events if e["type"] == "response.content_part.added")["part"]["logprobs"] == []
    assert translator.final["output"][0]["content"][0]["logprobs"] == PART
    # not asked for: every list stays empty
    request, _ = _request(stream=True)
    events, translator = _stream(ResponseShape(request), [
        _chunk({"content": "Hel"}, logprobs={"content": [HELLO]}), _chunk({}, "stop")])
    assert all(e["logprobs"] == [] for e in events if e["type"].startswith("response.output_text."))
    assert translator.final["output"][0]["content"][0]["logprobs"] == []


@pytest.mark.parametrize("logprobs", [{"content": "many"}, {"content": [{"token": "a"}]}, [1, 2],
                                      {"content": [{"token": "a", "logprob": "low", "bytes": None}]}])
def test_logprobs_that_cannot_be_read_are_a_502_when_asked_for(logprobs):
    request, _ = _request(include=INCLUDE)
    with pytest.raises(UpstreamInvalidResponse):
        response_of(ResponseShape(request), _completion(logprobs), "m")
    with pytest.raises(UpstreamInvalidResponse):
        StreamTranslator(ResponseShape(request), "m").feed(_chunk({"content": "a"}, logprobs=logprobs))
    request, _ = _request()  # not asked for: not read
    assert response_of(ResponseShape(request), _completion(logprobs), "m")["status"] == "completed"


# ---- stored Responses replayed as their events -----------------------------------------------------------------


def test_a_streamed_response_replays_as_the_events_that_streamed_it():
    """Each part and each call's arguments in one chunk: the replay is the stream itself, ids and all."""
    request, _ = _request(include=INCLUDE, top_logprobs=2, tools=[TOOL], user="u", metadata={"k": "v"},
                          instructions="be brief", stream=True)
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    events, translator = _stream(ResponseShape(request), [
        _chunk({"content": "Hello é"}, logprobs={"content": [HELLO, LO]}), _chunk({"tool_calls": [call]}),
        _chunk({}, "tool_calls"), {"id": "c", "model": "served", "choices": [], "usage": usage}])
    assert [e["type"] for e in events].count("response.output_item.done") == 2
    replayed = _valid(replay_events(translator.final))
    assert replayed == events
    assert replay_events(translator.final) == replayed  # the same every time: starting_after can count on it


def test_a_plain_incomplete_response_replays_with_its_ids_and_status():
    request, _ = _request(include=INCLUDE, max_output_tokens=2)
    response = response_of(ResponseShape(request), _completion({"content": [HELLO, LO]}, finish="length"), "m")
    events = _valid(replay_events(response))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.incomplete"]
    assert events[-1]["response"] == response
    assert events[0]["response"]["id"] == response["id"] and events[0]["response"]["status"] == "in_progress"
    assert events[0]["response"]["created_at"] == response["created_at"]
    assert events[-2]["item"] == response["output"][0] and events[-2]["item"]["status"] == "incomplete"
    assert (events[4]["delta"], events[4]["logprobs"]) == ("Hello é", EVENT)


def test_an_empty_answer_replays_as_its_empty_message():
    request, _ = _request()
    response = response_of(ResponseShape(request), {"choices": [{"message": {"content": None}}]}, "m")
    events = _valid(replay_events(response))
    assert events[-2]["item"] == response["output"][0] and events[-2]["item"]["content"][0]["text"] == ""
    assert "response.output_text.delta" not in [e["type"] for e in events]


def test_a_shape_read_back_from_its_response_echoes_the_same_settings():
    request, _ = _request(include=INCLUDE, top_logprobs=4, user="u", tools=[TOOL], tool_choice="required",
                          text={"format": {"type": "json_object"}}, truncation="auto", temperature=0.5)
    shape = ResponseShape(request)
    response = shape.response(status="in_progress", model="m", output=[])
    again = ResponseShape.of(response)
    assert (again.id, again.created_at, again.echo) == (shape.id, shape.created_at, shape.echo)
    assert again.response(status="in_progress", model="m", output=[]) == response
