"""Grammar-constrained decoding, tool calls and logprobs on a tiny random Llama: a model that knows nothing still
writes valid JSON and valid calls, batched rows keep their own grammars, logprobs are the model's own."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
import pytest_asyncio
import torch

from backends.engine_requests import check_request
from backends.generation import IncrementalDetokenizer, decode
from backends.transformers_engine import TransformersBackend
from config.schema import TransformersModel
from protocol.errors import BadRequest, UnsupportedParameter
from protocol.openai import ChatCompletionRequest, ParsedRequest, decode_request
from tests.backends.engines import chat, completion, tiny
from tests.spec.openai import validate

pytestmark = pytest.mark.asyncio(loop_scope="session")

# bounded, so that a random model ends it within max_tokens (one byte per token)
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"enum": ["a", "bc"]}, "maxItems": 3},
}, "required": ["name", "age", "ok", "tags"]}
ROOM = {"type": "object", "properties": {"room": {"enum": ["kitchen", "hall"]}, "level": {"type": "integer",
        "minimum": 0, "maximum": 9}}, "required": ["room", "level"]}
TOOLS = [
    {"type": "function", "function": {"name": "set_light", "description": "Switch a light", "parameters": ROOM}},
    {"type": "function", "function": {"name": "ping"}},
]
WORD = {"type": "object", "properties": {"w": {"type": "string", "pattern": "^[a-z]{3,9}$"}}, "required": ["w"]}
WORD_FORMAT = {"type": "json_schema", "json_schema": {"name": "word", "schema": WORD}}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def backend(tiny_dir: Path) -> Any:
    engine = tiny(tiny_dir, context_window=4096, max_concurrency=16)
    await engine.start()
    yield engine
    await engine.aclose()


async def answer(backend: TransformersBackend, request: ParsedRequest) -> dict[str, Any]:
    return msgspec.json.decode(await backend.complete(request))


async def chunks(backend: TransformersBackend, request: ParsedRequest) -> list[dict[str, Any]]:
    return [msgspec.json.decode(c) async for c in backend.stream(request)]


# ---- structured outputs ---------------------------------------------------------------------------------


async def test_a_random_model_writes_json_that_validates(backend: TransformersBackend) -> None:
    requests = [chat(f"person {i}", response_format=PERSON_FORMAT, temperature=1.0, seed=10 * i, n=4,
                     max_tokens=150)
                for i in range(6)]
    bodies = await asyncio.gather(*(answer(backend, r) for r in requests))
    contents = [c["message"]["content"] for body in bodies for c in body["choices"]]
    assert len(contents) == 24 and len(set(contents)) > 12  # sampled: different objects, each one valid
    for body in bodies:
        validate(body, "CreateChatCompletionResponse")
        assert {c["finish_reason"] for c in body["choices"]} == {"stop"}
    for content in contents:
        jsonschema.validate(json.loads(content), PERSON)
        assert list(json.loads(content)) == list(PERSON["properties"])  # the schema's order, no extra keys


async def test_constrained_and_free_rows_share_a_batch_and_decode_as_alone(backend: TransformersBackend) -> None:
    engine = backend._engine

    def forward(ids: torch.Tensor, cache: Any) -> torch.Tensor:
        return engine.lm(input_ids=ids, use_cache=True, **{engine._cache_kw: cache}).logits[0, -1]

    def alone(request: ParsedRequest) -> list[tuple[str, str]]:
        jobs, _ = engine.prepare(check_request(request))
        return [(r.text, r.finish_reason) for r in (
            decode(forward, engine._new_cache, job.prompt_ids, job.params, engine.eos_ids,
                   IncrementalDetokenizer(engine.tokenizer), threading.Event(),
                   constraint=engine.grammars.constraint(job.grammar) if job.grammar is not None else None)
            for job in jobs)]

    requests = [
        chat("free", max_tokens=40, ignore_eos=True),
        chat("json", response_format=PERSON_FORMAT, temperature=0.8, seed=3, n=2, max_tokens=150),
        chat("call", tools=TOOLS, tool_choice="required", max_tokens=160),
        chat("free sampled", temperature=1.0, seed=9, max_tokens=30),
    ]
    expected = [alone(r) for r in requests]
    bodies = await asyncio.gather(*(answer(backend, r) for r in requests))
    got = [[(c["message"]["content"], c["finish_reason"]) for c in body["choices"]] for body in bodies]
    calls = bodies[2]["choices"][0]["message"]["tool_calls"]
    got[2] = [(expected[2][0][0], "stop")] if calls else got[2]  # the call is checked as text just below
    assert got == expected
    call = calls[0]["function"]
    text = f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {call["arguments"]}}}\n</tool_call>'
    assert expected[2][0][0] == text


async def test_a_continued_answer_stays_under_its_grammar(backend: TransformersBackend) -> None:
    def continued(prefix: str, **fields: Any) -> ParsedRequest:
        messages = [{"role": "user", "content": "w"}, {"role": "assistant", "content": prefix}]
        raw = {"model": "tiny", "messages": messages, "continue_final_message": True,
               "add_generation_prompt": False, "max_tokens": 30, **fields}
        return decode_request(msgspec.json.encode(raw), ChatCompletionRequest)

    body = await answer(backend, continued('{"w": "ab', response_format=WORD_FORMAT, temperature=1.0, seed=2))
    jsonschema.validate(json.loads('{"w": "ab' + body["choices"][0]["message"]["content"]), WORD)
    with pytest.raises(BadRequest) as err:  # a prefix the grammar cannot start with
        await backend.complete(continued('{"x": ', response_format=WORD_FORMAT))
    assert err.value.param == "messages"
    with pytest.raises(UnsupportedParameter):
        check_request(continued("<tool_call>", tools=TOOLS))


# ---- tool calls -----------------------------------------------------------------------------------------


def arguments_valid(name: str, arguments: str) -> None:
    schema = ROOM if name == "set_light" else {"type": "object", "properties": {}, "additionalProperties": False}
    jsonschema.validate(json.loads(arguments), schema)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "set_light"}}])
async def test_forced_calls_are_valid(backend: TransformersBackend, choice: Any) -> None:
    requests = [chat(f"light {i}", tools=TOOLS, tool_choice=choice, temperature=1.0, seed=10 * i, n=4,
                     max_tokens=160)
                for i in range(4)]
    for body in await asyncio.gather(*(answer(backend, r) for r in requests)):
        validate(body, "CreateChatCompletionResponse")
        for c in body["choices"]:
            assert c["finish_reason"] == "tool_calls" and c["message"]["content"] is None
            (call,) = c["message"]["tool_calls"]
            assert call["id"].startswith("call_") and call["type"] == "function"
            if isinstance(choice, dict):
                assert call["function"]["name"] == "set_light"
            arguments_valid(call["function"]["name"], call["function"]["arguments"])


async def test_auto_with_a_json_answer_is_a_call_or_that_json(backend: TransformersBackend) -> None:
    requests = [chat(f"either {i}", tools=TOOLS, response_format=PERSON_FORMAT, temperature=1.0, seed=7 * i,
                     max_tokens=160) for i in range(8)]
    # whichever the model picks, it is whole and valid
    for body in await asyncio.gather(*(answer(backend, r) for r in requests)):
        (choice,) = body["choices"]
        if choice["message"].get("tool_calls"):
            assert choice["finish_reason"] == "tool_calls"
            function = choice["message"]["tool_calls"][0]["function"]
            arguments_valid(function["name"], function["arguments"])
        else:
            assert choice["finish_reason"] == "stop"
            jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)


async def test_a_streamed_call_comes_in_openai_deltas(backend: TransformersBackend) -> None:
    request = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "set_light"}}, stream=True,
                   max_tokens=160, stream_options={"include_usage": True})
    events = await chunks(backend, request)
    for event in events:
        validate(event, "CreateChatCompletionStreamResponse")
    *deltas, last, usage = [e for e in events]
    first = deltas[0]["choices"][0]["delta"]
    assert first["role"] == "assistant" and first["content"] is None
    (opening,) = first["tool_calls"]
    assert opening["index"] == 0 and opening["id"].startswith("call_") and opening["type"] == "function"
    assert opening["function"] == {"name": "set_light", "arguments": ""}
    pieces = []
    for event in deltas[1:]:
        delta = event["choices"][0]["delta"]
        assert set(delta) == {"tool_calls"} and len(delta["tool_calls"]) == 1
        (piece,) = delta["tool_calls"]
        assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
        pieces.append(piece["function"]["arguments"])
    assert len(pieces) > 3  # the arguments stream, they do not come in one piece
    arguments_valid("set_light", "".join(pieces))
    assert last["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "tool_calls", "logprobs": None}
    assert usage["usage"]["completion_tokens"] > len(pieces)
    plain = await answer(backend, chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "set_light"}},
                                       max_tokens=160))
    assert plain["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == "".join(pieces)


async def test_tool_choice_none_and_past_calls(backend: TransformersBackend) -> None:
    messages = [
        {"role": "user", "content": "light?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "set_light", "arguments": '{"room": "hall"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "done"},
    ]
    raw = {"model": "tiny", "messages": messages, "tools": TOOLS, "tool_choice": "none", "max_tokens": 5,
           "ignore_eos": True}
    request = decode_request(msgspec.json.encode(raw), ChatCompletionRequest)
    body = await answer(backend, request)
    assert body["choices"][0]["finish_reason"] == "length" and "tool_calls" not in body["choices"][0]["message"]
    jobs, _ = backend._engine.prepare(check_request(request))
    prompt = backend._engine.tokenizer.decode(jobs[0].prompt_ids)
    assert '<tool_call>\n{"name": "set_light", "arguments": {"room": "hall"}}\n</tool_call>' in prompt
    assert "<|im_start|>user\n<tool_response>\ndone\n</tool_response>" in prompt
    assert "<tools>" not in prompt  # none: the definitions stay out


async def test_a_template_that_knows_tools_renders_them(tiny_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tools-template"
    shutil.copytree(tiny_dir, folder)
    (folder / "chat_template.jinja").write_text(
        "{% if tools %}TOOLS:{% for t in tools %}{{ t['function']['name'] }};{% endfor %}\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% for c in m.get('tool_calls') or [] %}"
        "CALL {{ c['function']['name'] }} {{ c['function']['arguments']['room'] }}"
        "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    backend = TransformersBackend(TransformersModel(id="native", source=str(folder)))
    await backend.start()
    try:
        raw = {"model": "native", "tools": TOOLS, "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
                "name": "set_light", "arguments": '{"room": "hall", "level": 1}'}}]},
            {"role": "tool", "tool_call_id": "c", "content": "ok"}]}
        plan = check_request(decode_request(msgspec.json.encode(raw), ChatCompletionRequest))
        jobs, _ = await asyncio.to_thread(backend._engine.prepare, plan)
        prompt = backend._engine.tokenizer.decode(jobs[0].prompt_ids)
        assert prompt.startswith("TOOLS:set_light;ping;<|im_start|>user") and "CALL set_light hall" in prompt
        assert "<|im_start|>tool\nok" in prompt and "<tools>" not in prompt
    finally:
        await backend.aclose()


# ---- logprobs -------------------------------------------------------------------------------------------


def reference_logprobs(backend: TransformersBackend, prompt_ids: list[int], tokens: list[int]) -> torch.Tensor:
    """log-softmax of the model over the whole sequence at once: row i is the distribution of tokens[i]."""
    lm = backend._engine.lm
    with torch.inference_mode():
        logits = lm(input_ids=torch.tensor([prompt_ids + tokens])).logits[0, len(prompt_ids) - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1)


async def test_chat_logprobs_are_the_models_own(backend: TransformersBackend) -> None:
    # ASCII (a random model writes any bytes otherwise), and a grammar: logprobs are from before its mask
    fields = {"logprobs": True, "top_logprobs": 3, "temperature": 0.7, "seed": 1, "max_tokens": 40,
              "response_format": WORD_FORMAT}
    request = chat("abc", **fields)
    body = await answer(backend, request)
    validate(body, "CreateChatCompletionResponse")
    choice = body["choices"][0]
    entries = choice["logprobs"]["content"]
    assert choice["finish_reason"] == "stop" and choice["logprobs"]["refusal"] is None
    assert len(entries) == body["usage"]["completion_tokens"] - 1  # all but the eos
    assert b"".join(bytes(e["bytes"]) for e in entries).decode() == choice["message"]["content"]
    ids = {b: i for i, b in enumerate(backend._engine.token_bytes or [])}  # the tiny vocabulary: one byte each
    tokens = [ids[bytes(e["bytes"])] for e in entries]
    jobs, _ = backend._engine.prepare(check_request(request))
    reference = reference_logprobs(backend, jobs[0].prompt_ids, tokens)
    for row, entry, token in zip(reference, entries, tokens, strict=True):
        assert entry["logprob"] == pytest.approx(float(row[token]), abs=1e-4)
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    streamed = await chunks(backend, chat("abc", stream=True, **fields))
    for event in streamed:
        validate(event, "CreateChatCompletionStreamResponse")
    pieces = [e["choices"][0] for e in streamed if e["choices"][0]["delta"].get("content")]
    assert [t for p in pieces for t in p["logprobs"]["content"]] == entries
    for piece in pieces:  # each chunk carries the logprobs of the tokens that made its text
        assert b"".join(bytes(t["bytes"]) for t in piece["logprobs"]["content"]).decode() == piece["delta"]["content"]


async def test_completion_logprobs_in_the_legacy_shape(backend: TransformersBackend) -> None:
    body = await answer(backend, completion("hello", logprobs=2, max_tokens=6, ignore_eos=True))
    validate(body, "CreateCompletionResponse")
    choice = body["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"] or "\ufffd" in "".join(logprobs["tokens"])
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["text_offset"]) == 6
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
    assert all(lp <= max(top.values()) + 1e-6 for lp, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"],
                                                                 strict=True))
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
    events = await chunks(backend, completion("hello", logprobs=2, max_tokens=6, ignore_eos=True, stream=True))
    streamed = [e["choices"][0]["logprobs"] for e in events if e["choices"][0]["logprobs"]]
    assert [t for s in streamed for t in s["tokens"]] == logprobs["tokens"]
    assert [o for s in streamed for o in s["text_offset"]] == logprobs["text_offset"]


# ---- compile: off the event loop, cached, 400 on a schema it cannot take ---------------------------------


async def test_grammars_compile_in_the_worker_and_are_cached(backend: TransformersBackend) -> None:
    grammars = backend._engine.grammars
    threads: list[str] = []
    original = grammars._compile

    def spy(spec: dict) -> Any:
        threads.append(threading.current_thread().name)
        return original(spec)

    grammars._compile = spy  # type: ignore[method-assign]
    try:
        schema = {"type": "object", "properties": {"cached": {"type": "boolean"}}, "required": ["cached"]}
        fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}
        for _ in range(3):
            body = await answer(backend, chat(response_format=fmt, max_tokens=20))
            assert json.loads(body["choices"][0]["message"]["content"]) in ({"cached": True}, {"cached": False})
    finally:
        del grammars._compile
    assert len(threads) == 1 and threads[0].startswith("engine-tiny") and threads[0] != threading.main_thread().name


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
         "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string",
                                                                                  "pattern": "(("}}}],
          "tool_choice": "required"}, "tools"),
    ],
)
async def test_a_schema_it_cannot_compile_is_a_400(backend: TransformersBackend, fields: dict, param: str) -> None:
    with pytest.raises(BadRequest) as err:
        await backend.complete(chat(**fields))
    assert err.value.param == param and "/project/" not in err.value.message


@pytest.mark.parametrize(
    ("fields", "param", "unsupported"),
    [
        ({"top_logprobs": 2}, "top_logprobs", False),
        ({"logprobs": 1}, "logprobs", False),
        ({"logprobs": True, "tools": TOOLS}, "logprobs", True),
        ({"response_format": {"type": "xml"}}, "response_format", True),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}},
         "response_format.json_schema", False),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": []}}},
         "response_format.json_schema.schema", False),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}, {"role": "user", "content": "y",
          "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
         "messages[1].tool_calls", False),
        ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f",
                                                                                     "arguments": {}}}]}]},
         "messages[0].tool_calls[0].function.arguments", False),
    ],
)
async def test_request_checks(fields: dict, param: str, unsupported: bool) -> None:
    raw = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], **fields}
    with pytest.raises(BadRequest) as err:
        check_request(decode_request(msgspec.json.encode(raw), ChatCompletionRequest))
    assert err.value.param == param and isinstance(err.value, UnsupportedParameter) == unsupported


@pytest.mark.parametrize(("fields", "param"), [({"logprobs": 6}, "logprobs"), ({"logprobs": True}, "logprobs"),
                                               ({"logprobs": 1, "echo": True}, "logprobs")])
async def test_completion_logprobs_checks(fields: dict, param: str) -> None:
    with pytest.raises(BadRequest) as err:
        check_request(completion("x", **fields))
    assert err.value.param == param
