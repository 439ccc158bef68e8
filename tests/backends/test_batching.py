"""Continuous batching (backends/batching.py) on a tiny real Llama: batched equals alone, cancel, overload."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
import pytest_asyncio
import torch

from backends.batching import Group, Job, KVBatch, Scheduler
from backends.engine_requests import check_request
from backends.generation import DecodeResult, IncrementalDetokenizer, decode
from backends.transformers_engine import TransformersBackend
from protocol.errors import EngineOverloaded, GatewayError, ServiceUnavailable
from protocol.openai import ParsedRequest
from tests.backends.engines import chat, completion, tiny

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def backend(tiny_dir: Path) -> Any:
    engine = tiny(tiny_dir, max_concurrency=8)
    await engine.start()
    yield engine
    await engine.aclose()


def alone(backend: TransformersBackend, request: ParsedRequest) -> list[DecodeResult]:
    """The reference: each choice decoded by itself with generation.decode, no batch, no padding."""
    engine = backend._engine

    def forward(ids: torch.Tensor, cache: Any) -> torch.Tensor:
        return engine.lm(input_ids=ids, use_cache=True, **{engine._cache_kw: cache}).logits[0, -1]

    jobs, _ = engine.prepare(check_request(request))
    return [
        decode(forward, engine._new_cache, job.prompt_ids, job.params, engine.eos_ids,
               IncrementalDetokenizer(engine.tokenizer), threading.Event())
        for job in jobs
    ]


def choices(body: bytes) -> list[tuple[str, str]]:
    decoded = msgspec.json.decode(body)
    return [(c.get("text", c.get("message", {}).get("content")), c["finish_reason"]) for c in decoded["choices"]]


async def until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Wait for a condition the scheduler's thread makes true."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.002)


# ---- the padded cache -----------------------------------------------------------------------------------


def fake_cache(lengths: list[int], fill: float, layers: int = 2) -> tuple[SimpleNamespace, torch.Tensor]:
    """Rows left-padded like a prefill's: keys/values [rows, heads=1, T, head_dim=2], `fill` + row on real
    positions, 0 on padding; and the mask."""
    width = max(lengths)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    kv = (mask * (fill + torch.arange(len(lengths))[:, None]))[:, None, :, None].expand(-1, 1, -1, 2).float()
    return SimpleNamespace(layers=[SimpleNamespace(keys=kv.clone(), values=kv.clone()) for _ in range(layers)]), mask


async def test_kv_batch_pads_left_and_trims_what_no_row_uses() -> None:
    batch = KVBatch()
    first, mask = fake_cache([3], 1.0)
    batch.add(first, mask)
    assert batch.cache is first and batch.rows == 1  # the first rows are adopted, not copied
    batch.add(*fake_cache([5, 2], 2.0))
    assert batch.mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]
    assert batch.positions.tolist() == [3, 5, 2]
    keys = batch.cache.layers[1].keys
    assert keys.shape == (3, 1, 5, 2)
    assert keys[0, 0, :, 0].tolist() == [0, 0, 1, 1, 1] and keys[2, 0, :, 0].tolist() == [0, 0, 0, 3, 3]
    batch.keep([2, 0])  # the longest row leaves: two columns only padding used go too
    assert batch.mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert batch.positions.tolist() == [2, 3]
    assert batch.cache.layers[0].values[:, 0, :, 1].tolist() == [[0, 3, 3], [1, 1, 1]]
    batch.add(*fake_cache([4], 7.0))  # longer than the batch: the batch is padded to it
    assert batch.mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]]
    batch.keep([])
    assert batch.rows == 0 and batch.cache is None


# ---- batched equals alone -------------------------------------------------------------------------------


async def test_sequences_joining_a_running_batch_decode_as_they_would_alone(backend: TransformersBackend) -> None:
    scheduler = backend._scheduler
    long = chat("hi", max_tokens=1000, ignore_eos=True)
    joiners = [
        # longer than the running row: the batch is padded to it
        completion("a much longer prompt than the first one, so the batch must pad to it " * 2, max_tokens=25,
                   ignore_eos=True),
        # shorter: the newcomer is padded; sampled with its own seed; n=2 makes two sequences
        chat("yo", temperature=0.9, top_p=0.9, seed=5, n=2, max_tokens=30),
        chat("repeat", temperature=0, repetition_penalty=1.3, max_tokens=12, stop=["e"]),
    ]
    expected = [alone(backend, r) for r in [long, *joiners]]
    steps_before = scheduler.steps
    first = asyncio.create_task(backend.complete(long))
    await until(lambda: scheduler.running == 1 and scheduler.steps > steps_before + 3, "the first row decoding")
    rest = await asyncio.gather(*(backend.complete(r) for r in joiners))
    assert not first.done()  # the others joined while it ran
    bodies = [await first, *rest]
    for body, reference in zip(bodies, expected, strict=True):
        assert choices(body) == [(r.text, r.finish_reason) for r in reference]
        usage = msgspec.json.decode(body)["usage"]
        assert usage["completion_tokens"] == sum(r.completion_tokens for r in reference)
    tokens = sum(r.completion_tokens for reference in expected for r in reference)
    # the rows shared forward passes: fewer decode steps than tokens decoded one sequence at a time
    assert scheduler.steps - steps_before < tokens - len(expected) - 30
    await until(lambda: backend.stats().running == 0, "the batch emptied")
    assert scheduler._batch.rows == 0


async def test_streams_in_one_batch_end_independently(backend: TransformersBackend) -> None:
    requests = [chat(f"stream {i}", max_tokens=4 + 7 * i, ignore_eos=True, stream=True) for i in range(3)]

    async def collect(request: ParsedRequest) -> tuple[str, str]:
        events = [msgspec.json.decode(c) async for c in backend.stream(request)]
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        return text, events[-1]["choices"][0]["finish_reason"]

    got = await asyncio.gather(*(collect(r) for r in requests))
    assert got == [(r[0].text, "length") for r in (alone(backend, chat(f"stream {i}", max_tokens=4 + 7 * i,
                                                                      ignore_eos=True)) for i in range(3))]
    stats = backend.stats()
    assert stats.tokens_per_s is not None and stats.tokens_per_s > 0


async def test_the_choices_of_one_prompt_share_its_prefill(backend: TransformersBackend) -> None:
    engine = backend._engine
    prefilled: list[int] = []
    original = engine.prefill

    def spy(prompts: list[list[int]]) -> Any:
        prefilled.append(len(prompts))
        return original(prompts)

    engine.prefill = spy
    try:
        request = chat("one prompt, three choices", temperature=0.9, seed=4, n=3, max_tokens=10, ignore_eos=True)
        body = await backend.complete(request)
    finally:
        del engine.prefill
    assert prefilled == [1]  # one row computed, copied for each choice
    assert choices(body) == [(r.text, r.finish_reason) for r in alone(backend, request)]
    assert len({text for text, _ in choices(body)}) == 3  # each choice sampled with its own seed


# ---- cancellation -----------------------------------------------------------------------------------------


async def test_a_disconnected_stream_leaves_the_batch(backend: TransformersBackend) -> None:
    stay = asyncio.create_task(backend.complete(chat("stay", max_tokens=200, ignore_eos=True)))
    leave = backend.stream(chat("leave", max_tokens=20_000, ignore_eos=True, stream=True))
    for _ in range(3):
        await leave.__anext__()
    await until(lambda: backend.stats().running == 2, "both rows running")
    await leave.aclose()  # the client disconnected
    await until(lambda: backend.stats().running == 1, "the closed stream's row freed")
    assert not stay.done()
    assert choices(await stay) == [(r.text, r.finish_reason) for r in alone(backend, chat("stay", max_tokens=200,
                                                                                          ignore_eos=True))]


async def test_a_cancelled_completion_frees_its_slot(backend: TransformersBackend) -> None:
    task = asyncio.create_task(backend.complete(chat("cancel me", max_tokens=20_000, ignore_eos=True)))
    await until(lambda: backend.stats().running == 1, "the request running")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: backend.stats().running == 0, "its slot freed")
    assert backend.stats().kv_cache_usage == 0.0


# ---- backpressure -----------------------------------------------------------------------------------------


async def test_overload_gives_429_and_a_cancelled_waiter_leaves_the_queue(tiny_dir: Path) -> None:
    backend = tiny(tiny_dir, max_concurrency=1, max_queue=1)
    try:
        running = backend.stream(chat("first", max_tokens=20_000, ignore_eos=True, stream=True))
        await running.__anext__()
        waiter = asyncio.create_task(backend.complete(chat("second", max_tokens=2)))
        await until(lambda: backend.stats().waiting == 1, "the second request queued")
        stats = backend.stats()
        assert (stats.running, stats.waiting, stats.kv_cache_usage) == (1, 1, 1.0)
        with pytest.raises(EngineOverloaded) as err:
            await backend.complete(chat("third", max_tokens=2))
        assert err.value.status == 429 and err.value.code == "engine_overloaded"
        assert int(err.value.headers["retry-after"]) >= 1
        with pytest.raises(EngineOverloaded):
            await backend.stream(chat("third", max_tokens=2, stream=True)).__anext__()
        waiter.cancel()
        await until(lambda: backend.stats().waiting == 0, "the cancelled waiter gone from the queue")
        await running.aclose()
        await until(lambda: backend.stats().running == 0, "the running slot freed")
        body = msgspec.json.decode(await backend.complete(chat("after", max_tokens=3, ignore_eos=True)))
        assert body["usage"]["completion_tokens"] == 3
    finally:
        await backend.aclose()


class GatedDecoders:
    """The tiny engine, except that making a sequence's decoder waits for `gate`: the scheduler's thread holds
    on to what it admitted while requests keep arriving."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.batchable, self.gate = engine, True, threading.Event()

    def prefill(self, prompts: list[list[int]]) -> Any:
        return self.engine.prefill(prompts)

    def decode(self, *args: Any) -> Any:
        return self.engine.decode(*args)

    def decoder(self, job: Job, on_text: Any) -> Any:
        assert self.gate.wait(30)
        return self.engine.decoder(job, on_text)


async def test_requests_that_fit_the_free_slots_are_not_counted_against_max_queue(
        backend: TransformersBackend) -> None:
    """Requests submitted before the scheduler's thread picks them up still fit the free slots: only those
    beyond the slots wait for a place, and only they count against max_queue (it refused a request with two of
    the four slots free: "0 sequences running (max_concurrency 2) and 2 requests queued (max_queue 1)")."""
    model = GatedDecoders(backend._engine)
    scheduler = Scheduler(model, max_concurrency=2, max_queue=1, name="gated")
    jobs, _ = backend._engine.prepare(check_request(chat("x", max_tokens=3, ignore_eos=True)))
    done: list[threading.Event] = []

    def submit() -> Group:
        done.append(threading.Event())
        group = Group(jobs, None, done[-1].set)
        scheduler.submit(group)
        return group

    try:
        submit()
        await until(lambda: scheduler.running == 1, "the first request admitted (held at its decoder)")
        groups = [submit(), submit()]  # the second fits the free slot; the third waits for a place
        with pytest.raises(EngineOverloaded) as err:
            submit()  # a second request waiting for a place: beyond max_queue
        assert "1 requests queued (max_queue 1)" in err.value.message
        model.gate.set()
        for event in done[:3]:
            assert await asyncio.to_thread(event.wait, 30)
        assert [g.ordered_results()[0].completion_tokens for g in groups] == [3, 3]
    finally:
        model.gate.set()
        await asyncio.to_thread(scheduler.close)


async def test_a_request_with_more_choices_than_slots_still_runs(tiny_dir: Path) -> None:
    backend = tiny(tiny_dir, max_concurrency=2, max_queue=0)
    try:
        body = msgspec.json.decode(await backend.complete(completion(["a", "b"], n=2, max_tokens=3, ignore_eos=True)))
        assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
        assert body["usage"]["completion_tokens"] == 12
    finally:
        await backend.aclose()


# ---- failures and shutdown ----------------------------------------------------------------------------


class FailingDecode:
    """The tiny engine, except that batched decode steps raise while `broken` is set."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.batchable, self.broken = engine, True, True

    def prefill(self, prompts: list[list[int]]) -> Any:
        return self.engine.prefill(prompts)

    def decode(self, *args: Any) -> Any:
        if self.broken:
            raise RuntimeError("boom")
        return self.engine.decode(*args)

    def decoder(self, job: Job, on_text: Any) -> Any:
        return self.engine.decoder(job, on_text)


async def test_a_model_failure_ends_the_batch_and_the_engine_goes_on(backend: TransformersBackend) -> None:
    model = FailingDecode(backend._engine)
    scheduler = Scheduler(model, max_concurrency=4, max_queue=4, name="failing")
    jobs, _ = backend._engine.prepare(check_request(chat("x", max_tokens=5, ignore_eos=True)))

    def run() -> Group:
        done = threading.Event()
        group = Group(jobs, None, done.set)
        scheduler.submit(group)
        assert done.wait(30)
        return group

    try:
        failed = await asyncio.to_thread(run)
        assert isinstance(failed.error, RuntimeError) and scheduler.running == 0
        model.broken = False
        fine = await asyncio.to_thread(run)
        assert fine.error is None and fine.ordered_results()[0].completion_tokens == 5
    finally:
        await asyncio.to_thread(scheduler.close)


async def test_failure_surfaces_as_a_gateway_error(tiny_dir: Path) -> None:
    backend = tiny(tiny_dir)
    await backend.start()
    original = backend._engine.decode
    backend._engine.decode = lambda *args: (_ for _ in ()).throw(RuntimeError("kaput"))
    try:
        with pytest.raises(GatewayError) as err:
            await backend.complete(chat("x", max_tokens=5, ignore_eos=True))
        assert err.value.status == 500 and "kaput" in err.value.message
        backend._engine.decode = original
        body = msgspec.json.decode(await backend.complete(chat("x", max_tokens=2, ignore_eos=True)))
        assert body["usage"]["completion_tokens"] == 2
    finally:
        await backend.aclose()


async def test_shutdown_ends_running_and_waiting_requests(tiny_dir: Path) -> None:
    backend = tiny(tiny_dir, max_concurrency=1, max_queue=4)
    await backend.start()
    running = asyncio.create_task(backend.complete(chat("a", max_tokens=20_000, ignore_eos=True)))
    waiting = asyncio.create_task(backend.complete(chat("b", max_tokens=4)))
    await until(lambda: (backend.stats().running, backend.stats().waiting) == (1, 1), "one running, one waiting")
    await backend.aclose()
    for task in (running, waiting):
        with pytest.raises(ServiceUnavailable):
            await task
    assert backend.stats().running == 0


async def test_newcomers_prefill_together_unless_padding_would_dominate() -> None:
    from backends.batching import _prefill_parts, _Seq

    def seqs(*lengths: int) -> list[_Seq]:
        return [_Seq(Job(i, [1] * n, None, ""), None) for i, n in enumerate(lengths)]  # type: ignore[arg-type]

    def parts(*lengths: int) -> list[list[int]]:
        return [[len(s.job.prompt_ids) for s in part] for part in _prefill_parts(seqs(*lengths))]

    assert parts(30, 10, 28, 31) == [[10, 28, 30, 31]]  # 25 of 124 padded positions
    assert parts(60, 5, 20) == [[5, 20], [60]]  # all three: 105 of 180 would be padding
    assert parts(5, 100, 500) == [[5, 100], [500]]
    assert parts() == []
