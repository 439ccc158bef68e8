"""OpenAI's Responses API: POST /v1/responses translated onto chat completions through the one pipeline (or relayed
as it is to an upstream that serves it natively), and the stored responses behind GET (the object, or with
`stream=true` its event stream replayed) and DELETE /v1/responses/{id}, each visible to its caller's key only."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import msgspec
from litestar import MediaType, Request, Response, Router, delete, get, post
from litestar.exceptions import HTTPException
from litestar.params import FromPath
from litestar.response.base import ASGIResponse
from litestar.types import ASGIApp

from config.schema import ModelConfig
from gateway.auth import principal_of
from gateway.deployments import Lease
from gateway.generate import generate, request_context
from gateway.pipeline import Pipeline, Served, StreamStart, first_payload, route_headers
from gateway.request_id import request_id_of
from gateway.responses import JSONBody, SSEStream, nothing
from gateway.service import Gateway
from policies.base import PolicyChain
from policies.context import Outcome, Principal, RequestContext
from policies.state import StateStore, StoreUnavailable
from protocol.errors import (
    INTERNAL_FAILURE,
    BadRequest,
    GatewayError,
    NotFound,
    ServiceUnavailable,
    UpstreamUnavailable,
    http_error_body,
)
from protocol.openai import ChatCompletionRequest, decode_request, usage_count
from protocol.responses_api import (
    ResponseShape,
    ResponsesRequest,
    StreamTranslator,
    chat_request,
    decode_responses_request,
    input_messages,
    replay_events,
    response_of,
    routing_request,
    sse_frame,
)

__all__ = ["NativeRelay", "ResponseStore", "ResponsesDialect", "StoredResponse", "responses_router"]

log = logging.getLogger("pointsman")


# ---- stored responses -------------------------------------------------------------------------------------


class StoredResponse(msgspec.Struct):
    response: msgspec.Raw  # the Response object as it was answered
    messages: list[dict[str, Any]]  # the conversation so far as chat messages (instructions are not carried over)
    model: str | None  # the model the client asked for: a follow-up that names none continues with it


def _store_down(exc: StoreUnavailable) -> ServiceUnavailable:
    """A 503 for a store that cannot be reached: an outage, logged without a traceback."""
    log.warning("responses: stored responses cannot be read: %s", exc)
    return ServiceUnavailable("Stored responses cannot be reached right now (the state store is unavailable); "
                              "try again shortly.")


class ResponseStore:
    """Stored responses in the state store (in process, or Redis shared by replicas), each under its caller's key
    for `responses.store_ttl_s`: another key's response is not found. Reading or deleting one while the store is
    unreachable is a 503 (ServiceUnavailable)."""

    __slots__ = ("state", "ttl_s")

    def __init__(self, state: StateStore, ttl_s: float) -> None:
        self.state, self.ttl_s = state, ttl_s

    @staticmethod
    def _key(principal: Principal, response_id: str) -> str:
        return f"responses:{principal.key_id or 'anonymous'}:{response_id}"

    async def save(self, principal: Principal, response: dict[str, Any], messages: list[dict[str, Any]],
                   model: str | None) -> None:
        record = StoredResponse(msgspec.Raw(msgspec.json.encode(response)), messages, model)
        await self.state.set(self._key(principal, response["id"]), msgspec.json.encode(record), self.ttl_s)

    async def load(self, principal: Principal, response_id: str) -> StoredResponse | None:
        try:
            data = await self.state.get(self._key(principal, response_id))
        except StoreUnavailable as exc:
            raise _store_down(exc) from None
        return None if data is None else msgspec.json.decode(data, type=StoredResponse)

    async def delete(self, principal: Principal, response_id: str) -> bool:
        key = self._key(principal, response_id)
        try:
            if await self.state.get(key) is None:
                return False
            await self.state.delete(key)
        except StoreUnavailable as exc:
            raise _store_down(exc) from None
        return True


def _store(request: Request) -> ResponseStore:
    return ResponseStore(request.app.state.storage.state, request.app.state.gateway.config.responses.store_ttl_s)


# ---- translated onto chat completions ------------------------------------------------------------------------


class ResponsesDialect:
    """Chat answers as Responses (gateway/generate.py's Dialect): a Response object, or its event stream. Once the
    answer is complete, `keep` stores it (when asked to) before the stream's closing event goes out, so a client
    may continue from it as soon as it has it."""

    def __init__(self, shape: ResponseShape, model: str, conversation: list[dict[str, Any]],
                 save: Callable[[dict[str, Any], list[dict[str, Any]]], Awaitable[None]] | None) -> None:
        self.shape, self.conversation, self.save = shape, conversation, save
        self.translator = StreamTranslator(shape, model)
        self.answer: dict[str, Any] | None = None

    def plain(self, body: bytes) -> bytes:
        self.answer = response_of(self.shape, msgspec.json.decode(body), self.translator.model)
        return msgspec.json.encode(self.answer)

    async def stream(self, payloads: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        translator = self.translator
        async for payload in payloads:
            for event in translator.feed(msgspec.json.decode(payload)):
                yield sse_frame(event)
        closing = translator.finish()
        self.answer = translator.final
        await self.keep()
        for event in closing:
            yield sse_frame(event)

    def stream_error(self, exc: GatewayError) -> bytes:
        return b"".join(sse_frame(event) for event in self.translator.fail(exc))

    async def keep(self) -> None:
        """Store the answer with its conversation; a store that fails costs the follow-ups, not this answer."""
        if self.save is None or self.answer is None:
            return
        try:
            await self.save(self.answer, [*self.conversation, *input_messages(self.answer["output"], "output")])
        except Exception as exc:
            log.warning("responses: could not store %s (%s); previous_response_id will not find it",
                        self.answer["id"], exc)


async def _translated(request: Request, body: ResponsesRequest, raw: dict[str, Any]) -> ASGIApp:
    store = _store(request)
    principal = principal_of(request.scope)
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = await store.load(principal, body.previous_response_id)
        if previous is None:
            raise BadRequest(f"Previous response with id '{body.previous_response_id}' not found.",
                             param="previous_response_id", code="previous_response_not_found")
        history = previous.messages
        if body.model is None and previous.model is not None:
            body.model = previous.model
    conversation = [*history, *input_messages(body.input)]  # type: ignore[arg-type]  # checked when decoded
    if not conversation:
        raise BadRequest("'input' must hold at least one item.", param="input")
    parsed = decode_request(chat_request(body, raw, conversation), ChatCompletionRequest)
    model = body.model

    async def save(answer: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        await store.save(principal, answer, messages, model)

    dialect = ResponsesDialect(ResponseShape(body), model or "", conversation, save if body.stored else None)
    try:
        app = await generate(request.scope, request.receive, parsed, dialect)
    except GatewayError as exc:
        if exc.param == "messages":  # the conversation was made of `input` (after any stored history): its field
            exc.param = "input"
        raise
    if not body.stream:
        await dialect.keep()
    return app


# ---- relayed to upstreams that serve the Responses API themselves -----------------------------------------------


def _native(model: ModelConfig | None) -> bool:
    return model is not None and getattr(model, "responses", None) == "native"


def _first_native(gateway: Gateway, body: ResponsesRequest) -> bool:
    """Whether the model named (a model, an alias, or a chain's first model) relays the Responses API natively."""
    if body.model is None:
        return False
    try:
        plan = gateway.table.plan(body.model)
    except GatewayError:
        return False  # the translated path reports it
    return _native(plan.chain[0].model)


class _EventView(msgspec.Struct):
    type: str = ""
    sequence_number: int = -1


class _UsageView(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None


class _ResponseView(msgspec.Struct):
    usage: _UsageView | None = None


class _FinalView(msgspec.Struct):
    response: _ResponseView | None = None


_event_view = msgspec.json.Decoder(_EventView).decode
_response_view = msgspec.json.Decoder(_ResponseView).decode
_final_view = msgspec.json.Decoder(_FinalView).decode
_FINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_FINAL_MARK = re.compile(rb"response\.(?:completed|incomplete|failed)")  # a cheap look before any decode


def _usage(view: _ResponseView | None) -> tuple[int | None, int | None]:
    usage = view.usage if view is not None else None
    return (usage_count(usage.input_tokens), usage_count(usage.output_tokens)) if usage is not None else (None, None)


def _answer_usage(body: bytes) -> tuple[int | None, int | None]:
    """A relayed Response's usage (input, output tokens); none when it has none that can be read."""
    try:
        return _usage(_response_view(body)) if b'"usage"' in body else (None, None)
    except msgspec.DecodeError:  # a ValidationError too
        return None, None


def _final_usage(payload: bytes) -> tuple[int | None, int | None] | None:
    """The usage of a relayed stream's final event (completed, incomplete, failed); None for any other payload."""
    if _FINAL_MARK.search(payload) is None:
        return None
    try:
        if _event_view(payload).type not in _FINAL_EVENTS:
            return None
        return _usage(_final_view(payload).response)
    except msgspec.DecodeError:
        return None


class NativeRelay:
    """An upstream's own Responses events, framed as they came (an `event:` line and the payload); an error once
    the stream is under way is an `error` event numbered after the last one relayed."""

    __slots__ = ("sequence",)

    def __init__(self) -> None:
        self.sequence = -1

    def plain(self, body: bytes) -> bytes:
        return body

    async def stream(self, payloads: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for payload in payloads:
            try:
                view = _event_view(payload)
            except msgspec.DecodeError:  # not an event: relayed as bare data
                yield b"data: %s\n\n" % payload
                continue
            self.sequence = max(self.sequence, view.sequence_number)
            yield b"event: %s\ndata: %s\n\n" % (view.type.encode(), payload)

    def stream_error(self, exc: GatewayError) -> bytes:
        self.sequence += 1
        return sse_frame({"type": "error", "code": exc.code, "message": exc.message, "param": exc.param,
                          "sequence_number": self.sequence})


async def _observed(ctx: RequestContext, model: ModelConfig, lease: Lease, ttft_s: float, first: bytes | None,
                    rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A relayed stream's payloads as they come: the final event's usage is booked into the context and the lease,
    once, however the stream ends; one that ends without a final event broke."""
    prompt = completion = None
    final = False
    payload = first
    try:
        while True:
            if payload is not None:
                if (usage := _final_usage(payload)) is not None:
                    final, (prompt, completion) = True, usage
                yield payload
            try:
                payload = await anext(rest)
            except StopAsyncIteration:
                break
        if not final:
            raise UpstreamUnavailable(f"the upstream of {model.id} ended the Responses stream before its final "
                                      "event", code="upstream_stream_broken")
    except BaseException as exc:
        lease.fail(exc)
        raise
    else:
        lease.ok(ttft_s=ttft_s, completion_tokens=completion)
    finally:
        await rest.aclose()  # type: ignore[attr-defined]
        ctx.record_usage(model, prompt, completion)


def _outcome(exc: BaseException) -> Outcome:
    if isinstance(exc, GatewayError):
        return Outcome("error", error=exc)
    if isinstance(exc, Exception):
        return Outcome("error", error=GatewayError(f"internal error: {type(exc).__name__}"))
    return Outcome("cancelled")


async def _relay(pipeline: Pipeline, policies: PolicyChain, ctx: RequestContext, raw: dict[str, Any],
                 stream: bool) -> Served | StreamStart:
    """The relayed request's steps: the usage-reading policies' admit and approve, the route (the native models
    it names, in order), retries over their deployments (pipeline._first_success), the usage booked."""
    try:
        if policies:
            await policies.admit(ctx)  # none of these policies answers a request itself
        decision = ctx.decision = await pipeline.gateway.decide(ctx.request, False, ctx.principal)
        decision.exclude({a.model.id: "does not serve the Responses API natively"
                          for a in decision.attempts if not _native(a.model)})
        if policies:
            await policies.approve(ctx, decision)
        if not stream:
            attempt, lease, relayed, body = await pipeline._first_success(
                ctx, decision, lambda backend, index, headers: backend.responses(raw, index, headers))
            prompt, completion = _answer_usage(body)
            lease.ok(completion_tokens=completion)
            ctx.record_usage(attempt.model, prompt, completion)
            return Served(body, route_headers(ctx, attempt, decision, relayed))

        async def open_stream(backend: Any, index: int, headers: dict[str, str]
                              ) -> tuple[bytes | None, AsyncIterator[bytes]]:
            return await first_payload(backend.responses_stream(raw, index, headers))

        attempt, lease, relayed, (first, rest) = await pipeline._first_success(ctx, decision, open_stream)
    except BaseException as exc:
        if policies:
            await policies.settle(ctx, _outcome(exc))
        raise
    events = _observed(ctx, attempt.model, lease, time.monotonic() - lease.started, first, rest)
    return StreamStart(None, events, route_headers(ctx, attempt, decision, relayed))


async def _relayed(request: Request, body: ResponsesRequest, raw: dict[str, Any]) -> ASGIApp:
    """The request as it is to the upstream's /responses, and its answer as it is (but for the model's name).
    Policies that read only the caller, the model and the usage run (rate limits, budgets, usage rows, metrics:
    those that also run on embeddings); the cache, templates and experiments do not. Nothing is stored here: the
    upstream keeps its own responses (previous_response_id goes to it)."""
    state = request.app.state  # read by item, as in gateway/generate.py: an attribute formats an AttributeError
    pipeline: Pipeline = state["pipeline"]
    policies = pipeline.embedding_policies
    parsed = decode_request(routing_request(body, raw), ChatCompletionRequest)
    ctx = request_context(request.scope, parsed, bool(policies))
    tracing = pipeline.tracing
    if tracing is not None:
        tracing.accept(ctx, request.scope["headers"])
    watch = state["watches"].watch(request.receive)

    def run(ctx: RequestContext, on: Pipeline = pipeline) -> Awaitable[Served | StreamStart]:
        return _relay(on, policies, ctx, raw, body.stream)

    try:
        if tracing is None:
            result = await run(ctx)
        else:  # a sampled request runs on the traced twin (a span per attempt)
            result = await (tracing.stream if body.stream else tracing.complete)(
                ctx, run, lambda ctx: run(ctx, pipeline.traced))
    except BaseException as exc:
        watch.stop()
        if watch.absorb(exc):
            return nothing
        raise
    deprecated = state["gateway"].deprecations  # a deprecated version answers with Deprecation (and Sunset)
    if deprecated and (extra := deprecated.get(result.headers.get("x-pointsman-model", ""))):
        result.headers.update(extra)
    settle = None if not policies else policies.settle
    if isinstance(result, StreamStart):
        on_end = None if settle is None else lambda outcome: settle(ctx, outcome)
        return SSEStream(result.first, result.rest, result.headers, watch, on_end, NativeRelay())
    watch.stop()
    served = result
    after = None if settle is None else lambda: settle(ctx, Outcome("ok", body=served.body))
    return JSONBody(served.body, served.headers, after=after)


# ---- routes -----------------------------------------------------------------------------------------------------


@post("/responses", status_code=200, summary="Create a model response (OpenAI Responses API)")
async def create_response(request: Request) -> ASGIApp:
    body, raw = decode_responses_request(await request.body())
    if _first_native(request.app.state.gateway, body):
        return await _relayed(request, body, raw)
    return await _translated(request, body, raw)


def _not_found(response_id: str) -> NotFound:
    return NotFound(f"Response with id '{response_id}' not found.", param="response_id")


_SEQUENCE_NUMBER = re.compile(r"[0-9]{1,18}")


def _replay_asked(query: Mapping[str, str]) -> int | None:
    """GET's `stream` and `starting_after`: None for the object itself; for its event stream, the sequence number
    after which the replay begins (-1: from the first event). A 400 naming the parameter for any other value."""
    stream = query.get("stream", "false").lower()
    if stream not in ("true", "false"):
        raise BadRequest(f"Invalid value for 'stream': expected true or false, got {stream!r}.", param="stream")
    after = query.get("starting_after")
    if after is not None and _SEQUENCE_NUMBER.fullmatch(after) is None:
        raise BadRequest(f"Invalid value for 'starting_after': expected a sequence number, got {after!r}.",
                         param="starting_after")
    if stream == "false":
        return None
    return -1 if after is None else int(after)


@get("/responses/{response_id:str}", summary="Retrieve a stored response (the caller's key's own); with "
     "stream=true, its events replayed after `starting_after`")
async def retrieve_response(request: Request, response_id: FromPath[str]) -> ASGIApp:
    after = _replay_asked(request.query_params)
    stored = await _store(request).load(principal_of(request.scope), response_id)
    if stored is None:
        raise _not_found(response_id)
    headers = {"x-request-id": request_id_of(request.scope)}
    if after is None:
        return JSONBody(bytes(stored.response), headers)
    events = replay_events(msgspec.json.decode(stored.response))
    body = b"".join(sse_frame(event) for event in events if event["sequence_number"] > after)
    return ASGIResponse(body=body, media_type="text/event-stream", headers={"cache-control": "no-cache", **headers})


@delete("/responses/{response_id:str}", status_code=200, summary="Delete a stored response (the caller's key's own)")
async def delete_response(request: Request, response_id: FromPath[str]) -> ASGIApp:
    if not await _store(request).delete(principal_of(request.scope), response_id):
        raise _not_found(response_id)
    body = msgspec.json.encode({"id": response_id, "object": "response", "deleted": True})
    return JSONBody(body, {"x-request-id": request_id_of(request.scope)})


def _render_error(request: Request, exc: Exception) -> Response:
    """Errors before an answer starts (validation, the guards' 401/403, routing, budgets, upstreams) in the
    Responses API's shape: OpenAI's error object."""
    if isinstance(exc, GatewayError):
        body, status, headers = exc.body(), exc.status, exc.headers
    else:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else INTERNAL_FAILURE
        body = http_error_body(status, str(detail))
        headers = getattr(exc, "headers", None) or {}
    return Response(body, status_code=status, media_type=MediaType.JSON,
                    headers={**headers, "x-request-id": request_id_of(request.scope)})


def responses_router(guards: Sequence) -> Router:
    """/v1/responses and /v1/responses/{id}, behind the completion routes' guards."""
    return Router(path="/v1", route_handlers=[create_response, retrieve_response, delete_response],
                  guards=list(guards), exception_handlers={GatewayError: _render_error, HTTPException: _render_error})
