"""Upstream chat answers that the Responses and Anthropic translations used to lose or misreport: refusals, tool
calls cut off by the token limit, content sent as a list of parts, and fields of the wrong type (a 502, never an
empty answer or a 500). Checked against OpenAI's published schemas and the `anthropic` SDK's types."""

from __future__ import annotations

import json

import msgspec
import pytest
from anthropic.types import Message

from protocol.anthropic import MessagesDialect, StreamTranslator, message_from_chat
from protocol.errors import UpstreamInvalidResponse
from protocol.responses_api import ResponseShape, decode_responses_request, response_of
from protocol.responses_api import StreamTranslator as ResponsesStream
from tests.spec.openai import RESPONSES_EVENT_SCHEMAS, validate

# the refusal events are not among the extracted schemas: their shape as OpenAI's spec (and SDK) defines them
REFUSAL_EVENTS = {"response.refusal.delta": "delta", "response.refusal.done": "refusal"}
CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"text": "the wea'}}


def _completion(message: dict, finish: str | None = "stop") -> dict:
    return {"id": "chatcmpl-t", "object": "chat.completion", "created": 1, "model": "up",
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}}


def _chunks(*deltas: dict, finish: str = "stop") -> list[dict]:
    chunk = {"id": "chatcmpl-t", "object": "chat.completion.chunk", "created": 1, "model": "up"}
    return [*({**chunk, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas),
            {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}]


def _response(completion: dict) -> dict:
    request, _ = decode_responses_request(b'{"model": "m", "input": "hi"}')
    response = response_of(ResponseShape(request), completion, "m")
    validate(response, "Response")
    return response


def _response_events(chunks: list[dict]) -> list[dict]:
    request, _ = decode_responses_request(b'{"model": "m", "input": "hi", "stream": true}')
    translator = ResponsesStream(ResponseShape(request), "m")
    events = [e for chunk in chunks for e in translator.feed(chunk)] + translator.finish()
    for event in events:
        if event["type"] in REFUSAL_EVENTS:
            fields = {"type", "item_id", "output_index", "content_index", "sequence_number",
                      REFUSAL_EVENTS[event["type"]]}
            assert set(event) == fields and isinstance(event[REFUSAL_EVENTS[event["type"]]], str)
        else:
            validate(event, RESPONSES_EVENT_SCHEMAS[event["type"]])
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def _message(completion: dict) -> dict:
    answer = json.loads(MessagesDialect("m").plain(msgspec.json.encode(completion)))
    Message.model_validate(answer)
    return answer


def _streamed_message(chunks: list[dict]) -> tuple[list[dict], dict]:
    """The frames' data, and the message_delta's delta."""
    translator = StreamTranslator(model="m")
    raw = b"".join(translator.feed(msgspec.json.encode(c)) for c in chunks) + translator.close()
    frames = [json.loads(f.split(b"\ndata: ", 1)[1]) for f in raw.split(b"\n\n") if f]
    return frames, next(f["delta"] for f in frames if f["type"] == "message_delta")


# ---- F2: refusals ------------------------------------------------------------------------------------------


def test_a_refusal_is_a_refusal_part_of_the_response():
    response = _response(_completion({"content": None, "refusal": "I can't help with that."}))
    assert response["output"][0]["content"] == [{"type": "refusal", "refusal": "I can't help with that."}]


def test_a_streamed_refusal_has_its_refusal_events():
    events = _response_events(_chunks({"role": "assistant", "content": ""}, {"refusal": "I can't "},
                                      {"refusal": "help."}))
    kinds = [e["type"] for e in events]
    assert kinds[2:] == ["response.output_item.added", "response.content_part.added", "response.refusal.delta",
                         "response.refusal.delta", "response.refusal.done", "response.content_part.done",
                         "response.output_item.done", "response.completed"]
    assert events[3]["part"] == {"type": "refusal", "refusal": ""}
    assert events[6]["refusal"] == "I can't help." and events[6]["content_index"] == 0
    final = events[-1]["response"]["output"]
    assert final[0]["content"] == [{"type": "refusal", "refusal": "I can't help."}]


def test_a_refusal_is_the_text_of_an_anthropic_answer():
    answer = _message(_completion({"content": None, "refusal": "I can't help with that."}))
    assert answer["content"] == [{"type": "text", "text": "I can't help with that."}]
    assert answer["stop_reason"] == "refusal"
    frames, delta = _streamed_message(_chunks({"refusal": "I can't "}, {"refusal": "help."}))
    assert "".join(f["delta"]["text"] for f in frames if f["type"] == "content_block_delta") == "I can't help."
    assert delta["stop_reason"] == "refusal"


# ---- F3: a tool call cut off by the token limit --------------------------------------------------------------


def test_a_truncated_tool_call_is_max_tokens_for_anthropic():
    answer = _message(_completion({"content": None, "tool_calls": [CALL]}, "length"))
    assert answer["stop_reason"] == "max_tokens"
    _, delta = _streamed_message(_chunks({"tool_calls": [{"index": 0, **CALL}]}, finish="length"))
    assert delta["stop_reason"] == "max_tokens"


def test_a_truncated_function_call_is_incomplete():
    done = {**CALL, "id": "call_0", "function": {"name": "lookup", "arguments": '{"text": "a"}'}}
    response = _response(_completion({"content": None, "tool_calls": [done, CALL]}, "length"))
    assert response["status"] == "incomplete"
    assert [(o["status"], o["arguments"]) for o in response["output"]] == [
        ("completed", '{"text": "a"}'), ("incomplete", '{"text": "the wea')]
    events = _response_events(_chunks({"tool_calls": [{"index": 0, **done}]}, {"tool_calls": [{"index": 1, **CALL}]},
                                      finish="length"))
    assert events[-1]["type"] == "response.incomplete"
    assert [o["status"] for o in events[-1]["response"]["output"]] == ["completed", "incomplete"]
    assert [e["item"]["status"] for e in events if e["type"] == "response.output_item.done"] == [
        "completed", "incomplete"]


# ---- F4: content as a list of parts ----------------------------------------------------------------------------

PARTS = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world."}]


def test_content_parts_are_one_text():
    response = _response(_completion({"content": PARTS}))
    assert response["output"][0]["content"][0]["text"] == "Hello, world."
    events = _response_events(_chunks({"content": PARTS[:1]}, {"content": PARTS[1:]}))
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Hello, world."
    assert _message(_completion({"content": PARTS}))["content"] == [{"type": "text", "text": "Hello, world."}]
    frames, _ = _streamed_message(_chunks({"content": PARTS}))
    assert [f["delta"]["text"] for f in frames if f["type"] == "content_block_delta"] == ["Hello, world."]


# ---- F5: fields of the wrong type --------------------------------------------------------------------------------

ODD = {
    "finish_reason int": {"choices": [{"index": 0, "message": {"content": "the answer"}, "finish_reason": 5}]},
    "choices [1]": {"choices": [1]},
    "message a string": {"choices": [{"index": 0, "message": "hi", "finish_reason": "stop"}]},
    "content a number": {"choices": [{"index": 0, "message": {"content": 5}, "finish_reason": "stop"}]},
}


@pytest.mark.parametrize("body", ODD.values(), ids=ODD.keys())
def test_an_answer_of_the_wrong_types_cannot_be_read(body):
    with pytest.raises(UpstreamInvalidResponse):
        _response({"id": "x", "model": "up", **body})
    with pytest.raises(UpstreamInvalidResponse):
        _message({"id": "x", "model": "up", **body})


def test_an_anthropic_answer_with_an_id_of_the_wrong_type_cannot_be_read():
    with pytest.raises(UpstreamInvalidResponse):
        _message({**_completion({"content": "the answer"}), "id": 5})


def test_a_chunk_of_the_wrong_types_cannot_be_read():
    chunk = {"id": "c", "model": "up", "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": 5}]}
    request, _ = decode_responses_request(b'{"model": "m", "input": "hi", "stream": true}')
    with pytest.raises(UpstreamInvalidResponse):
        ResponsesStream(ResponseShape(request), "m").feed(chunk)
    with pytest.raises(UpstreamInvalidResponse):
        StreamTranslator(model="m").feed(msgspec.json.encode(chunk))


def test_arguments_sent_as_an_object_are_taken():
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": {"text": "a"}}}
    response = _response(_completion({"content": None, "tool_calls": [call]}, "tool_calls"))
    assert json.loads(response["output"][0]["arguments"]) == {"text": "a"}
    events = _response_events(_chunks({"tool_calls": [{"index": 0, **call}]}, finish="tool_calls"))
    assert json.loads(events[-1]["response"]["output"][0]["arguments"]) == {"text": "a"}
    answer = message_from_chat(msgspec.json.encode(_completion({"content": None, "tool_calls": [call]},
                                                               "tool_calls")))
    assert answer.content[0].input == {"text": "a"}  # type: ignore[union-attr]
    frames, _ = _streamed_message(_chunks({"tool_calls": [{"index": 0, **call}]}, finish="tool_calls"))
    pieces = [f["delta"]["partial_json"] for f in frames if f["type"] == "content_block_delta"]
    assert json.loads("".join(pieces)) == {"text": "a"}
