"""One generation request over HTTP, whatever its wire format: chat completions and completions as they are, and
other formats (the Responses API, Anthropic Messages) translated onto a chat request at the edge by a Dialect,
so that one routing and policy core serves them all."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from litestar.types import ASGIApp, Receive, Scope

from gateway.auth import principal_of
from gateway.pipeline import Pipeline, StreamStart
from gateway.request_id import request_id_of
from gateway.responses import JSONBody, SSEStream, nothing, replay
from policies.context import Outcome, Reply, RequestContext
from protocol.errors import GatewayError
from protocol.openai import ParsedRequest

__all__ = ["POLICY_HEADERS", "Dialect", "generate", "request_context"]

# request headers policies read (the cache's controls), handed to them in ctx.state["request_headers"]
POLICY_HEADERS = frozenset({b"cache-control", b"x-pointsman-cache-ttl"})


class Dialect(Protocol):
    """A wire format served through chat completions: it translates the answers back (the request it translated
    before calling `generate`). Errors raised before an answer starts are rendered by the format's own
    exception handler; `stream_error` frames one that breaks a stream already under way."""

    def plain(self, body: bytes) -> bytes:
        """A `chat.completion` body as this format's answer body."""
        ...

    def stream(self, payloads: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """`chat.completion.chunk` payloads (unframed JSON) as this format's SSE bytes, framed, closing events
        included."""
        ...

    def stream_error(self, exc: GatewayError) -> bytes:
        """An error after the stream started, framed as this format's SSE event(s)."""
        ...


def request_context(scope: Scope, parsed: ParsedRequest, policies: bool) -> RequestContext:
    """The context a request carries: its caller, id and user (`user`, else `x-pointsman-user`), and the cache
    control headers when policies run."""
    user = parsed.body.user
    wanted: dict[str, str] = {}
    for key, value in scope["headers"]:
        if key == b"x-pointsman-user" and user is None:
            user = value.decode("latin-1")
        elif policies and key in POLICY_HEADERS:
            wanted[key.decode("latin-1")] = value.decode("latin-1")
    ctx = RequestContext(parsed, principal_of(scope), request_id_of(scope), user)
    if wanted:
        ctx.state["request_headers"] = wanted
    return ctx


def _stream_outcome(result: StreamStart | Reply, answered: bool, outcome: Outcome) -> Outcome:
    """How a stream ended, for settle: a policy's reply, or a finished stream with the answer it put together."""
    if outcome.status != "ok":
        return outcome
    if answered:
        return Outcome("answered")
    return Outcome("ok", body=result.assembled)  # type: ignore[union-attr]  # put together only if read


async def generate(scope: Scope, receive: Receive, parsed: ParsedRequest, dialect: Dialect | None = None,
                   headers: dict[str, str] | None = None) -> ASGIApp:
    """Run `parsed` through the pipeline and answer it: JSON or SSE, in `dialect`'s format when one is given.
    Policies settle once the answer is out (or however it ended); a client that leaves cancels it. Takes the ASGI
    scope and receive, not a Litestar Request: the generation routes make none (see gateway/hot_routes.py)."""
    # by item: Litestar's State answers an attribute through __getattr__, after a failed lookup has formatted an
    # AttributeError (~0.2 us each, three a request)
    state = scope["litestar_app"].state  # type: ignore[typeddict-item]
    pipeline: Pipeline = state["pipeline"]
    ctx = request_context(scope, parsed, pipeline.has_policies)
    if pipeline.tracing is not None:  # the client's traceparent: the request span becomes its child
        pipeline.tracing.accept(ctx, scope["headers"])
    stream = ctx.request.body.stream
    watch = state["watches"].watch(receive)
    try:
        result = await (pipeline.stream(ctx) if stream else pipeline.complete(ctx))
    except BaseException as exc:
        watch.stop()
        if watch.absorb(exc):
            return nothing
        raise
    answered = isinstance(result, Reply)
    deprecated = state["gateway"].deprecations  # a deprecated version answers with Deprecation (and Sunset)
    if deprecated and (extra := deprecated.get(result.headers.get("x-pointsman-model", ""))):  # a hit's too
        result.headers.update(extra)
    reply_headers = {**ctx.headers, **result.headers, "x-request-id": ctx.request_id} if answered else result.headers
    if headers:
        reply_headers = {**reply_headers, **headers}
    settle = pipeline.settle if pipeline.has_policies else None
    if stream:
        first, rest = (None, replay(result.chunks)) if answered else (result.first, result.rest)
        on_end = None if settle is None else lambda outcome: settle(ctx, _stream_outcome(result, answered, outcome))
        return SSEStream(first, rest, reply_headers, watch, on_end, dialect)
    watch.stop()
    after = None if settle is None else lambda: settle(
        ctx, Outcome("answered") if answered else Outcome("ok", body=result.body))
    try:
        body = result.body if dialect is None else dialect.plain(result.body)
    except GatewayError as exc:  # an answer the dialect cannot read (a 502): what it cost is settled all the same
        if settle is not None:
            await settle(ctx, Outcome("error", error=exc))
        raise
    return JSONBody(body, reply_headers, after=after)
