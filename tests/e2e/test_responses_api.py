"""OpenAI's Responses API (/v1/responses) through a live gateway: the openai SDK and LangChain, translated onto chat
completions (the fake upstream, the local SmolLM2) and relayed natively, every answer and event checked against
OpenAI's published schemas; stored responses on Redis, scoped to their key."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid

import openai
import pytest
import redis
from langchain_openai import ChatOpenAI

from tests.conftest import free_port, http, redis_url, require_redis, start_gateway
from tests.spec.openai import RESPONSES_EVENT_SCHEMAS, validate

REDIS = redis_url(14)  # a database of this xdist worker's own
KEY_A, KEY_B = "sk-responses-a", "sk-responses-b"
TOOL = {"type": "function", "name": "lookup", "description": "Look a text up",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        "strict": True}


@pytest.fixture(scope="module")
def served(upstream, tmp_path_factory):
    """A gateway with keys, Redis, a usage database and a budget: `remote-a` translated onto chat completions,
    `native-a` (two deployments, one dead) and `native-v` (vLLM) relayed natively."""
    require_redis(REDIS)
    tmp = tmp_path_factory.mktemp("responses")
    member = uuid.uuid4().hex  # this run's own budget member, whatever Redis holds from earlier runs
    config = f"""
auth: {{api_keys: ["{KEY_A}", "{KEY_B}"]}}
models:
  - {{id: remote-a, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
  - id: native-a
    backend: openai
    responses: native
    upstream_model: mock-model
    load_balancing: round_robin
    deployments: [{{base_url: "http://127.0.0.1:{free_port()}/v1"}}, {{base_url: "{upstream.url}"}}]
    load: lazy
  - {{id: native-v, backend: vllm, base_url: "{upstream.url}", upstream_model: mock-model}}
routing: {{health_check_s: 0}}
storage: {{redis_url: "{REDIS}", database_url: "sqlite+aiosqlite:///{tmp}/usage.db"}}
responses: {{store_ttl_s: 120}}
policies:
  budgets: [{{scope: user, match: "{member}", period: day, max_tokens: 1000}}]
"""
    gateway = start_gateway(tmp, config)
    gateway.extra.update(member=member, db=tmp / "usage.db")
    yield gateway
    gateway.stop()


def _client(gateway, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


def _post(gateway, body: dict, key: str = KEY_A, headers: dict | None = None):
    status, head, raw = http("POST", gateway.url + "/v1/responses", body,
                             {"authorization": f"Bearer {key}", **(headers or {})})
    head = {k.lower(): v for k, v in head.items()}
    return status, head, raw if head["content-type"].startswith("text/event-stream") else json.loads(raw)


def _events(raw: bytes) -> list[dict]:
    """SSE frames (`event:` and `data:` lines), each checked against its spec schema and its event name."""
    events = []
    for frame in raw.decode().split("\n\n"):
        if not frame:
            continue
        name, data = frame.split("\n", 1)
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        validate(event, RESPONSES_EVENT_SCHEMAS[event["type"]])
        events.append(event)
    return events


def _dump(response) -> dict:
    return response.model_dump(mode="json", exclude_unset=True, by_alias=True)


# ---- translated onto chat completions (the fake upstream) ------------------------------------------------------


def test_sdk_plain_with_instructions_and_settings(served):
    response = _client(served).responses.create(
        model="remote-a", input="hello there", instructions="Be brief.", max_output_tokens=40, temperature=0.3,
        top_p=0.9, metadata={"ticket": "7"}, user="u1", store=False, extra_body={"top_k": 5})
    body = _dump(response)
    validate(body, "Response")
    assert response.output_text == "echo: hello there" and response.status == "completed"
    assert response.id.startswith("resp_") and response.model == "remote-a"
    assert (body["metadata"], body["instructions"], body["temperature"], body["max_output_tokens"]) == (
        {"ticket": "7"}, "Be brief.", 0.3, 40)
    assert response.usage.input_tokens == 2 and response.usage.output_tokens == 3
    assert response.usage.total_tokens == 5
    sent = body["x_received"]["body"]  # what the upstream's chat completions received
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    assert (sent["model"], sent["max_completion_tokens"], sent["temperature"], sent["top_p"], sent["user"]) == (
        "mock-model", 40, 0.3, 0.9, "u1")
    assert sent["top_k"] == 5 and not {"metadata", "store", "input", "instructions"} & set(sent)


def test_sdk_stream_events_and_final_response(served):
    status, head, raw = _post(served, {"model": "remote-a", "input": "one two three", "stream": True})
    assert status == 200 and head["content-type"].startswith("text/event-stream")
    events = _events(raw)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "echo: one two three"
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["usage"]["total_tokens"] == 7
    assert final["output"][0]["content"][0]["text"] == "echo: one two three"
    # the SDK's stream helper puts the same answer together
    with _client(served).responses.stream(model="remote-a", input="four five") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        answer = stream.get_final_response()
    assert "".join(deltas) == answer.output_text == "echo: four five"
    chunks = list(_client(served).responses.create(model="remote-a", input="six", stream=True))
    assert chunks[-1].type == "response.completed" and chunks[-1].response.output_text == "echo: six"


def test_function_tool_round_trip_with_and_without_previous_response(served):
    client = _client(served)
    first = client.responses.create(model="remote-a", input="tool:lookup find x", tools=[TOOL])
    validate(_dump(first), "Response")
    call = first.output[0]
    assert (call.type, call.name, call.call_id, call.status) == ("function_call", "lookup", "call_mock1", "completed")
    assert json.loads(call.arguments) == {"text": "tool:lookup find x"} and call.id.startswith("fc_")
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "42"}
    # continued from the stored response: its turns go before the tool's result
    second = client.responses.create(model="remote-a", previous_response_id=first.id, input=[result], tools=[TOOL])
    assert second.output_text == "tool result: 42" and second.previous_response_id == first.id
    sent = _dump(second)["x_received"]["body"]
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool"]
    assert sent["messages"][1]["tool_calls"][0]["function"] == {"name": "lookup", "arguments": call.arguments}
    assert sent["tools"] == [{"type": "function", "function": {k: TOOL[k] for k in
                                                               ("name", "description", "parameters", "strict")}}]
    # or with the whole conversation sent again (store off)
    items = [{"role": "user", "content": "tool:lookup find x"}, _dump(call), result]
    third = client.responses.create(model="remote-a", input=items, tools=[TOOL], store=False)
    assert third.output_text == "tool result: 42"
    # a call streamed: the function_call item and its argument deltas
    status, _, raw = _post(served, {"model": "remote-a", "input": "tool:lookup y", "tools": [TOOL], "stream": True,
                                    "tool_choice": {"type": "function", "name": "lookup"}})
    events = _events(raw)
    kinds = [e["type"] for e in events]
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert json.loads(done["arguments"]) == {"text": "tool:lookup y"}
    assert events[-1]["response"]["output"][0]["call_id"] == "call_mock1"


def test_json_schema_format_reaches_the_upstream(served):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    response = _client(served).responses.create(
        model="remote-a", input="a city please",
        text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}})
    body = _dump(response)
    validate(body, "Response")
    assert body["text"]["format"] == {"type": "json_schema", "name": "city", "schema": schema, "strict": True}
    assert body["x_received"]["body"]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    obj = _client(served).responses.create(model="remote-a", input="x", text={"format": {"type": "json_object"}})
    assert _dump(obj)["x_received"]["body"]["response_format"] == {"type": "json_object"}


def test_previous_response_follow_up_and_stored_response_lifecycle(served):
    client, other = _client(served), _client(served, KEY_B)
    first = client.responses.create(model="remote-a", input="first question", instructions="Old rules")
    # a follow-up: the earlier turns, not the earlier instructions; the model carries over when none is named
    status, _, second = _post(served, {"previous_response_id": first.id, "input": "second question",
                                       "instructions": "New rules"})
    assert status == 200 and second["model"] == "remote-a"
    assert second["x_received"]["body"]["messages"] == [
        {"role": "system", "content": "New rules"}, {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "echo: first question"}, {"role": "user", "content": "second question"}]
    third = client.responses.create(model="remote-a", previous_response_id=second["id"], input="third")
    assert [m["content"] for m in _dump(third)["x_received"]["body"]["messages"]][:3] == [
        "first question", "echo: first question", "second question"]
    # kept on Redis for responses.store_ttl_s, under the caller's key
    ttl = redis.Redis.from_url(REDIS).ttl(f"pointsman:responses:static-0:{first.id}")
    assert 0 < ttl <= 120
    fetched = client.responses.retrieve(first.id)
    validate(_dump(fetched), "Response")
    assert fetched.id == first.id and fetched.output_text == "echo: first question"
    # another key sees nothing, and cannot delete or continue it
    status, _, raw = http("GET", f"{served.url}/v1/responses/{first.id}", headers={"authorization": f"Bearer {KEY_B}"})
    validate(json.loads(raw), "ErrorResponse")
    assert status == 404 and json.loads(raw)["error"]["message"] == f"Response with id '{first.id}' not found."
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(first.id)
    with pytest.raises(openai.BadRequestError) as refused:
        other.responses.create(model="remote-a", previous_response_id=first.id, input="x")
    assert refused.value.code == "previous_response_not_found" and refused.value.param == "previous_response_id"
    assert f"Previous response with id '{first.id}' not found." in refused.value.message
    status, _, raw = http("DELETE", f"{served.url}/v1/responses/{first.id}",
                          headers={"authorization": f"Bearer {KEY_A}"})
    assert status == 200 and json.loads(raw) == {"id": first.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="remote-a", previous_response_id=first.id, input="x")
    # store=False keeps nothing
    unstored = client.responses.create(model="remote-a", input="x", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    # a stream is stored by the time its completed event arrives
    events = list(client.responses.create(model="remote-a", input="streamed", stream=True))
    stored = client.responses.retrieve(events[-1].response.id)
    assert stored.output_text == "echo: streamed"


LOGPROBS = ["message.output_text.logprobs"]


def _token(token: str, logprob: float, with_bytes: bool = True) -> dict:
    """A logprob entry as the fake upstream makes them up (tests/e2e/upstream.py)."""
    return {"token": token, "logprob": logprob, **({"bytes": list(token.encode())} if with_bytes else {})}


def test_include_output_text_logprobs_plain_and_streamed(served):
    client = _client(served)
    response = client.responses.create(model="remote-a", input="one two", include=LOGPROBS, top_logprobs=2,
                                       store=False)
    body = _dump(response)
    validate(body, "Response")
    part = body["output"][0]["content"][0]
    assert "".join(t["token"] for t in part["logprobs"]) == part["text"] == "echo: one two"
    assert part["logprobs"][0] == {**_token("echo:", -0.5), "top_logprobs": [_token("echo:", -0.5),
                                                                             _token("alt1", -1.5)]}
    assert response.output[0].content[0].logprobs[2].top_logprobs[1].token == "alt1"  # the SDK's types read it
    sent = body["x_received"]["body"]  # the chat request asked for them; include stayed here
    assert (sent["logprobs"], sent["top_logprobs"]) == (True, 2) and "include" not in sent
    # not asked for: the part's list stays empty, and the upstream is not asked either
    plain = _dump(client.responses.create(model="remote-a", input="one two", top_logprobs=2, store=False))
    assert plain["output"][0]["content"][0]["logprobs"] == []
    assert not {"logprobs", "top_logprobs"} & set(plain["x_received"]["body"])
    # streamed: each text delta carries its tokens' logprobs (the spec's ResponseLogProb: no bytes)
    status, _, raw = _post(served, {"model": "remote-a", "input": "three four", "stream": True, "store": False,
                                    "include": LOGPROBS, "top_logprobs": 1})
    events = _events(raw)
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert status == 200 and [[t["token"] for t in d["logprobs"]] for d in deltas] == [[d["delta"]] for d in deltas]
    assert deltas[1]["logprobs"] == [{**_token(" three", -1.0, False), "top_logprobs": [_token(" three", -1.0, False)]}]
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert done["logprobs"] == [t for d in deltas for t in d["logprobs"]]
    final = events[-1]["response"]["output"][0]["content"][0]
    assert [t["token"] for t in final["logprobs"]] == ["echo:", " three", " four"]
    assert final["logprobs"][2] == {**_token(" four", -1.5), "top_logprobs": [_token(" four", -1.5)]}
    # the SDK reads them off the stream; without the include every list is empty
    with client.responses.stream(model="remote-a", input="five", include=LOGPROBS, store=False) as stream:
        tokens = [t.token for e in stream if e.type == "response.output_text.delta" for t in e.logprobs]
        assert [t.token for t in stream.get_final_response().output[0].content[0].logprobs] == tokens
    assert tokens == ["echo:", " five"]
    status, _, raw = _post(served, {"model": "remote-a", "input": "six", "stream": True, "store": False})
    assert all(e["logprobs"] == [] for e in _events(raw) if e["type"].startswith("response.output_text."))


@pytest.mark.parametrize("include", [["reasoning.encrypted_content"], [*LOGPROBS, "file_search_call.results"]])
def test_an_include_of_data_a_translated_answer_never_has_adds_nothing(served, include):
    # the Agents SDK sends reasoning.encrypted_content with store=false: a model without reasoning items has none
    answer = _dump(_client(served).responses.create(model="remote-a", input="one two", include=include, store=False))
    validate(answer, "Response")
    assert answer["status"] == "completed" and [item["type"] for item in answer["output"]] == ["message"]


@pytest.mark.parametrize("include", [["no.such.thing"], [*LOGPROBS, "message.output_text"]])
def test_an_include_openai_does_not_define_is_a_400_naming_it(served, include):
    status, head, error = _post(served, {"model": "remote-a", "input": "x", "include": include})
    validate(error, "ErrorResponse")
    assert status == 400 and head["x-request-id"]
    assert error["error"]["param"] == "include"
    assert repr(include[-1]) in error["error"]["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        _client(served).responses.create(model="remote-a", input="x", include=include, stream=True)
    assert refused.value.param == "include"
    # relayed natively, include goes to the upstream as it is
    answer = _client(served).responses.create(model="native-v", input="y", include=include)
    assert _dump(answer)["x_received"]["body"]["include"] == include


def test_retrieve_stream_replays_the_stored_response(served):
    client = _client(served)
    auth = {"authorization": f"Bearer {KEY_A}"}
    first = client.responses.create(model="remote-a", input="alpha beta", include=LOGPROBS, top_logprobs=1)
    _, _, raw = http("GET", f"{served.url}/v1/responses/{first.id}", headers=auth)
    stored = json.loads(raw)
    status, head, raw = http("GET", f"{served.url}/v1/responses/{first.id}?stream=true", headers=auth)
    head = {k.lower(): v for k, v in head.items()}
    assert status == 200 and head["content-type"].startswith("text/event-stream") and head["x-request-id"]
    events = _events(raw)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["response"] == stored  # the stored object as it is
    assert events[0]["response"]["id"] == first.id and events[0]["response"]["status"] == "in_progress"
    assert events[2]["item"]["id"] == events[7]["item"]["id"] == stored["output"][0]["id"]
    assert events[7]["item"] == stored["output"][0]
    assert events[4]["delta"] == "echo: alpha beta"
    assert [t["token"] for t in events[4]["logprobs"]] == ["echo:", " alpha", " beta"]
    # starting_after: the events after that sequence number, the same as the whole replay's
    _, _, raw = http("GET", f"{served.url}/v1/responses/{first.id}?stream=true&starting_after=3", headers=auth)
    assert _events(raw) == events[4:]
    # the SDK's retrieve(stream=True)
    replayed = list(client.responses.retrieve(first.id, stream=True))
    assert [e.type for e in replayed] == [e["type"] for e in events]
    assert replayed[-1].response.output_text == "echo: alpha beta"
    after = list(client.responses.retrieve(first.id, stream=True, starting_after=6))
    assert [e.sequence_number for e in after] == [7, 8]
    assert list(client.responses.retrieve(first.id, stream=True, starting_after=8)) == []
    # a streamed tool call, stored: its call replayed with its own ids
    streamed = list(client.responses.create(model="remote-a", input="tool:lookup z", tools=[TOOL], stream=True))
    answer = streamed[-1].response
    _, _, raw = http("GET", f"{served.url}/v1/responses/{answer.id}?stream=true", headers=auth)
    events = _events(raw)
    done = next(e for e in events if e["type"] == "response.function_call_arguments.done")
    assert (done["item_id"], done["arguments"]) == (answer.output[0].id, answer.output[0].arguments)
    kinds = [e.type for e in streamed]
    kinds.remove("response.function_call_arguments.delta")  # streamed in two pieces, replayed whole in one
    assert [e["type"] for e in events] == kinds
    assert events[-1]["response"]["output"][0]["call_id"] == "call_mock1"
    # as the plain GET: another key's is not found, no key is a 401
    for key, code in ((KEY_B, 404), (None, 401)):
        status, _, raw = http("GET", f"{served.url}/v1/responses/{first.id}?stream=true",
                              headers={"authorization": f"Bearer {key}"} if key else {})
        validate(json.loads(raw), "ErrorResponse")
        assert status == code
    with pytest.raises(openai.NotFoundError):
        _client(served, KEY_B).responses.retrieve(first.id, stream=True)
    # a stream flag or a sequence number that is none: a 400 naming it
    for query, param in (("stream=maybe", "stream"), ("stream=true&starting_after=x", "starting_after"),
                         ("stream=true&starting_after=-2", "starting_after")):
        status, _, raw = http("GET", f"{served.url}/v1/responses/{first.id}?{query}", headers=auth)
        validate(json.loads(raw), "ErrorResponse")
        assert status == 400 and json.loads(raw)["error"]["param"] == param
    # stream=false is the object itself
    _, _, raw = http("GET", f"{served.url}/v1/responses/{first.id}?stream=false", headers=auth)
    assert json.loads(raw) == stored


@pytest.mark.parametrize(("body", "key", "status", "code"), [
    ({"model": "remote-a", "input": "x"}, None, 401, "invalid_api_key"),
    ({"model": "gpt-9", "input": "x"}, KEY_A, 404, "model_not_found"),
    ({"model": "remote-a", "input": "x", "tools": [{"type": "web_search"}]}, KEY_A, 400, "unsupported_parameter"),
    ({"model": "remote-a", "input": [{"type": "reasoning", "id": "r"}]}, KEY_A, 400, "unsupported_parameter"),
    ({"model": "remote-a"}, KEY_A, 400, None),
    ({"model": "remote-a", "input": "status:429"}, KEY_A, 429, "mock_429"),
])
def test_errors_in_openai_shape(served, body, key, status, code):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    got, head, raw = http("POST", served.url + "/v1/responses", body, headers)
    head = {k.lower(): v for k, v in head.items()}
    error = json.loads(raw)
    validate(error, "ErrorResponse")
    assert got == status and error["error"]["code"] == code and head["x-request-id"]
    if status == 429:
        assert head["retry-after"] == "7"  # the upstream's, relayed


def test_error_mid_stream_is_a_failed_response(served):
    status, _, raw = _post(served, {"model": "remote-a", "input": "break:3 a b c d e f", "stream": True})
    assert status == 200
    events = _events(raw)
    assert events[-1]["type"] == "response.failed" and events[-1]["response"]["status"] == "failed"
    assert events[-1]["response"]["error"]["code"] == "server_error"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_langchain_responses_api_invoke_and_stream(served):
    llm = ChatOpenAI(base_url=served.url + "/v1", api_key=KEY_A, model="remote-a", use_responses_api=True,
                     max_retries=0, max_tokens=16)
    answer = llm.invoke("red green")
    assert answer.text == "echo: red green" and answer.usage_metadata["total_tokens"] == 5
    assert "".join(chunk.text for chunk in llm.stream("blue yellow")) == "echo: blue yellow"


# ---- relayed natively -------------------------------------------------------------------------------------------


def _usage_rows(db, request_ids: set[str], timeout: float = 15) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    rows: dict[str, dict] = {}
    while time.monotonic() < deadline:
        if db.exists():
            with sqlite3.connect(db) as conn:
                conn.row_factory = sqlite3.Row
                marks = ",".join("?" * len(request_ids))
                rows = {r["request_id"]: dict(r) for r in conn.execute(
                    f"SELECT * FROM usage_rows WHERE request_id IN ({marks})", sorted(request_ids))}
            if set(rows) == request_ids:
                return rows
        time.sleep(0.1)
    raise AssertionError(f"usage rows {sorted(request_ids - set(rows))} not written within {timeout}s")


def test_native_pass_through_plain_and_streamed(served):
    client = _client(served)
    member = served.extra["member"]
    body = {"model": "native-a", "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi you"}]}],
            "store": True, "reasoning": {"effort": "low"}, "include": ["reasoning.encrypted_content"],
            "tools": [{"type": "web_search"}], "user": member}
    # round robin over a dead deployment and the live one: whichever comes first, both answer (a retry)
    answers = [_post(served, body, headers={"x-request-id": f"native-{i}-{member}"}) for i in range(2)]
    for status, head, answer in answers:
        assert status == 200 and head["x-pointsman-model"] == "native-a"
        assert answer["id"] == "resp_mock1" and answer["model"] == "native-a"  # the upstream's own Response
        assert answer["x_received"]["body"] == {**body, "model": "mock-model"}  # unchanged but for the model
    # the stream, relayed as the upstream framed it; the SDK reads it whole
    status, _, raw = _post(served, {"model": "native-a", "input": "a b c", "stream": True})
    events = [json.loads(f.split("\n", 1)[1].removeprefix("data: ")) for f in raw.decode().split("\n\n") if f]
    assert [e["type"] for e in events][-1] == "response.completed" and events[0]["response"]["model"] == "native-a"
    with client.responses.stream(model="native-v", input="d e") as stream:
        assert stream.get_final_response().output_text == "echo: d e"
    assert client.responses.create(model="native-v", input="f").output_text == "echo: f"
    # a chain whose first model is native relays natively
    chained = _dump(client.responses.create(model="native-v:remote-a", input="g"))
    assert chained["x_received"]["body"]["input"] == "g"
    # the usage of relayed answers is booked: usage rows and the budget
    rows = _usage_rows(served.extra["db"], {f"native-0-{member}", f"native-1-{member}"})
    for row in rows.values():
        assert (row["status"], row["model_served"], row["prompt_tokens"], row["completion_tokens"]) == (
            "ok", "native-a", 2, 3)
    deadline = time.monotonic() + 10
    while True:
        _, _, raw = http("GET", served.url + "/v1/usage",
                         headers={"authorization": f"Bearer {KEY_A}", "x-pointsman-user": member})
        used = json.loads(raw)["budgets"][0]["used_tokens"]
        if used == 10 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert used == 10


def test_native_errors_relayed(served):
    status, _, error = _post(served, {"model": "native-v", "input": "status:400"})
    assert status == 400 and error["error"]["code"] == "mock_400"
    status, _, raw = _post(served, {"model": "native-v", "input": "break:3 a b c", "stream": True})
    events = _events_loose(raw)
    assert status == 200 and events[-1]["type"] == "error"
    validate(events[-1], "ResponseErrorEvent")
    # the connection dropped after three events: an error event numbered after the last one relayed
    assert [e["type"] for e in events[:-1]] == ["response.created", "response.output_item.added",
                                                "response.content_part.added"]
    assert events[-1]["code"].startswith("upstream_") and events[-1]["sequence_number"] == 3


def _events_loose(raw: bytes) -> list[dict]:
    return [json.loads(f.split("\n", 1)[1].removeprefix("data: ")) for f in raw.decode().split("\n\n") if f]


# ---- the local model (the shared e2e gateway: SmolLM2 in process, auth off) ----------------------------------


def test_local_model_plain_and_streamed(gateway):
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    question = "What is the capital of France?"
    response = client.responses.create(model="smollm2-135m-instruct", input=question, max_output_tokens=12,
                                       temperature=0)
    validate(_dump(response), "Response")
    assert "Paris" in response.output_text and response.model == "smollm2-135m-instruct"
    assert response.usage.input_tokens > 10 and 0 < response.usage.output_tokens <= 12
    status, _, raw = http("POST", gateway.url + "/v1/responses",
                          {"model": "small", "input": question, "max_output_tokens": 12, "temperature": 0,
                           "stream": True})
    events = _events(raw)
    assert status == 200 and events[-1]["type"] in ("response.completed", "response.incomplete")
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert "Paris" in text and events[-1]["response"]["output"][0]["content"][0]["text"] == text
    assert events[-1]["response"]["usage"]["output_tokens"] > 0


def test_local_model_output_text_logprobs(gateway):
    """The local engine's own logprobs, through the Responses API: one per generated token, plain and streamed."""
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    asked = dict(model="small", input="What is the capital of France?", max_output_tokens=6, temperature=0,
                 include=LOGPROBS, top_logprobs=2, store=False)
    response = client.responses.create(**asked)
    body = _dump(response)
    validate(body, "Response")
    logprobs = body["output"][0]["content"][0]["logprobs"]
    assert len(logprobs) == response.usage.output_tokens and all(len(t["top_logprobs"]) == 2 for t in logprobs)
    assert bytes(b for t in logprobs for b in t["bytes"]).decode() == response.output_text
    status, _, raw = http("POST", gateway.url + "/v1/responses", {**asked, "stream": True})
    events = _events(raw)
    tokens = [t["token"] for e in events if e["type"] == "response.output_text.delta" for t in e["logprobs"]]
    final = events[-1]["response"]
    assert status == 200 and tokens == [t["token"] for t in final["output"][0]["content"][0]["logprobs"]]
    assert len(tokens) == final["usage"]["output_tokens"]


def test_local_model_function_call_round_trip_and_json_schema(gateway):
    """Tool calling and structured outputs on the local engine (grammar-constrained), through the Responses API."""
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    weather = {"type": "function", "name": "get_weather", "description": "The weather in a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    first = client.responses.create(model="small", input="What is the weather in Paris?", tools=[weather],
                                    tool_choice="required", max_output_tokens=40, temperature=0)
    validate(_dump(first), "Response")
    call = first.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert isinstance(json.loads(call.arguments)["city"], str)
    second = client.responses.create(
        model="small", previous_response_id=first.id, tools=[weather], max_output_tokens=12, temperature=0,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}])
    validate(_dump(second), "Response")
    assert second.output[0].type in ("message", "function_call") and second.usage.input_tokens > 0
    city = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    shaped = client.responses.create(model="small", input="Name a city, as JSON.", max_output_tokens=30,
                                     temperature=0, text={"format": {"type": "json_schema", "name": "c",
                                                                     "schema": city}})
    assert isinstance(json.loads(shaped.output_text)["city"], str)


def test_langchain_responses_api_against_the_local_model(gateway):
    llm = ChatOpenAI(base_url=gateway.url + "/v1", api_key="unused", model="smollm2-135m-instruct",
                     use_responses_api=True, max_retries=0, max_tokens=12, temperature=0)
    answer = llm.invoke("What is the capital of France?")
    assert "Paris" in answer.text and answer.usage_metadata["output_tokens"] > 0
    assert "Paris" in "".join(chunk.text for chunk in llm.stream("What is the capital of France?"))
