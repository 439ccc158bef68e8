"""The MiniLM embedder with the real model: shape, normalisation, paraphrases close, and off the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import numpy as np
import pytest

from backends.embedder import Embedder, minilm_path

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
async def embedder() -> AsyncIterator[Embedder]:
    model = Embedder(threads=2)
    yield model
    await model.aclose()


async def test_the_model_is_found_without_importing_it() -> None:
    path = minilm_path()
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()


async def test_paraphrases_are_closer_than_an_unrelated_sentence(embedder: Embedder) -> None:
    a, b, other = await asyncio.gather(
        embedder.embed("How do I reset my password?"),
        embedder.embed("What are the steps to change my password?"),
        embedder.embed("The recipe calls for two cups of flour."),
    )
    for vector in (a, b, other):
        assert vector.shape == (384,) and vector.dtype == np.float32
        assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    assert float(a @ b) > 0.7 > float(a @ other)
    assert float(a @ b) > float(a @ other) + 0.4
    assert np.array_equal(await embedder.embed("How do I reset my password?"), a)  # deterministic


async def test_embeddings_run_in_the_worker_thread_while_the_loop_stays_free(embedder: Embedder) -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    await embedder.embed("a longer sentence, " * 40)
    ticker.cancel()
    assert ticks > 1
    assert threading.current_thread() is threading.main_thread()
