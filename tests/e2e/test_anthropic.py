"""Anthropic's Messages API against live gateways: the real `anthropic` SDK and LangChain's ChatAnthropic, plain
and streamed, text and tool use, over a relayed upstream and the local SmolLM2; errors in Anthropic's shape and
the SDK's exception classes; auto routing, chains, budgets and usage rows through /v1/messages."""

from __future__ import annotations

import json
import time
import uuid

import anthropic
import httpx
import pytest
from langchain_anthropic import ChatAnthropic

from tests.conftest import free_port, start_gateway

KEY = "sk-anthropic-test-static"  # a static key: an admin
CAPPED = "capped-" + uuid.uuid4().hex  # a user whose budget no request fits
LOOKUP = {"name": "lookup", "description": "Look something up.",
          "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def relay(upstream, tmp_path_factory):
    """Auth on, three models over the fake upstream (faults are asked of `faulty`), a dead one, a usage database
    and a budget."""
    tmp = tmp_path_factory.mktemp("anthropic")
    config = f"""
auth: {{api_keys: ["{KEY}"]}}
models:
  - {{id: remote-a, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model, aliases: [remote]}}
  - {{id: remote-b, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
  - {{id: faulty, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
  - {{id: dead, backend: openai, base_url: "http://127.0.0.1:{free_port()}/v1", load: lazy}}
routing: {{health_check_s: 0, circuit_breaker: {{failures: 1000, cooldown_s: 1}}}}  # faults must not trip one
storage: {{database_url: "sqlite+aiosqlite:///{tmp}/usage.db"}}
policies:
  budgets:
    - {{scope: user, match: "{CAPPED}", period: total, max_tokens: 1}}
"""
    server = start_gateway(tmp, config)
    yield server
    server.stop()


@pytest.fixture
def client(relay) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=relay.url, api_key=KEY, max_retries=0)


def _post(url: str, body: dict | bytes, key: str | None = KEY, path: str = "/v1/messages") -> httpx.Response:
    headers = {"anthropic-version": "2023-06-01", **({"x-api-key": key} if key else {})}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers={"content-type": "application/json", **headers})


def _events(raw: str) -> list[tuple[str, dict]]:
    """An SSE body as (event, data) pairs; each frame must carry both lines."""
    frames = [f for f in raw.split("\n\n") if f]
    out = []
    for frame in frames:
        event, data = frame.split("\n")
        out.append((event.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def _error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind, body
    assert response.headers["request-id"] == response.headers["x-request-id"] == body["request_id"]
    return body["error"]["message"]


# ---- the relayed upstream: the SDK, text and tools ------------------------------------------------------


def test_sdk_create_and_stream_text(client):
    raw = client.messages.with_raw_response.create(model="remote", max_tokens=32,
                                                   messages=[{"role": "user", "content": "red green"}],
                                                   system="Be brief.", metadata={"user_id": "sdk-user"})
    message = raw.parse()
    assert raw.headers["x-pointsman-model"] == "remote-a" and message._request_id == raw.headers["x-request-id"]
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "remote-a" and message.content[0].type == "text"
    assert message.content[0].text == "echo: red green"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens == 2 and message.usage.output_tokens == 3  # the upstream's word counts
    with client.messages.stream(model="remote-a", max_tokens=32,
                                messages=[{"role": "user", "content": "one two three"}]) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert pieces == ["echo:", " one", " two", " three"]
    assert final.content[0].text == "echo: one two three" and final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 3 and final.usage.output_tokens == 4


def test_raw_stream_event_sequence(relay):
    response = _post(relay.url, {"model": "remote-a", "max_tokens": 8, "stream": True,
                                 "messages": [{"role": "user", "content": "a b"}]})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    assert [e for e, _ in events] == ["message_start", "content_block_start", *["content_block_delta"] * 3,
                                      "content_block_stop", "message_delta", "message_stop"]
    assert all(data["type"] == event for event, data in events)
    start = events[0][1]["message"]
    assert start["content"] == [] and start["model"] == "remote-a" and start["stop_reason"] is None
    assert events[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert "".join(d["delta"]["text"] for e, d in events if e == "content_block_delta") == "echo: a b"
    assert events[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert events[-2][1]["usage"] == {"input_tokens": 2, "output_tokens": 3}


def test_sdk_tool_use_round_trip_plain_and_streamed(client):
    ask = [{"role": "user", "content": "tool:lookup the weather"}]
    called = client.messages.create(model="remote-a", max_tokens=64, tools=[LOOKUP], messages=ask)
    assert called.stop_reason == "tool_use" and len(called.content) == 1
    use = called.content[0]
    assert use.type == "tool_use" and use.name == "lookup" and use.id.startswith("toolu_")
    assert use.input == {"text": "tool:lookup the weather"}
    with client.messages.stream(model="remote-a", max_tokens=64, tools=[LOOKUP], tool_choice={"type": "any"},
                                messages=ask) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in streamed.content] == [("tool_use", "lookup", use.input)]
    # the result goes back in a user turn; the upstream answers the tool message it becomes
    turn = [*ask, {"role": "assistant", "content": called.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21 C"}]}]
    answered = client.messages.create(model="remote-a", max_tokens=64, tools=[LOOKUP], messages=turn)
    assert answered.stop_reason == "end_turn" and answered.content[0].text == "tool result: sunny, 21 C"
    with client.messages.stream(model="remote-a", max_tokens=64, tools=[LOOKUP], messages=turn) as stream:
        assert "".join(stream.text_stream) == "tool result: sunny, 21 C"


def test_count_tokens(client, relay):
    counted = client.messages.count_tokens(model="remote-a", messages=[{"role": "user", "content": "x" * 400}])
    assert counted.input_tokens == 400 // 4 + 4  # the estimate budgets use
    with_tools = client.messages.count_tokens(model="remote-a", tools=[LOOKUP],
                                              messages=[{"role": "user", "content": "x" * 400}])
    assert with_tools.input_tokens > counted.input_tokens
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    _error(_post(relay.url, {"model": "remote-a"}, path="/v1/messages/count_tokens"), 400, "invalid_request_error")


# ---- LangChain ------------------------------------------------------------------------------------------


def test_langchain_invoke_stream_and_bind_tools(relay):
    llm = ChatAnthropic(model="remote-a", base_url=relay.url, api_key=KEY, max_retries=0, max_tokens=64)
    answer = llm.invoke("red green")
    assert answer.content == "echo: red green"
    assert answer.usage_metadata["input_tokens"] == 2 and answer.usage_metadata["output_tokens"] == 3
    chunks = list(llm.stream("blue yellow"))
    assert "".join(c.text for c in chunks) == "echo: blue yellow"
    called = llm.bind_tools([LOOKUP]).invoke("tool:lookup prices")
    assert [(c["name"], c["args"]) for c in called.tool_calls] == [("lookup", {"text": "tool:lookup prices"})]


# ---- errors in Anthropic's shape ------------------------------------------------------------------------


def test_bad_bodies_are_400_naming_the_field(relay, client):
    for body, field in (
        ({"model": "remote-a", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        ({"model": "remote-a", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        ({"model": "remote-a", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
         "messages[0].role"),
        ({"model": "remote-a", "max_tokens": 5, "temperature": 3, "messages": [{"role": "user", "content": "x"}]},
         "temperature"),
        ({"model": "remote-a", "max_tokens": 5, "tools": [{"name": "t"}], "messages": [{"role": "user",
                                                                                           "content": "x"}]},
         "tools[0].input_schema"),
    ):
        assert f"'{field}'" in _error(_post(relay.url, body), 400, "invalid_request_error")
    _error(_post(relay.url, b"{not json"), 400, "invalid_request_error")
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="remote-a", max_tokens=5, messages=[{"role": "user", "content": "x"}],
                               extra_body={"temperature": 1.5})  # this SDK sends sampling fields as extras
    assert caught.value.status_code == 400 and caught.value.body["error"]["type"] == "invalid_request_error"


def test_auth_errors_come_from_the_guard_in_anthropic_shape(relay):
    body = {"model": "remote-a", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    _error(_post(relay.url, body, key=None), 401, "authentication_error")
    _error(_post(relay.url, body, key="wrong"), 401, "authentication_error")
    _error(_post(relay.url, body, key="wrong", path="/v1/messages/count_tokens"), 401, "authentication_error")
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=relay.url, api_key="wrong", max_retries=0).messages.create(**body)
    # a readonly key may not generate: the guard's 403
    created = httpx.post(relay.url + "/admin/keys", json={"role": "readonly"}, headers={"x-api-key": KEY})
    assert created.status_code == 201, created.text
    readonly = created.json()["key"]
    _error(_post(relay.url, body, key=readonly), 403, "permission_error")
    with pytest.raises(anthropic.PermissionDeniedError):
        anthropic.Anthropic(base_url=relay.url, api_key=readonly, max_retries=0).messages.create(**body)


def test_a_wrong_method_or_path_under_messages_is_an_anthropic_error(relay):
    """The router's own 405 and 404 under /v1/messages came in OpenAI's shape."""
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    _error(httpx.get(relay.url + "/v1/messages", headers=headers), 405, "invalid_request_error")
    message = _error(_post(relay.url, {}, path="/v1/messages/batches"), 404, "not_found_error")
    assert message == "Unknown route: POST /v1/messages/batches"


def test_model_and_upstream_errors_keep_status_and_headers(client, relay):
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert missing.value.body["error"]["type"] == "not_found_error" and "no-such-model" in str(missing.value)
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(model="faulty", max_tokens=5, messages=[{"role": "user", "content": "status:429"}])
    assert limited.value.response.headers["retry-after"] == "7"
    assert limited.value.body["error"] == {"type": "rate_limit_error", "message": "mock error 429"}
    with pytest.raises(anthropic.ServiceUnavailableError) as overloaded:
        client.messages.create(model="faulty", max_tokens=5, messages=[{"role": "user", "content": "status:503"}])
    assert overloaded.value.body["error"]["type"] == "overloaded_error"
    # streamed: the error comes before the stream starts, so as an HTTP error too
    response = _post(relay.url, {"model": "faulty", "max_tokens": 5, "stream": True,
                                 "messages": [{"role": "user", "content": "status:429"}]})
    assert _error(response, 429, "rate_limit_error") == "mock error 429"


def test_an_error_mid_stream_is_an_error_event(client, relay):
    response = _post(relay.url, {"model": "faulty", "max_tokens": 50, "stream": True,
                                 "messages": [{"role": "user", "content": "w x y z break:3"}]})
    events = _events(response.text)
    assert response.status_code == 200 and events[0][0] == "message_start"
    assert events[-1][0] == "error" and events[-1][1]["type"] == "error"
    assert events[-1][1]["error"]["type"] == "api_error" and events[-1][1]["error"]["message"]
    assert "message_stop" not in [e for e, _ in events]
    with pytest.raises(anthropic.APIStatusError), client.messages.stream(
            model="faulty", max_tokens=50, messages=[{"role": "user", "content": "w x y z break:3"}]) as stream:
        list(stream.text_stream)


# ---- routing, budgets, usage rows -----------------------------------------------------------------------


def test_auto_routing_and_a_chain(client):
    raw = client.messages.with_raw_response.create(model="auto", max_tokens=16,
                                                   messages=[{"role": "user", "content": "hello there"}])
    assert raw.headers["x-pointsman-route"] == "auto"
    assert raw.parse().model == raw.headers["x-pointsman-model"] in ("remote-a", "remote-b", "faulty")
    assert raw.parse().content[0].text == "echo: hello there"
    chained = client.messages.with_raw_response.create(model="dead:remote-b", max_tokens=16,
                                                       messages=[{"role": "user", "content": "hi"}])
    assert chained.headers["x-pointsman-route"] == "fallback" and chained.parse().model == "remote-b"
    with client.messages.stream(model="dead:remote-b", max_tokens=16,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        assert stream.get_final_message().model == "remote-b"


def test_budgets_apply_and_usage_rows_are_written(client, relay):
    with pytest.raises(anthropic.RateLimitError) as refused:  # metadata.user_id is the budget's user
        client.messages.create(model="remote-a", max_tokens=5, metadata={"user_id": CAPPED},
                               messages=[{"role": "user", "content": "x"}])
    assert refused.value.body["error"]["type"] == "rate_limit_error" and "budget" in str(refused.value).lower()
    user = "rows-" + uuid.uuid4().hex
    message = client.messages.create(model="remote-a", max_tokens=5, metadata={"user_id": user},
                                     messages=[{"role": "user", "content": "count these words"}])
    deadline, rows = time.monotonic() + 20, []
    while not rows and time.monotonic() < deadline:  # rows are written in batches, off the request path
        page = httpx.get(relay.url + "/admin/usage", params={"model": "remote-a", "limit": 200},
                         headers={"x-api-key": KEY}).json()["data"]
        rows = [r for r in page if r["user"] == user]
        if not rows:
            time.sleep(0.1)
    assert len(rows) == 1, "no usage row was written"
    row = rows[0]
    assert row["status"] == "ok" and row["model_served"] == "remote-a" and row["key_id"] == "static-0"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (message.usage.input_tokens,
                                                                message.usage.output_tokens)


# ---- the local model ------------------------------------------------------------------------------------


def test_local_model_plain_and_streamed(gateway):
    local = anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0)
    message = local.messages.create(model="smollm2-135m-instruct", max_tokens=12, extra_body={"temperature": 0},
                                    messages=QUESTION)
    assert message.model == "smollm2-135m-instruct" and "Paris" in message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 10 and 0 < message.usage.output_tokens <= 12
    with local.messages.stream(model="small", max_tokens=12, extra_body={"temperature": 0},
                               messages=QUESTION) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert "Paris" in text and final.content[0].text == text
    assert final.usage.input_tokens == message.usage.input_tokens and final.usage.output_tokens > 0


def test_local_model_tool_use_round_trip(gateway):
    """The local engine's own tool calling (a grammar holds a forced call to the schema), streamed, then a turn
    with its result."""
    local = anthropic.Anthropic(base_url=gateway.url, api_key="unused", max_retries=0)
    weather = {"name": "get_weather", "description": "Get the weather of a city.",
               "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    with local.messages.stream(model="smollm2-135m-instruct", max_tokens=40, tools=[weather],
                               tool_choice={"type": "any"}, messages=ask, extra_body={"temperature": 0}) as stream:
        called = stream.get_final_message()
    assert called.stop_reason == "tool_use"
    use = called.content[-1]
    assert use.type == "tool_use" and use.name == "get_weather" and use.id.startswith("toolu_")
    assert set(use.input) == {"city"} and isinstance(use.input["city"], str)
    answered = local.messages.create(
        model="smollm2-135m-instruct", max_tokens=8, tools=[weather], tool_choice={"type": "none"},
        extra_body={"temperature": 0}, messages=[*ask, {"role": "assistant", "content": called.content}, {
            "role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C, sunny"}]}])
    assert answered.content[0].type == "text" and answered.content[0].text.strip()
    assert answered.stop_reason in ("end_turn", "max_tokens") and answered.usage.output_tokens > 0


def test_langchain_against_the_local_model(gateway):
    """ChatAnthropic against the local SmolLM2: invoke, stream, and a forced tool call held to its schema."""
    llm = ChatAnthropic(model="smollm2-135m-instruct", base_url=gateway.url, api_key="unused", max_retries=0,
                        max_tokens=12, temperature=0)
    assert "Paris" in llm.invoke("What is the capital of France?").text
    assert "Paris" in "".join(chunk.text for chunk in llm.stream("What is the capital of France?"))
    weather = {"name": "get_weather", "description": "Get the weather of a city.",
               "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    caller = ChatAnthropic(model="smollm2-135m-instruct", base_url=gateway.url, api_key="unused", max_retries=0,
                           max_tokens=48, temperature=0)  # room for the whole call
    called = caller.bind_tools([weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert [c["name"] for c in called.tool_calls] == ["get_weather"]
    assert isinstance(called.tool_calls[0]["args"]["city"], str)
