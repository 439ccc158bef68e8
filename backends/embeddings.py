"""Local sentence embeddings (`backend: embeddings`): OpenAI's /v1/embeddings answered by a batching Embedder."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import msgspec
import numpy as np

from backends.base import EngineStats
from backends.embedder import Embedder, embedder_folder
from config.schema import EmbeddingModel
from protocol.errors import BadRequest, GatewayError, ServiceUnavailable, UnsupportedParameter
from protocol.openai import (
    CreateEmbeddingResponse,
    Embedding,
    EmbeddingUsage,
    ParsedEmbeddings,
    ParsedRequest,
)

__all__ = ["EmbeddingsBackend", "render_embeddings"]

_DEFAULT_THREADS = 2
# floats rendered on the event loop at most (about 100 us of tolist + JSON); larger answers render in a thread
_INLINE_FLOATS = 2 * 384


def render_embeddings(vectors: np.ndarray, tokens: int, model: str, encoding: str) -> bytes:
    """OpenAI's CreateEmbeddingResponse; base64 is each vector's little-endian float32 bytes, as OpenAI sends it
    (and as the openai SDK asks for by default and decodes)."""
    if encoding == "base64":
        rows = np.ascontiguousarray(vectors, dtype="<f4")
        data = [Embedding(index=i, embedding=base64.b64encode(row.tobytes()).decode("ascii"))
                for i, row in enumerate(rows)]
    else:
        data = [Embedding(index=i, embedding=row) for i, row in enumerate(vectors.tolist())]
    usage = EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    return msgspec.json.encode(CreateEmbeddingResponse(data=data, model=model, usage=usage))


class EmbeddingsBackend:
    """One sentence embedder (all-MiniLM-L6-v2 and its kind) in one worker thread; concurrent requests share
    forward passes of up to `max_batch` inputs. It embeds text: token-id inputs are refused (400), since they
    would be ids of the client's tokenizer (tiktoken), not this model's; inputs longer than the model's 256 word
    pieces are truncated, as sentence-transformers does, and `usage` counts the tokens actually embedded."""

    def __init__(self, model: EmbeddingModel) -> None:
        self.model = model
        self.embedder: Embedder | None = None
        self._closed = False

    async def start(self) -> None:
        """Load the model in its worker thread; idempotent, concurrent callers share one load."""
        if self.embedder is None:
            path = await asyncio.to_thread(embedder_folder, self.model.source)
            if self.embedder is None:  # another caller got here first while we looked
                self.embedder = Embedder(path, threads=self.model.threads or _DEFAULT_THREADS,
                                         max_batch=self.model.max_batch, device=self.model.device)
        await self.embedder.start()

    async def _ready(self) -> Embedder:
        if self._closed:
            raise ServiceUnavailable(f"Model '{self.model.id}' is shut down.")
        try:
            await self.start()
        except Exception as exc:
            raise ServiceUnavailable(f"Model '{self.model.id}' failed to load: {exc}") from exc
        assert self.embedder is not None
        return self.embedder

    async def embeddings(self, request: ParsedEmbeddings, deployment: int = 0,
                         headers: dict[str, str] | None = None) -> bytes:
        body = request.body
        texts = request.inputs
        if not isinstance(texts[0], str):
            raise UnsupportedParameter(
                f"Model '{self.model.id}' embeds text only: send 'input' as strings. Token ids would be ids of "
                "another tokenizer (OpenAI's tiktoken), not this model's.", param="input")
        embedder = await self._ready()
        if body.dimensions is not None and body.dimensions != embedder.dim:
            raise UnsupportedParameter(
                f"Model '{self.model.id}' cannot shorten its embeddings: 'dimensions' must be left out or be "
                f"{embedder.dim}.", param="dimensions")
        try:
            vectors, tokens = await embedder.encode(texts)  # type: ignore[arg-type]
        except Exception as exc:
            raise GatewayError(f"Model '{self.model.id}' failed: {exc}") from exc
        args = (vectors, sum(tokens), self.model.id, body.encoding_format)
        if vectors.size <= _INLINE_FLOATS:
            return render_embeddings(*args)
        return await asyncio.to_thread(render_embeddings, *args)

    async def complete(self, request: ParsedRequest, deployment: int = 0,
                       headers: dict[str, str] | None = None) -> bytes:
        raise self._not_chat()

    async def stream(self, request: ParsedRequest, deployment: int = 0,
                     headers: dict[str, str] | None = None) -> AsyncIterator[bytes]:
        raise self._not_chat()
        yield b""  # pragma: no cover - makes this an async generator, as the contract has it

    def _not_chat(self) -> BadRequest:
        return BadRequest(f"The model '{self.model.id}' is an embeddings model: use POST /v1/embeddings.",
                          param="model", code="model_not_supported")

    async def health(self) -> bool:
        return self.embedder is not None and self.embedder.loaded

    def stats(self) -> EngineStats:
        """The live load: inputs in the forward pass under way, and inputs queued for the next ones."""
        embedder = self.embedder
        if embedder is None:
            return EngineStats(running=0, waiting=0, kv_cache_usage=0.0)
        return EngineStats(running=embedder.running, waiting=embedder.waiting,
                           kv_cache_usage=min(1.0, embedder.running / self.model.max_batch))

    async def aclose(self) -> None:
        self._closed = True
        embedder, self.embedder = self.embedder, None
        if embedder is not None:
            await embedder.aclose()
