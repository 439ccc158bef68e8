"""Relayed embeddings (`OpenAIBackend.embeddings`) against a raw upstream: the answer's model name swapped for ours
in place, however large the answer and wherever the upstream writes `model`; errors sent with a 2xx; bodies that
are no JSON object."""

from __future__ import annotations

import json

import msgspec
import numpy as np
import pytest

from backends.openai_upstream import OpenAIBackend
from config.schema import OpenAIModel
from protocol.errors import UpstreamInvalidResponse, UpstreamStatusError
from protocol.openai import decode_embedding_request
from tests.backends.raw_server import RawServer, answer, keep_alive

pytestmark = pytest.mark.asyncio(loop_scope="session")


def backend(url: str, **fields: object) -> OpenAIBackend:
    return OpenAIBackend(msgspec.convert({"id": "ours", "base_url": url + "/v1", **fields}, OpenAIModel))


REQUEST = decode_embedding_request(b'{"model": "ours", "input": ["a", "b"]}')


def openai_answer(n: int, dim: int, model: str) -> dict:
    """OpenAI's own layout: `model` after `data`, written with json.dumps's spacing."""
    vectors = np.random.default_rng(7).standard_normal((n, dim)).astype(np.float32)
    return {"object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(vectors.tolist())],
            "model": model, "usage": {"prompt_tokens": n, "total_tokens": n}}


async def relayed(body: bytes, **fields: object) -> bytes:
    async with RawServer(keep_alive(answer(body, b"Content-Type: application/json"))) as server:
        relay = backend(server.url, **fields)
        try:
            return await relay.embeddings(REQUEST)
        finally:
            await relay.aclose()


@pytest.mark.parametrize("named", ["text-embedding-ada-002", "text-embedding-ada-002-v2"],
                         ids=["the-name-sent", "another-name"])
async def test_a_large_answer_is_renamed_in_place_not_decoded(named: str) -> None:
    """OpenAI answers text-embedding-ada-002 as `text-embedding-ada-002-v2` (TEI and Azure with names of their
    own): the answer, 2048 vectors here, keeps every byte but the model's value. Decoding and re-encoding it, as
    before, held the event loop for about 0.5 s per 60 MB answer (and wrote it anew: compact, floats reprinted)."""
    written = json.dumps(openai_answer(2048, 96, named)).encode()
    body = await relayed(written, upstream_model="text-embedding-ada-002")
    assert body == written.replace(b'"model": "%s"' % named.encode(), b'"model": "ours"')


@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": "), (",", " : ")], ids=["compact", "spaced", "odd"])
async def test_model_before_data_as_vllm_writes_it(separators: tuple[str, str]) -> None:
    answer_ = {"id": "embd-1", "object": "list", "created": 1, "model": "BAAI/bge-small",
               **{k: v for k, v in openai_answer(64, 8, "").items() if k != "model"}}
    written = json.dumps(answer_, separators=separators).encode()
    body = await relayed(written, upstream_model="bge")
    assert json.loads(body) == {**answer_, "model": "ours"}
    value = b'"BAAI/bge-small"'
    assert body == written.replace(value, b'"ours"', 1)  # the spacing kept, whatever it is


async def test_a_model_written_otherwise_is_still_renamed() -> None:
    """Escaped differently from how we would write it, and in the middle: found by decoding the whole answer."""
    answer_ = openai_answer(4, 8, "x")
    written = json.dumps({"object": "list", "data": answer_["data"][:2], "model": "up\\/name",
                          "more": answer_["data"][2:], "usage": answer_["usage"]}).replace("\\\\/", "\\/").encode()
    assert b'"up\\/name"' in written
    body = json.loads(await relayed(written, upstream_model="up/name"))
    assert body["model"] == "ours" and len(body["data"]) == 2


async def test_same_names_and_no_model_pass_unchanged() -> None:
    written = json.dumps(openai_answer(3, 4, "up-v2")).encode()
    assert await relayed(written) == written  # our id is sent as it is: the upstream's name is relayed
    without = json.dumps({k: v for k, v in openai_answer(3, 4, "").items() if k != "model"}).encode()
    assert await relayed(without, upstream_model="up") == without


async def test_errors_with_a_2xx_and_bodies_that_are_no_object() -> None:
    error = json.dumps({"error": {"message": "bad input", "type": "invalid_request_error", "code": 400}}).encode()
    with pytest.raises(UpstreamStatusError) as info:
        await relayed(error, upstream_model="up")
    assert info.value.status == 400
    for broken in (b"[1, 2]", b"<html>captive portal</html>"):
        with pytest.raises(UpstreamInvalidResponse):
            await relayed(broken, upstream_model="up")
