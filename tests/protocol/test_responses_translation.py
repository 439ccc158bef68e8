"""The Responses API's translation onto chat completions and back (protocol/responses_api.py), checked against
OpenAI's published schemas."""

from __future__ import annotations

import json

import msgspec
import pytest

from protocol.errors import BadRequest, UpstreamUnavailable
from protocol.openai import ChatCompletionRequest, decode_request
from protocol.responses_api import (
    ResponseShape,
    StreamTranslator,
    chat_request,
    decode_responses_request,
    input_messages,
    output_items,
    response_of,
    response_usage,
    routing_request,
)
from tests.spec.openai import RESPONSES_EVENT_SCHEMAS, validate

TOOL = {"type": "function", "name": "lookup", "description": "Look it up",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}, "strict": False}


def _decode(body: dict):
    return decode_responses_request(json.dumps(body).encode())


def _chat(body: dict, history: list | None = None) -> dict:
    request, raw = _decode(body)
    return chat_request(request, raw, [*(history or []), *input_messages(request.input)])


def test_string_input_with_instructions_and_sampling():
    chat = _chat({"model": "m", "input": "hi", "instructions": "Be brief.", "max_output_tokens": 20,
                  "temperature": 0.2, "top_p": 0.9, "user": "u1", "metadata": {"k": "v"}, "store": False,
                  "include": ["message.output_text.logprobs"], "truncation": "auto", "top_k": 5, "models": ["a"]})
    assert chat["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert (chat["model"], chat["max_completion_tokens"], chat["temperature"], chat["top_p"], chat["user"]) == (
        "m", 20, 0.2, 0.9, "u1")
    # Responses-only fields stay here; everything else (vendor extras, the gateway's routing fields) goes on
    assert not {"metadata", "store", "include", "truncation", "input", "instructions"} & set(chat)
    assert chat["top_k"] == 5 and chat["models"] == ["a"]
    assert "stream" not in chat and "tools" not in chat and "response_format" not in chat
    decode_request(chat, ChatCompletionRequest)  # a valid chat request


def test_items_become_chat_messages():
    items = [
        {"role": "developer", "content": "rules"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "look "},
                                                        {"type": "input_text", "text": "this up"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sure.",
                                                              "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": '{"text": "a"}'},
        {"type": "function_call", "call_id": "c2", "name": "lookup", "arguments": '{"text": "b"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "A"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "B"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "and?"},
                                     {"type": "input_image", "image_url": "https://x/i.png"}]},
    ]
    assert input_messages(items) == [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "look this up"},
        {"role": "assistant", "content": "Sure.", "tool_calls": [  # one turn's text and calls: one message
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"text": "a"}'}},
            {"id": "c2", "type": "function", "function": {"name": "lookup", "arguments": '{"text": "b"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "A"},
        {"role": "tool", "tool_call_id": "c2", "content": "B"},
        {"role": "user", "content": [{"type": "text", "text": "and?"},
                                     {"type": "image_url", "image_url": {"url": "https://x/i.png", "detail": "auto"}}]},
    ]
    # a call with no text before it is an assistant message of its own
    assert input_messages([{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}]) == [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]


def test_tools_tool_choice_and_text_formats():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    chat = _chat({"model": "m", "input": "x", "tools": [TOOL, {"type": "function", "name": "bare"}],
                  "tool_choice": {"type": "function", "name": "lookup"}, "parallel_tool_calls": False,
                  "text": {"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}},
                  "stream": True})
    assert chat["tools"] == [
        {"type": "function", "function": {"name": "lookup", "description": "Look it up",
                                          "parameters": TOOL["parameters"], "strict": False}},
        {"type": "function", "function": {"name": "bare"}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "lookup"}}
    assert chat["parallel_tool_calls"] is False
    assert chat["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "city", "schema": schema, "strict": True}}
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}
    for choice in ("auto", "none", "required"):
        assert _chat({"model": "m", "input": "x", "tools": [TOOL], "tool_choice": choice})["tool_choice"] == choice
    assert _chat({"model": "m", "input": "x", "text": {"format": {"type": "json_object"}}})["response_format"] == {
        "type": "json_object"}
    assert "response_format" not in _chat({"model": "m", "input": "x", "text": {"format": {"type": "text"}}})


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"model": "m"}, "input", "Missing required parameter"),
    ({"model": "m", "input": "x", "tools": [TOOL, {"type": "web_search"}, {"type": "file_search"}]}, "tools",
     "file_search, web_search"),
    ({"model": "m", "input": "x", "tools": [{"type": "function"}]}, "tools[0].name", "name"),
    ({"model": "m", "input": "x", "tools": [TOOL], "tool_choice": {"type": "web_search"}}, "tool_choice",
     "tool_choice"),
    ({"model": "m", "input": [{"type": "item_reference", "id": "x"}]}, "input[0].type", "item_reference"),
    ({"model": "m", "input": [{"role": "robot", "content": "x"}]}, "input[0].role", "role"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content[0]", "input_file"),
    ({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}, "text.format.schema",
     "schema"),
    ({"model": "m", "input": "x", "background": True}, "background", "background"),
    ({"model": "m", "input": "x", "temperature": 3}, "temperature", "temperature"),
])
def test_what_cannot_be_served_is_a_400_naming_the_field(body, param, says):
    with pytest.raises(BadRequest) as caught:
        _chat(body)
    assert caught.value.status == 400 and caught.value.param == param and says in caught.value.message


def test_routing_request_reads_any_items():
    request, raw = _decode({"model": "m", "instructions": "sys", "max_output_tokens": 9, "stream": True,
                            "input": [{"type": "web_search_call", "id": "w"}, {"role": "user", "content": "a b"},
                                      {"type": "function_call_output", "call_id": "c", "output": "c d"}],
                            "tools": [{"type": "web_search"}], "preferred_model": "x"})
    chat = routing_request(request, raw)
    assert chat["messages"] == [{"role": "user", "content": "sys\na b\nc d"}]
    assert chat["max_completion_tokens"] == 9 and chat["stream"] is True and chat["preferred_model"] == "x"
    assert "tools" not in chat
    decode_request(chat, ChatCompletionRequest)


def _shape(**fields) -> ResponseShape:
    request, _ = _decode({"model": "m", "input": "x", **fields})
    return ResponseShape(request)


@pytest.mark.parametrize("usage", [[1, 2], "lots", {"prompt_tokens": "7", "completion_tokens": -3,
                                                     "prompt_tokens_details": "none", "total_tokens": 10**400}])
def test_a_usage_that_is_no_count_is_read_as_none(usage):
    """A usage that is no object failed with AttributeError (a 500 for /v1/responses); strings, negatives and
    figures past any answer were relayed as the Response's usage."""
    found = response_usage(usage)
    assert found is None if not isinstance(usage, dict) else found == {
        "input_tokens": 0, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 0, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0}


def test_plain_answers_validate_as_responses():
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
             "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 1}}
    shape = _shape(tools=[TOOL], tool_choice="required", metadata={"a": "b"}, user="u", instructions="i",
                   text={"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}})
    message = {"role": "assistant", "content": "Let me check.",
               "tool_calls": [{"id": "call_1", "type": "function",
                               "function": {"name": "lookup", "arguments": '{"text": "x"}'}}]}
    response = shape.response(status="completed", model="m", output=output_items(message, "tool_calls"),
                              usage=response_usage(usage))
    validate(response, "Response")
    assert [i["type"] for i in response["output"]] == ["message", "function_call"]
    call = response["output"][1]
    assert call["id"].startswith("fc_") and call["call_id"] == "call_1" and call["status"] == "completed"
    assert response["id"].startswith("resp_") and response["output"][0]["id"].startswith("msg_")
    assert response["usage"] == {
        "input_tokens": 7, "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 0},
        "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 1}, "total_tokens": 10}
    assert (response["metadata"], response["user"], response["tool_choice"], response["instructions"]) == (
        {"a": "b"}, "u", "required", "i")
    # the output reads back as the conversation's next assistant turn
    assert input_messages(response["output"]) == [{**message, "content": "Let me check."}]
    cut = _shape().response(status="incomplete", model="m", incomplete="max_output_tokens",
                            output=output_items({"content": "Partial"}, "length"))
    validate(cut, "Response")
    assert cut["incomplete_details"] == {"reason": "max_output_tokens"} and cut["output"][0]["status"] == "incomplete"
    empty = output_items({"content": None}, "stop")
    assert [i["content"][0]["text"] for i in empty] == [""]  # nothing said is still a message


def test_chat_completion_as_response():
    completion = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "served",
                  "system_fingerprint": "fp", "x_vendor": {"kept": True},
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "Cut sh"},
                               "finish_reason": "length", "logprobs": None}],
                  "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    response = response_of(_shape(max_output_tokens=2), completion, "asked")
    validate(response, "Response")
    assert (response["model"], response["status"], response["incomplete_details"]) == (
        "served", "incomplete", {"reason": "max_output_tokens"})
    assert response["output"][0]["content"][0]["text"] == "Cut sh" and response["usage"]["total_tokens"] == 5
    assert response["x_vendor"] == {"kept": True}  # a vendor's field goes on; chat's own do not
    assert not {"choices", "created", "system_fingerprint"} & set(response) and response["id"].startswith("resp_")


def _chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "c", "object": "chat.completion.chunk", "model": "served", "choices": choices, "usage": usage}


def _run(translator: StreamTranslator, chunks: list[dict]) -> list[dict]:
    events = [e for c in chunks for e in translator.feed(c)] + translator.finish()
    for event in json.loads(msgspec.json.encode(events)):
        validate(event, RESPONSES_EVENT_SCHEMAS[event["type"]])
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_text_stream_event_sequence():
    translator = StreamTranslator(_shape(), "m")
    usage = {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    events = _run(translator, [_chunk({"role": "assistant", "content": ""}), _chunk({"content": "Hello"}),
                               _chunk({"content": " world"}), _chunk({}, "stop"), _chunk(usage=usage)])
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert events[0]["response"]["model"] == "served" and events[0]["response"]["status"] == "in_progress"
    assert events[6]["text"] == "Hello world"
    final = events[-1]["response"]
    assert final == translator.final and final["status"] == "completed" and final["usage"]["total_tokens"] == 4
    assert final["output"][0]["content"][0]["text"] == "Hello world"
    assert len({e["response"]["id"] for e in events if "response" in e}) == 1


def test_tool_call_stream_event_sequence():
    translator = StreamTranslator(_shape(tools=[TOOL]), "m")
    calls = [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "lookup", "arguments": ""}},
             {"index": 0, "function": {"arguments": '{"text":'}}, {"index": 0, "function": {"arguments": ' "x"}'}},
             {"index": 1, "id": "call_b", "function": {"name": "lookup", "arguments": "{}"}}]
    events = _run(translator, [_chunk({"content": "On it."}), *(_chunk({"tool_calls": [c]}) for c in calls),
                               _chunk({}, "tool_calls")])
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "response.completed" and kinds.count("response.output_item.done") == 3
    assert kinds.count("response.function_call_arguments.delta") == 3
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [(e["name"], e["arguments"]) for e in done] == [("lookup", '{"text": "x"}'), ("lookup", "{}")]
    output = translator.final["output"]
    assert [(i["type"], i.get("call_id")) for i in output] == [("message", None), ("function_call", "call_a"),
                                                                ("function_call", "call_b")]
    assert [e["output_index"] for e in events if e["type"] == "response.output_item.added"] == [0, 1, 2]
    assert "usage" not in translator.final  # the upstream sent none


def test_length_stream_is_incomplete_and_errors_fail():
    translator = StreamTranslator(_shape(max_output_tokens=2), "m")
    events = _run(translator, [_chunk({"content": "Cut"}), _chunk({}, "length")])
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-1]["response"]["output"][0]["status"] == "incomplete"
    broken = StreamTranslator(_shape(), "m")
    events = [e for c in [_chunk({"content": "Half"})] for e in broken.feed(c)]
    events += broken.fail(UpstreamUnavailable("upstream went away"))
    failed = json.loads(msgspec.json.encode(events[-1]))
    validate(failed, "ResponseFailedEvent")
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {"code": "server_error", "message": "upstream went away"}
    assert failed["sequence_number"] == len(events) - 1
    nothing = StreamTranslator(_shape(), "m")
    events = _run(nothing, [])  # no chunk at all: the events still open, and one empty message
    assert nothing.final["output"][0]["content"][0]["text"] == "" and events[0]["response"]["model"] == "m"
