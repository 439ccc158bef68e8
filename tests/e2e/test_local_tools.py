"""Tool calling, structured outputs and logprobs on the local SmolLM2, through a live gateway, with the openai SDK
and LangChain; every answer and chunk is checked against OpenAI's published schemas."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from tests.conftest import http
from tests.spec.openai import validate

MODEL = "smollm2-135m-instruct"
WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                      "required": ["city"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                            "parameters": WEATHER_PARAMETERS}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Get the time in a time zone",
                                         "parameters": {"type": "object", "properties": {"zone": {"type": "string",
                                                                                                  "maxLength": 12}},
                                                        "required": ["zone"]}}}
# a turn where the assistant called the tool and read its result: the model then calls it again by itself
HISTORY = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "sunny"}'},
    {"role": "assistant", "content": "It is sunny in Paris, 21 degrees."},
]


@pytest.fixture
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)


def create(client: openai.OpenAI, **fields) -> dict:
    response = client.chat.completions.create(model=MODEL, **{"max_tokens": 48, **fields})
    body = response.model_dump(mode="json", exclude_unset=True)
    validate(body, "CreateChatCompletionResponse")
    return body


def the_call(body: dict) -> dict:
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    return call["function"]


# ---- tools with the openai SDK --------------------------------------------------------------------------


def test_tool_choice_required_named_and_none(client):
    question = [{"role": "user", "content": "What is the weather in Tokyo?"}]
    required = the_call(create(client, messages=question, tools=[WEATHER, TIME], tool_choice="required"))
    assert required["name"] in ("get_weather", "get_time")
    named = the_call(create(client, messages=question, tools=[WEATHER, TIME],
                            tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    assert named["name"] == "get_weather"
    arguments = json.loads(named["arguments"])
    jsonschema.validate(arguments, WEATHER_PARAMETERS)
    assert "Tokyo" in arguments["city"]
    none = create(client, messages=question, tools=[WEATHER], tool_choice="none", max_tokens=12)
    assert "tool_calls" not in none["choices"][0]["message"] and none["choices"][0]["message"]["content"]


def test_auto_lets_the_model_choose(client):
    call = the_call(create(client, messages=[*HISTORY, {"role": "user", "content": "What is the weather in London?"}],
                           tools=[WEATHER]))
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "London"}
    text = create(client, messages=[*HISTORY, {"role": "user", "content": "Thanks! What is 2+2?"}], tools=[WEATHER],
                  tool_choice="auto")
    assert text["choices"][0]["finish_reason"] == "stop" and "4" in text["choices"][0]["message"]["content"]
    assert "tool_calls" not in text["choices"][0]["message"]


def test_a_streamed_call_is_assembled_by_the_sdk(client, gateway):
    question = [{"role": "user", "content": "What is the weather in Lima?"}]
    with client.chat.completions.stream(model=MODEL, messages=question, tools=[WEATHER], tool_choice="required",
                                        max_tokens=48) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"].lower() == "lima"
    # the same stream on the wire, chunk by chunk
    body = {"model": MODEL, "messages": question, "tools": [WEATHER], "tool_choice": "required", "max_tokens": 48,
            "stream": True}
    status, _, raw = http("POST", gateway.url + "/v1/chat/completions", body)
    chunks = [json.loads(e.removeprefix("data: ")) for e in raw.decode().split("\n\n")[:-2]]
    assert status == 200
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    first = chunks[0]["choices"][0]["delta"]
    assert first["role"] == "assistant" and first["content"] is None
    assert first["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert first["tool_calls"][0]["id"] == chunks[0]["choices"][0]["delta"]["tool_calls"][0]["id"]
    pieces = [c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for c in chunks[1:-1]]
    assert "".join(pieces) == call.function.arguments and len(pieces) > 1  # greedy: the same call
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls" and chunks[-1]["choices"][0]["delta"] == {}


def test_a_second_turn_reads_the_tool_result(client):
    question = {"role": "user", "content": "What is the weather in Oslo?"}
    first = client.chat.completions.create(model=MODEL, messages=[question], tools=[WEATHER], tool_choice="required",
                                           max_tokens=48)
    call = first.choices[0].message.tool_calls[0]
    second = create(client, tools=[WEATHER], tool_choice="none", max_tokens=24, messages=[
        question,
        first.choices[0].message.model_dump(mode="json", exclude_none=True),  # the assistant turn, as the SDK has it
        {"role": "tool", "tool_call_id": call.id, "content": "Snowing, -7 degrees."},
    ])
    answer = second["choices"][0]["message"]["content"]
    assert "snow" in answer.lower() or "-7" in answer


# ---- structured outputs ---------------------------------------------------------------------------------


def test_json_object_and_json_schema(client):
    loose = create(client, messages=[{"role": "user", "content": "Describe a cat as a JSON object."}],
                   response_format={"type": "json_object"}, max_tokens=80)
    assert isinstance(json.loads(loose["choices"][0]["message"]["content"]), dict)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"type": "string", "maxLength": 20}},
              "required": ["city", "country"], "additionalProperties": False}
    strict = create(client, messages=[{"role": "user", "content": "Name the capital of France and its country."}],
                    response_format={"type": "json_schema",
                                     "json_schema": {"name": "capital", "schema": schema, "strict": True}})
    answer = json.loads(strict["choices"][0]["message"]["content"])
    jsonschema.validate(answer, schema)
    assert answer["city"] == "Paris"


# ---- logprobs -------------------------------------------------------------------------------------------


def test_logprobs_plain_and_streamed(client, gateway):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    plain = create(client, messages=question, logprobs=True, top_logprobs=5, max_tokens=5)
    content = plain["choices"][0]["message"]["content"]
    entries = plain["choices"][0]["logprobs"]["content"]
    assert "".join(e["token"] for e in entries) == content and len(entries) == 5
    for entry in entries:  # greedy: the sampled token is the most likely one
        assert len(entry["top_logprobs"]) == 5 and entry["logprob"] <= 0
        assert entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])
    streamed = list(client.chat.completions.create(model=MODEL, messages=question, logprobs=True, top_logprobs=5,
                                                   max_tokens=5, stream=True))
    for chunk in streamed:
        validate(chunk.model_dump(mode="json", exclude_unset=True), "CreateChatCompletionStreamResponse")
    pieces = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [p.token for p in pieces] == [e["token"] for e in entries]
    assert [p.logprob for p in pieces] == pytest.approx([e["logprob"] for e in entries], abs=1e-4)
    legacy = client.completions.create(model=MODEL, prompt="The capital of France is", logprobs=3, max_tokens=4)
    validate(legacy.model_dump(mode="json", exclude_unset=True), "CreateCompletionResponse")
    logprobs = legacy.choices[0].logprobs
    assert "".join(logprobs.tokens) == legacy.choices[0].text and len(logprobs.token_logprobs) == 4
    assert all(len(top) == 3 for top in logprobs.top_logprobs) and logprobs.text_offset[0] == 0


# ---- LangChain ------------------------------------------------------------------------------------------


def langchain(gateway) -> ChatOpenAI:
    return ChatOpenAI(base_url=gateway.url + "/v1", api_key="x", model=MODEL, max_retries=0, temperature=0,
                      max_tokens=48)


def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return "sunny"


class Capital(BaseModel):
    """A country's capital city."""

    city: str = Field(max_length=20)
    country: str = Field(max_length=20)


def test_langchain_bind_tools(gateway):
    llm = langchain(gateway)
    forced = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Rome?")
    (call,) = forced.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "Rome"} and call["id"].startswith("call_")
    # auto: after a turn with a call and its result, the model calls again by itself
    history = [HumanMessage("What is the weather in Paris?"),
               AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1"}]),
               ToolMessage('{"temperature": 21, "sky": "sunny"}', tool_call_id="call_1"),
               AIMessage("It is sunny in Paris, 21 degrees."),
               HumanMessage("What is the weather in London?")]
    auto = llm.bind_tools([get_weather]).invoke(history)
    assert [(c["name"], c["args"]) for c in auto.tool_calls] == [("get_weather", {"city": "London"})]


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_structured_output(gateway, method):
    structured = langchain(gateway).with_structured_output(Capital, method=method)
    answer = structured.invoke("Name the capital of France and its country.")
    assert isinstance(answer, Capital) and answer.city == "Paris"
