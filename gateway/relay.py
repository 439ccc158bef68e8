"""Relay a stream's payloads, book each deployment's outcome through its lease, continue it elsewhere if it
breaks, and count its tokens into the request context."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec

from gateway.deployments import Lease
from policies.budget import estimate_prompt_tokens
from policies.context import RequestContext
from protocol.errors import UpstreamError, UpstreamInvalidResponse, UpstreamStatusError
from protocol.openai import ChatCompletionRequest, ChunkView, ParsedRequest, chunk_view, decode_request
from routing.router import Attempt

if TYPE_CHECKING:
    from gateway.service import Gateway

__all__ = ["StreamRelay"]

log = logging.getLogger("pointsman")


class StreamRelay:
    """Relays the rest of a stream; however it ends, the current lease is booked exactly once.

    When the upstream breaks midway, the stream continues on another deployment of the same model: the text
    produced so far goes back as an assistant prefix (`continue_final_message`, `add_generation_prompt: false`,
    as vLLM and the local engine take it), with what is left of the request's token limit, and the
    continuation's chunks are relayed under the original id, without a second `role`, so the client sees one
    unbroken stream.
    """

    def __init__(self, gateway: Gateway, ctx: RequestContext, request: ParsedRequest, attempt: Attempt, lease: Lease,
                 ttft: float) -> None:
        self.gateway, self.ctx, self.attempt = gateway, ctx, attempt
        self.request = request  # as the model got it: asking for usage, which a client that did not ask never sees
        self.hide_usage = not ctx.request.include_usage
        self.chat = isinstance(ctx.request.body, ChatCompletionRequest)
        self.backend = gateway.backends[attempt.model.id]
        self.pool = gateway.pools[attempt.model.id]
        self.lease, self.ttft = lease, ttft
        self.text: list[str] = []
        self.refusal: list[str] = []
        self.tool_calls: dict[int, dict] = {}  # by the deltas' index: id, type, name, arguments so far
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_reason: Any = None  # vLLM's: the stop string (or token id) that ended the choice, when one did
        self.chunk_id: str | None = None
        self.created: Any = None  # the first chunk's `created`: every chunk the client gets carries it
        self.tokens = 0  # one per content chunk, until the upstream's usage says otherwise
        self.prompt_tokens: int | None = None
        self.usage_tokens: int | None = None

    def _view(self, payload: bytes) -> ChunkView | None:
        """A payload as a chunk; None for JSON that is no chunk (an error event, or a vendor's extra event: relayed
        as it is); one that is no JSON object ends the stream as an upstream fault."""
        try:
            return chunk_view(payload)
        except msgspec.ValidationError:
            if payload.lstrip()[:1] != b"{":
                raise self._invalid() from None
            return None
        except (msgspec.DecodeError, RecursionError):  # RecursionError: nested too deeply to skip
            raise self._invalid() from None

    def _observe(self, payload: bytes) -> bytes | None:
        """Learn what a payload says (text, calls, finish, usage); one that is no JSON object ends the stream, as
        an upstream fault, before it reaches the client (the first was checked by the backend). Returns what the
        client gets of it (see `_shown`)."""
        view = self._view(payload)
        if view is None:
            return payload
        if view.error is not None:  # the upstream failed mid-stream and said so: a failure like a broken stream
            raise UpstreamStatusError(502, payload)  # (relayed as this error event, or continued elsewhere)
        if self.chunk_id is None:
            self.chunk_id, self.created = view.id, view.created
        if view.usage is not None:
            self.prompt_tokens, self.usage_tokens = view.usage.prompt_tokens, view.usage.completion_tokens
        for choice in view.choices:
            delta = choice.delta
            piece = delta.content if delta is not None else choice.text
            if piece:
                self.text.append(piece)
                self.tokens += 1
            if delta is not None:
                if delta.refusal:
                    self.refusal.append(delta.refusal)
                    self.tokens += 1
                if delta.tool_calls:
                    self._merge(delta.tool_calls)
            if choice.finish_reason is not None:
                self.finished = True
                self.finish_reason, self.stop_reason = choice.finish_reason, choice.stop_reason
        return self._shown(view, payload)

    def _shown(self, view: ChunkView, payload: bytes) -> bytes | None:
        """`payload` as a client that did not ask for usage gets it (it did ask: as it is): a chunk of only usage
        kept back (None), a `usage` beside choices dropped (vLLM's continuous usage; the `"usage": null` a model
        asked for usage puts on a text completion's chunks, where OpenAI's spec has no null; a chat chunk may
        carry one)."""
        if not self.hide_usage or b'"usage"' not in payload:
            return payload
        if view.usage is None:
            return payload if self.chat else _without_usage(payload)
        return _without_usage(payload) if view.choices else None

    def shown(self, payload: bytes) -> bytes | None:
        """What the client gets of the first payload, which the caller sends (`run` counts it)."""
        if not self.hide_usage or b'"usage"' not in payload:
            return payload
        try:
            return self._shown(chunk_view(payload), payload)
        except (msgspec.DecodeError, RecursionError):  # a ValidationError too: `run` judges it
            return payload

    def _invalid(self, what: str = "a stream payload that is not a JSON object") -> UpstreamInvalidResponse:
        return UpstreamInvalidResponse(f"deployment {self.lease.index} of {self.attempt.model.id} sent {what}")

    def _merge(self, deltas: list[dict]) -> None:
        """Put tool-call deltas together as OpenAI streams them: id, type and name first, arguments in pieces. A
        delta of another shape is an upstream fault (its call could not be put together), raised before the
        payload reaches the client."""
        for delta in deltas:
            if not _well_formed(delta):
                raise self._invalid(f"a malformed tool-call delta: {msgspec.json.encode(delta)[:200]!r}")
            function = delta.get("function") or {}
            index = delta.get("index", 0)
            call = self.tool_calls.setdefault(index, {"id": None, "type": "function",
                                                      "function": {"name": "", "arguments": ""}})
            if delta.get("id"):
                call["id"] = delta["id"]
            if delta.get("type"):
                call["type"] = delta["type"]
            if function.get("name"):
                call["function"]["name"] += function["name"]
            if function.get("arguments"):
                call["function"]["arguments"] += function["arguments"]
        self.tokens += 1

    @property
    def completion_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.tokens

    def _can_continue(self) -> bool:
        body = self.ctx.request.body
        return (
            isinstance(body, ChatCompletionRequest)
            and body.n == 1
            and not self.finished
            and not self.tool_calls  # a call half streamed cannot be continued as text
            and not self.refusal  # nor a refusal
            and len(self.pool.states) > 1
        )

    def _continuation(self) -> ParsedRequest | None:
        """The request again, to go on where the stream broke: the text streamed so far as the assistant's message
        to continue (added to the client's own last assistant message when it asked for that one to be continued,
        a prefill), and what is left of its token limit. None when the limit is used up: nothing is left to
        generate, and a continuation would only overrun it."""
        request = self.request
        raw = dict(request.raw)
        limit = request.max_new_tokens
        if limit is not None:
            left = limit - self.completion_tokens
            if left < 1:
                return None
            for name in ("max_tokens", "max_completion_tokens"):
                if raw.get(name) is not None:
                    raw[name] = left
        if self.text:
            text = "".join(self.text)
            messages = list(raw["messages"])
            last = messages[-1] if messages else None
            if raw.get("continue_final_message") and isinstance(last, dict) and last.get("role") == "assistant":
                messages[-1] = {**last, "content": _extended(last.get("content"), text)}
            else:
                messages.append({"role": "assistant", "content": text})
            raw["messages"] = messages
            raw["continue_final_message"] = True
            raw["add_generation_prompt"] = False
        return request if raw == request.raw else decode_request(raw, ChatCompletionRequest)

    async def run(self, first: bytes | None, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        if first is not None:
            self._observe(first)
        tried = {self.lease.index}
        try:
            while True:
                current = rest
                try:
                    async for payload in current:
                        if (shown := self._observe(payload)) is not None:
                            yield shown
                except UpstreamError as exc:
                    self.lease.fail(exc, ttft_s=self.ttft)
                    if exc.status == 429:  # a continuation refused: that deployment waits out its Retry-After
                        self.pool.hold(self.lease.index, exc, self.gateway.config.routing.rate_limit_hold_max_s)
                    # the continuation first: choosing the next deployment takes a half-open breaker's probe
                    continuation = self._continuation() if exc.retryable and self._can_continue() else None
                    nxt = self._next_deployment(tried) if continuation is not None else None
                    if nxt is None:
                        raise
                    log.warning("%s deployment %s broke mid-stream (%s); continuing on %s",
                                self.attempt.model.id, self.lease.index, exc.message, nxt)
                    tried.add(nxt)
                    self.lease, self.ttft = self.pool.lease(nxt), None
                    self.ctx.attempts.append(self.lease.record)
                    # the count so far, from the broken deployment's usage if it sent one (vLLM's continuous usage):
                    # the chunks from here add to it, and the continuation's usage is rewritten to include it
                    earlier = self.tokens = self.completion_tokens
                    self.usage_tokens = None
                    rest = self._continued(continuation, nxt, earlier)
                    continue
                except BaseException as exc:  # the client left, or the gateway is stopping
                    self.lease.fail(exc, ttft_s=self.ttft)
                    raise
                finally:
                    await current.aclose()  # type: ignore[attr-defined]
                self.lease.ok(ttft_s=self.ttft, completion_tokens=self.completion_tokens)
                return
        finally:
            # what was generated counts, however the stream ended (a budget settles on it); a stream that ended
            # before the upstream's usage (left, broken, or a model that sends none) counts its prompt as the
            # budgets estimate it: the upstream has read it all the same
            prompt = self.prompt_tokens
            if prompt is None:
                prompt = estimate_prompt_tokens(self.ctx.request)
            self.ctx.record_usage(self.attempt.model, prompt, self.completion_tokens)

    def assembled(self) -> bytes | None:
        """The finished stream as the plain answer it stands for (a chat.completion or text_completion), for
        policies that keep answers (the cache); None unless one choice streamed to its finish_reason."""
        body = self.ctx.request.body
        if body.n != 1 or not self.finished or self.chunk_id is None:
            return None
        text = "".join(self.text)
        if isinstance(body, ChatCompletionRequest):
            refusal = "".join(self.refusal) or None
            message: dict = {"role": "assistant", "content": text or (None if self.tool_calls or refusal else ""),
                             "refusal": refusal}
            if self.tool_calls:
                message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
            choice: dict = {"index": 0, "message": message, "finish_reason": self.finish_reason, "logprobs": None}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": self.finish_reason, "logprobs": None}
            kind = "text_completion"
        if self.stop_reason is not None:  # which stop string ended it (vLLM): what /v1/messages' stop_sequence says
            choice["stop_reason"] = self.stop_reason
        answer: dict = {"id": self.chunk_id, "object": kind, "created": int(time.time()),
                        "model": self.attempt.model.id, "choices": [choice]}
        if self.prompt_tokens is not None and self.usage_tokens is not None:
            answer["usage"] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.usage_tokens,
                               "total_tokens": self.prompt_tokens + self.usage_tokens}
        return msgspec.json.encode(answer)

    def _next_deployment(self, tried: set[int]) -> int | None:
        for candidate in self.pool.targets(self.gateway.rng):
            if candidate not in tried and self.pool.breakers[candidate].allow():
                return candidate
        return None

    async def _continued(self, request: ParsedRequest, index: int, earlier: int) -> AsyncIterator[bytes]:
        """The continuation's chunks under the original stream's id and `created`, its opening chunk without the
        `role` the client already has (dropped when nothing else is in it); its usage counts the `earlier`
        tokens, streamed before the break, among the completion's."""
        opening = True
        async for payload in self.backend.stream(request, index):
            view = self._view(payload)
            if view is None:
                yield payload
                continue
            if opening and view.error is None:
                opening = False
                roleless = _without_role(payload)
                if roleless is None:
                    continue
                if roleless is not payload:
                    payload, view = roleless, chunk_view(roleless)
            yield payload if view.error is not None else self._as_original(payload, view, earlier)

    def _as_original(self, payload: bytes, view: ChunkView, earlier: int) -> bytes:
        """A continuation's chunk as a chunk of the stream the client started: its id and `created`, and a usage
        whose completion_tokens (and total) add the tokens the broken deployment streamed."""
        renamed = self.chunk_id is not None and view.id != self.chunk_id
        redated = self.created is not None and view.created != self.created
        recounted = earlier > 0 and view.usage is not None and view.usage.completion_tokens is not None
        if not (renamed or redated or recounted):
            return payload
        chunk = msgspec.json.decode(payload)
        if renamed:
            chunk["id"] = self.chunk_id
        if redated:
            chunk["created"] = self.created
        if recounted:
            usage = chunk["usage"]
            usage["completion_tokens"] = completion = view.usage.completion_tokens + earlier  # type: ignore[union-attr]
            if view.usage.prompt_tokens is not None:  # type: ignore[union-attr]
                usage["total_tokens"] = view.usage.prompt_tokens + completion  # type: ignore[union-attr]
        return msgspec.json.encode(chunk)


def _extended(content: Any, text: str) -> Any:
    """An assistant message's content with `text` after it: a string, or a list of content parts."""
    if isinstance(content, list):
        return [*content, {"type": "text", "text": text}]
    return (content or "") + text if isinstance(content, str) or content is None else text


def _without_role(payload: bytes) -> bytes | None:
    """A continuation's opening chunk without `role` (and without an empty `content` beside it): the payload
    itself when it has no role; None when nothing is left in it (no text, call, refusal, finish or usage)."""
    if b'"role"' not in payload:
        return payload
    chunk = msgspec.json.decode(payload)
    kept = chunk.get("usage") is not None
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict):
            delta.pop("role", None)
            if not delta.get("content"):
                delta.pop("content", None)
            kept = kept or any(value not in (None, "", []) for value in delta.values())
        kept = kept or (isinstance(choice, dict) and (choice.get("finish_reason") is not None
                                                       or choice.get("logprobs") is not None))
    return msgspec.json.encode(chunk) if kept else None


def _well_formed(delta: Any) -> bool:
    """A tool-call delta as OpenAI streams one: an object, its index an integer, its id, type, name and arguments
    strings where given."""
    if not isinstance(delta, dict):
        return False
    function = delta.get("function") or {}
    return (isinstance(function, dict) and isinstance(delta.get("index", 0), int)
            and all(isinstance(value, str | None) for value in (delta.get("id"), delta.get("type"),
                                                                function.get("name"), function.get("arguments"))))


def _without_usage(chunk: bytes) -> bytes:
    """A chunk without its `usage` field: cut from the bytes as OpenAI and vLLM write a null one, else re-encoded."""
    for null in (b',"usage":null', b', "usage": null'):
        if null in chunk:
            return chunk.replace(null, b"", 1)
    decoded = msgspec.json.decode(chunk)
    decoded.pop("usage", None)
    return msgspec.json.encode(decoded)
