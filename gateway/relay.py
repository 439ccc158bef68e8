"""Relay a stream's payloads, settling live figures and breakers, and continue it elsewhere if it breaks."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator

import msgspec

from backends.base import Backend
from gateway.deployments import DeploymentPool
from gateway.errors import UpstreamError
from gateway.protocol import ChatCompletionRequest, ParsedRequest, chunk_view

__all__ = ["StreamRelay", "completion_tokens"]

log = logging.getLogger("pointsman")


def completion_tokens(body: bytes) -> int | None:
    """The response's usage.completion_tokens, for the tokens/s figure (skips the rest of the body)."""
    try:
        usage = chunk_view(body).usage
    except msgspec.DecodeError:  # also a ValidationError: a body we cannot read just gives no figure
        return None
    return usage.completion_tokens if usage is not None else None


class StreamRelay:
    """Relays the rest of a stream and settles live figures and breakers however it ends.

    When the upstream breaks midway, the stream continues on another deployment of the same model: the text
    produced so far goes back as an assistant prefix (`continue_final_message`, `add_generation_prompt: false`,
    as vLLM and the local engine take it) and the continuation's chunks are relayed under the original id, so
    the client sees one unbroken stream.
    """

    def __init__(self, backend: Backend, pool: DeploymentPool, rng: random.Random, request: ParsedRequest,
                 index: int, started: float, ttft: float) -> None:
        self.backend, self.pool, self.rng, self.request = backend, pool, rng, request
        self.index, self.started, self.ttft = index, started, ttft
        self.text: list[str] = []
        self.finished = False
        self.chunk_id: str | None = None
        self.tokens = 0  # the upstream's usage when it sends one, else one per content chunk

    def _observe(self, payload: bytes) -> None:
        try:
            view = chunk_view(payload)
        except Exception:  # not a chunk (an error event, or a vendor's extra event): nothing to learn
            return
        if self.chunk_id is None:
            self.chunk_id = view.id
        if view.usage is not None:
            self.tokens = view.usage.completion_tokens
        for choice in view.choices:
            piece = choice.delta.content if choice.delta is not None else choice.text
            if piece:
                self.text.append(piece)
                self.tokens += 1
            if choice.finish_reason is not None:
                self.finished = True

    def _can_continue(self) -> bool:
        body = self.request.body
        return (
            isinstance(body, ChatCompletionRequest)
            and body.n == 1
            and not self.finished
            and bool(self.text)
            and len(self.pool.states) > 1
        )

    def _continuation(self) -> ParsedRequest:
        raw = dict(self.request.raw)
        raw["messages"] = [*raw["messages"], {"role": "assistant", "content": "".join(self.text)}]
        raw["continue_final_message"] = True
        raw["add_generation_prompt"] = False
        return ParsedRequest(self.request.body, raw)

    async def run(self, first: bytes | None, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        if first is not None:
            self._observe(first)
        pool, index = self.pool, self.index
        started, ttft = self.started, self.ttft
        tried = {index}
        while True:
            current = rest
            try:
                async for payload in current:
                    self._observe(payload)
                    yield payload
            except UpstreamError as exc:
                pool.breakers[index].record_failure()
                pool.states[index].end(started, ok=False)
                nxt = self._next_deployment(tried) if exc.retryable and self._can_continue() else None
                if nxt is None:
                    raise
                log.warning("%s deployment %s broke mid-stream (%s); continuing on %s",
                            self.backend.model.id, index, exc.message, nxt)
                index = nxt
                tried.add(index)
                started, ttft = pool.states[index].begin(), None
                rest = self._continued(self._continuation(), index)
                continue
            except BaseException:  # the client left, or the gateway is stopping
                pool.states[index].end(started, ok=False)
                raise
            finally:
                await current.aclose()  # type: ignore[attr-defined]
            pool.states[index].end(started, ok=True, ttft_s=ttft, completion_tokens=self.tokens)
            pool.breakers[index].record_success()
            return

    def _next_deployment(self, tried: set[int]) -> int | None:
        for candidate in self.pool.targets(self.rng):
            if candidate not in tried and self.pool.breakers[candidate].allow():
                return candidate
        return None

    async def _continued(self, request: ParsedRequest, index: int) -> AsyncIterator[bytes]:
        """The continuation's chunks, without its opening role chunk, under the original stream's id."""
        old_id = None
        async for payload in self.backend.stream(request, index):
            view = chunk_view(payload)
            if old_id is None:
                old_id = view.id
                choice = view.choices[0] if view.choices else None
                if choice is not None and choice.delta is not None and not choice.delta.content:
                    continue  # the role chunk: the client already has one
            if old_id and self.chunk_id and old_id != self.chunk_id:
                payload = payload.replace(msgspec.json.encode(old_id), msgspec.json.encode(self.chunk_id), 1)
            yield payload
