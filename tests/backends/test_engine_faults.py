"""A client's input fails only its own request: sampling edge values, per-sequence failures in the batch, stop
strings under a grammar, unsupported schema keywords, logprobs of a stop string, cut-off tool calls."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest
import pytest_asyncio
import torch

from backends.batching import Group, Job, Scheduler
from backends.engine_requests import check_request
from backends.generation import SamplingParams, SequenceDecoder, sample_next
from backends.transformers_engine import TransformersBackend
from protocol.errors import BadRequest
from tests.backends.engines import chat, completion, tiny

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def backend(tiny_dir: Path) -> Any:
    engine = tiny(tiny_dir, max_concurrency=8)
    await engine.start()
    yield engine
    await engine.aclose()


def texts(body: bytes) -> list[str]:
    return [c.get("text", c.get("message", {}).get("content")) for c in msgspec.json.decode(body)["choices"]]


# ---- sampling inputs at the edges of their ranges --------------------------------------------------------


@pytest.mark.parametrize("seed", [2**63, 2**64, -(2**63) - 1])
async def test_a_seed_outside_int64_is_a_400_naming_it(seed: int) -> None:
    with pytest.raises(BadRequest) as err:
        chat("x", seed=seed)
    assert err.value.param == "seed"
    with pytest.raises(BadRequest):
        completion("x", seed=seed)


async def test_the_last_seeds_of_int64_wrap_around_for_later_choices(backend: TransformersBackend) -> None:
    top = await backend.complete(chat("x", seed=2**63 - 1, n=2, temperature=1, max_tokens=8, ignore_eos=True))
    bottom = await backend.complete(chat("x", seed=-(2**63), temperature=1, max_tokens=8, ignore_eos=True))
    assert texts(top)[1] == texts(bottom)[0]  # choice 1's seed is 2**63, folded onto -2**63


async def test_a_vanishing_temperature_samples_the_argmax() -> None:
    logits = torch.tensor([1.0, 5.0, -3.0, 4.9])
    generator = torch.Generator().manual_seed(0)
    for temperature in (1e-38, 1e-45, 1e-7):
        params = SamplingParams(max_new_tokens=1, temperature=temperature)
        assert sample_next(logits.clone(), params, generator, None) == 1


@pytest.mark.parametrize("penalty", [1e-40, 1e40])
async def test_an_extreme_repetition_penalty_still_samples(penalty: float) -> None:
    logits = torch.tensor([3.0, -2.0, float("-inf"), 1.0])
    params = SamplingParams(max_new_tokens=1, temperature=1.0, repetition_penalty=penalty)
    seen = torch.tensor([0, 1, 2])
    token = sample_next(logits.clone(), params, torch.Generator().manual_seed(0), seen)
    assert token != 2  # a token masked to -inf stays out


async def test_edge_sampling_values_answer_through_the_engine(backend: TransformersBackend) -> None:
    greedy = texts(await backend.complete(chat("x", temperature=0, max_tokens=8, ignore_eos=True)))
    cold = texts(await backend.complete(chat("x", temperature=1e-38, max_tokens=8, ignore_eos=True)))
    assert cold == greedy
    body = await backend.complete(chat("x", temperature=1, repetition_penalty=1e-40, max_tokens=8, ignore_eos=True))
    assert msgspec.json.decode(body)["usage"]["completion_tokens"] == 8


# ---- one sequence's failure ends its request only --------------------------------------------------------


class _Exploding:
    """A decoder whose push raises once it has produced `after` tokens."""

    def __init__(self, inner: Any, after: int) -> None:
        self.inner, self.after = inner, after

    @property
    def token(self) -> int:
        return self.inner.token

    def push(self, logits: torch.Tensor) -> bool:
        if self.inner.count >= self.after:
            raise RuntimeError("invalid distribution to sample from")
        return self.inner.push(logits)

    def cancel(self) -> None:
        self.inner.cancel()

    def result(self) -> Any:
        return self.inner.result()


class _Faulty:
    """The tiny engine, except that the sequences of `bad` jobs fail: their decoder when made (`at_start`) or
    their push after two tokens. The first prefill waits for `gate`, so all requests are submitted by then."""

    def __init__(self, engine: Any, at_start: bool) -> None:
        self.engine, self.batchable, self.at_start = engine, True, at_start
        self.bad: set[int] = set()
        self.gate = threading.Event()

    def prefill(self, prompts: list[list[int]]) -> Any:
        assert self.gate.wait(30)
        return self.engine.prefill(prompts)

    def decode(self, *args: Any) -> Any:
        return self.engine.decode(*args)

    def decoder(self, job: Job, on_text: Any) -> Any:
        if id(job) in self.bad and self.at_start:
            raise ValueError("the prefix does not fit the grammar")
        inner = self.engine.decoder(job, on_text)
        return _Exploding(inner, 2) if id(job) in self.bad else inner


@pytest.mark.parametrize("at_start", [False, True], ids=["in-push", "in-decoder"])
async def test_one_sequence_failing_ends_only_its_request(backend: TransformersBackend, at_start: bool) -> None:
    model = _Faulty(backend._engine, at_start)
    scheduler = Scheduler(model, max_concurrency=4, max_queue=4, name="faulty")
    prepare = backend._engine.prepare
    victim_jobs, _ = prepare(check_request(chat("victim", max_tokens=60, ignore_eos=True)))
    bad_jobs, _ = prepare(check_request(chat("attacker", n=2, max_tokens=60, ignore_eos=True)))
    model.bad = {id(bad_jobs[0])}  # one choice of two fails: its sibling leaves with it
    done = {"victim": 0, "attacker": 0}
    finished = threading.Event()

    def on_done(name: str) -> None:
        done[name] += 1
        if done["victim"] and done["attacker"]:
            finished.set()

    victim = Group(victim_jobs, None, lambda: on_done("victim"))
    attacker = Group(bad_jobs, None, lambda: on_done("attacker"))
    try:
        scheduler.submit(victim)
        scheduler.submit(attacker)
        model.gate.set()
        assert await asyncio.to_thread(finished.wait, 30)
        assert isinstance(attacker.error, ValueError if at_start else RuntimeError)
        assert victim.error is None
        assert victim.ordered_results()[0].completion_tokens == 60
        assert victim.ordered_results()[0].finish_reason == "length"
        assert done == {"victim": 1, "attacker": 1}
    finally:
        await asyncio.to_thread(scheduler.close)
    assert scheduler.running == 0 and scheduler.waiting == 0


# ---- stop strings never cut grammar-held output ----------------------------------------------------------

ROME = {"type": "object", "properties": {"city": {"enum": ["Rome"]}}, "required": ["city"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": ROME}}]


@pytest.mark.parametrize("stop", [["Rome"], ["\n"], ['"']])
async def test_a_stop_string_does_not_cut_a_required_call(backend: TransformersBackend, stop: list[str]) -> None:
    body = msgspec.json.decode(await backend.complete(
        chat("weather?", tools=TOOLS, tool_choice="required", max_tokens=200, stop=stop)))
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and not choice["message"].get("content")
    assert choice["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Rome"}'


async def test_a_stop_string_does_not_cut_a_json_answer(backend: TransformersBackend) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "c", "schema": ROME, "strict": True}}
    body = msgspec.json.decode(await backend.complete(
        chat("city?", response_format=fmt, max_tokens=200, stop=["Rome", "{"])))
    assert body["choices"][0]["message"]["content"] == '{"city": "Rome"}'
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_stop_strings_apply_only_before_the_grammar_takes_hold() -> None:
    from backends.generation import StopChecker

    free = StopChecker(["Rome"], until="<tool_")
    assert free.push("in Ro") == ("in ", False)
    assert free.push("me") == ("", True)
    held = StopChecker(["Rome", "\n"], until="<tool_")
    out = [held.push(piece) for piece in ["ok <to", "ol_call>\n", '{"city": "Ro', 'me"}']]
    assert "".join(text for text, _ in out) + held.flush() == 'ok <tool_call>\n{"city": "Rome"}'
    assert not any(matched for _, matched in out)


# ---- strict schemas: what the grammar cannot hold is refused ---------------------------------------------


@pytest.mark.parametrize(("schema", "keyword"), [
    ({"allOf": [{"type": "object"}, {"type": "object"}]}, "allOf"),
    ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}, "uniqueItems"),
    ({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 7}}}, "multipleOf"),
    ({"anyOf": []}, "anyOf"),
    ({"oneOf": []}, "oneOf"),
    ({"type": "object", "properties": {"v": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}}, "oneOf"),
    ({"type": "array", "items": {"not": {"type": "string"}}}, "not"),
])
async def test_strict_schema_keywords_the_grammar_ignores_are_a_400(schema: dict, keyword: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    with pytest.raises(BadRequest) as err:
        check_request(chat("x", response_format=fmt))
    assert err.value.param == "response_format" and f"'{keyword}" in err.value.message
    loose = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert check_request(chat("x", response_format=loose)).grammar is not None  # not strict: best effort


async def test_a_property_named_like_a_keyword_is_no_keyword() -> None:
    schema = {"type": "object", "properties": {"allOf": {"type": "string"}, "not": {"anyOf": [{"type": "integer"}]}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert check_request(chat("x", response_format=fmt)).grammar is not None


# ---- logprobs describe exactly the returned text ---------------------------------------------------------


async def test_logprobs_stop_where_the_text_stops(backend: TransformersBackend) -> None:
    # the tiny model repeats one character: with min_tokens 3 and that character twice as the stop string,
    # the fifth token completes the stop string and the answer is the first three
    for make, field in ((completion, 0), (chat, True)):
        plain = msgspec.json.decode(await backend.complete(make("abc", max_tokens=6, ignore_eos=True)))
        char = texts(msgspec.json.encode(plain))[0][0]
        body = msgspec.json.decode(await backend.complete(
            make("abc", max_tokens=30, ignore_eos=True, min_tokens=3, stop=[char * 2], logprobs=field)))
        choice = body["choices"][0]
        text = choice.get("text", choice.get("message", {}).get("content"))
        assert text == char * 3 and choice["finish_reason"] == "stop"
        if make is completion:
            assert "".join(choice["logprobs"]["tokens"]) == text
            assert all(offset < len(text) for offset in choice["logprobs"]["text_offset"])
        else:
            assert "".join(t["token"] for t in choice["logprobs"]["content"]) == text


class Words:
    """A detokenizer over a word list: token i's text is words[i]."""

    def __init__(self, words: list[str]) -> None:
        self.words = words

    def push(self, token: int) -> str:
        return self.words[token]

    def flush(self) -> str:
        return ""


@pytest.mark.parametrize(("stop", "text", "kept"), [("al o", "The capit", 1), ("France is", "The capital of ", 3)])
async def test_a_token_that_a_stop_string_cuts_has_no_logprob_though_its_start_went_out_first(
        stop: str, text: str, kept: int) -> None:
    """The token whose text runs into the stop string is cut with it, also when the part of its text before the
    stop string was released a step earlier, while the rest was held back as a possible stop string (its logprob
    went out with that part: ' capital' with 'The capit', ' France' with 'The capital of ')."""
    words = ["The", " capital", " of", " France", " is", "<eos>"]
    streamed: list[tuple[str, list[int]]] = []
    decoder = SequenceDecoder([0], SamplingParams(max_new_tokens=10, stop=(stop,), logprobs=0), frozenset({5}),
                              Words(words),  # type: ignore[arg-type]
                              on_text=lambda piece, entries: streamed.append((piece, [e.token for e in entries])))
    for token in range(5):
        logits = torch.full((len(words),), -5.0)
        logits[token] = 5.0
        if not decoder.push(logits):
            break
    result = decoder.result()
    assert (result.text, result.finish_reason) == (text, "stop")
    assert [e.token for e in result.logprobs or []] == list(range(kept))
    # streamed: each piece carries the tokens whose text it completes, never one whose text goes on further
    assert "".join(piece for piece, _ in streamed) == text
    assert [t for _, tokens in streamed for t in tokens] == list(range(kept))
    out, covered = "", ""
    for piece, tokens in streamed:
        out += piece
        covered += "".join(words[t] for t in tokens)
        assert out.startswith(covered)


# ---- call markup never reaches the client as text --------------------------------------------------------


@pytest.mark.parametrize("tail", ["<tool_", "<tool_call>", '<tool_call>\n{"name": "get_'])
async def test_a_call_cut_before_its_name_is_not_content(tail: str) -> None:
    from backends.tool_format import ToolCallParser

    parser = ToolCallParser()
    events = parser.push("Sure. " + tail) + parser.flush()
    assert "".join(e[1] for e in events if e[0] == "content") == "Sure. "
    assert not parser.calls


async def test_max_tokens_inside_a_required_call_leaks_no_markup(backend: TransformersBackend) -> None:
    for max_tokens in (3, 8, 14):
        request = chat("weather?", tools=TOOLS, tool_choice="required", max_tokens=max_tokens)
        choice = msgspec.json.decode(await backend.complete(request))["choices"][0]
        assert choice["finish_reason"] == "length" and not choice["message"].get("content")
        chunks = [msgspec.json.decode(c) async for c in backend.stream(
            chat("weather?", tools=TOOLS, tool_choice="required", max_tokens=max_tokens, stream=True))]
        assert not any(ch["delta"].get("content") for c in chunks for ch in c["choices"])


class _FailFirst(_Faulty):
    def decoder(self, job: Any, on_text: Any) -> Any:
        inner = self.engine.decoder(job, on_text)
        return _Exploding(inner, 0) if id(job) in self.bad else inner  # raises on its first push (its prefill)


async def test_a_request_failed_in_one_prefill_part_leaves_no_row_in_the_next(backend: Any) -> None:
    """Prompts of different lengths are prefilled in parts: one failing in the first part ended its request, and
    its long sibling, prefilled in the second part all the same, sat in the batch never sampled (token -1), so the
    next decode step failed every request in it (here an unrelated one)."""
    model = _FailFirst(backend._engine, False)
    scheduler = Scheduler(model, max_concurrency=8, max_queue=8, name="orphan")
    prepare = backend._engine.prepare
    victim_jobs, _ = prepare(check_request(chat("victim", max_tokens=40, ignore_eos=True)))
    jobs, _ = prepare(check_request(completion(["x", "x", "x", "y " * 300], max_tokens=40, ignore_eos=True)))
    model.bad = {id(jobs[0])}
    done = {"victim": threading.Event(), "failing": threading.Event()}
    victim, failing = Group(victim_jobs, None, done["victim"].set), Group(jobs, None, done["failing"].set)
    try:
        scheduler.submit(victim)
        scheduler.submit(failing)
        model.gate.set()
        assert await asyncio.to_thread(done["failing"].wait, 30) and failing.error is not None
        assert await asyncio.to_thread(done["victim"].wait, 30)
        assert victim.error is None
    finally:
        await asyncio.to_thread(scheduler.close)
