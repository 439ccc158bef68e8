"""One request's steps, the same for plain and streamed requests:
admit -> decide -> approve -> execute (retries, fallbacks) -> settle, carried by one RequestContext."""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from backends.base import Backend
from gateway.deployments import Lease
from gateway.relay import StreamRelay
from gateway.service import Gateway
from policies.base import PolicyChain
from policies.context import Outcome, Reply, RequestContext
from protocol.errors import GatewayError, UpstreamError, UpstreamTimeout
from protocol.openai import chunk_view
from routing.router import Attempt, Decision

if TYPE_CHECKING:
    from gateway.tracing import Tracing

__all__ = ["Pipeline", "Served", "StreamStart", "first_payload"]

log = logging.getLogger("pointsman")
_INLINE_SCAN_BYTES = 64 * 1024  # larger bodies are read for their usage in a thread, off the event loop
T = TypeVar("T")


@dataclass(slots=True)
class Served:
    """A plain answer: the JSON body and the response headers (route, relayed upstream headers, policies')."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class StreamStart:
    """A stream whose first payload already arrived: errors before it were still answerable as HTTP errors."""

    first: bytes | None
    rest: AsyncIterator[bytes]
    headers: dict[str, str] = field(default_factory=dict)
    # once the stream has ended: the plain answer it stands for, when it can be put together (see StreamRelay)
    assembled: Callable[[], bytes | None] = lambda: None


def route_headers(ctx: RequestContext, attempt: Attempt, decision: Decision, relayed: dict[str, str]) -> dict:
    """The response's headers: the upstream's relayed ones, the route taken, the request id, the policies'.
    Also notes the route and task in the context."""
    ctx.route = attempt.route
    headers = relayed  # a fresh dict per attempt
    headers["x-pointsman-model"] = attempt.model.id
    headers["x-pointsman-route"] = attempt.route
    headers["x-request-id"] = ctx.request_id
    if decision.analysis is not None:
        headers["x-pointsman-task"] = ctx.task = decision.analysis.task
    if ctx.headers:
        headers.update(ctx.headers)
    return headers


def _outcome_of(exc: BaseException) -> Outcome:
    if isinstance(exc, GatewayError):
        return Outcome("error", error=exc)
    if isinstance(exc, Exception):
        return Outcome("error", error=GatewayError(f"internal error: {type(exc).__name__}"))
    return Outcome("cancelled")  # CancelledError: the client left, or the gateway is stopping


class Pipeline:
    """Runs requests through the policy chain and the gateway's models. `settle` is the caller's to run on
    success (after the response is written); every other ending is settled here."""

    def __init__(self, gateway: Gateway, policies: PolicyChain, tracing: Tracing | None = None) -> None:
        self.gateway = gateway
        self.policies = policies
        self.has_policies = bool(policies)  # read on every request: a plain attribute, not a __bool__ call
        self.embedding_policies = policies.for_endpoint("embeddings")  # rate limits, budgets, usage rows
        self._decide = gateway.decide
        self._attempt: Callable[..., Awaitable[Any]] | None = None  # the traced twin's: a span per attempt
        self.tracing = tracing
        # tracing: None when off. When on, a request the sampler passes over runs on this pipeline, exactly the
        # untraced path (Tracing only sends its traceparent upstream); a sampled one runs on `traced`, a twin
        # whose policy chain, decision and attempts each make a span
        self.traced = self
        if tracing is not None:
            traced = self.traced = copy.copy(self)
            traced.policies = tracing.policies(policies)  # type: ignore[assignment]
            traced._decide = tracing.decide(gateway.decide)
            traced._attempt = tracing.attempt
            # both pipelines' own methods, bound once before these replace them: a request makes no closure
            complete, stream, settle, embed = self.complete, self.stream, self.settle, self.embed
            complete_traced, stream_traced, settle_traced = traced.complete, traced.stream, traced.settle
            embed_traced = traced.embed
            self.complete = lambda ctx: tracing.complete(ctx, complete, complete_traced)  # type: ignore[method-assign]
            self.stream = lambda ctx: tracing.stream(ctx, stream, stream_traced)  # type: ignore[method-assign]
            self.embed = lambda ctx: tracing.embed(ctx, embed, embed_traced)  # type: ignore[method-assign]
            self.settle = lambda ctx, outcome: (  # type: ignore[method-assign]
                settle_traced if tracing.sampled(ctx) else settle)(ctx, outcome)

    async def settle(self, ctx: RequestContext, outcome: Outcome) -> None:
        if self.has_policies:
            await self.policies.settle(ctx, outcome)

    async def _prepare(self, ctx: RequestContext) -> Reply | Decision:
        """admit, then decide, then approve: a Reply when a policy answered, else the routing decision."""
        policies = self.policies
        reply = await policies.admit(ctx)
        if reply is not None:
            return reply
        decision = ctx.decision = await self._decide(ctx.request, False, ctx.principal)
        await policies.approve(ctx, decision)
        return decision

    async def complete(self, ctx: RequestContext) -> Served | Reply:
        try:
            if self.has_policies:
                prepared = await self._prepare(ctx)
                if isinstance(prepared, Reply):
                    return prepared
            else:  # no policies: straight to the decision (one coroutine fewer on the hottest path)
                prepared = ctx.decision = await self._decide(ctx.request, False, ctx.principal)
            request = ctx.request
            attempt, lease, relayed, body = await self._first_success(
                ctx, prepared, lambda backend, index, headers: backend.complete(request, index, headers)
            )
            prompt_tokens, completion_tokens = _usage(body)
            lease.ok(completion_tokens=completion_tokens)
            ctx.record_usage(attempt.model, prompt_tokens, completion_tokens)
            return Served(body, route_headers(ctx, attempt, prepared, relayed))
        except BaseException as exc:
            await self.settle(ctx, _outcome_of(exc))
            raise

    async def embed(self, ctx: RequestContext) -> Served:
        """An embeddings request (ctx.request is a ParsedEmbeddings): the policies that understand it (see
        Policy.endpoints: rate limits, budgets, the usage row) around the same retries, fallbacks, leases and
        breakers as a completion. The caller settles a success with `settle_embedding` once it is written."""
        policies = self.embedding_policies
        request = ctx.request
        try:
            if policies:
                await policies.admit(ctx)  # no policy answers an embeddings request itself (no cache here)
            decision = ctx.decision = self.gateway.decide_embeddings(request, ctx.principal)  # type: ignore[arg-type]
            if policies:
                await policies.approve(ctx, decision)
            attempt, lease, relayed, body = await self._first_success(
                ctx, decision,
                lambda backend, index, headers: backend.embeddings(request, index, headers),  # type: ignore[attr-defined]
            )
            # the usage sits after every vector: reading it means scanning them all (~15 MB for 2048 float answers)
            prompt_tokens, _ = (_usage(body) if len(body) <= _INLINE_SCAN_BYTES
                                else await asyncio.to_thread(_usage, body))
            lease.ok()
            ctx.record_usage(attempt.model, prompt_tokens, None)
            return Served(body, route_headers(ctx, attempt, decision, relayed))
        except BaseException as exc:
            if policies:
                await policies.settle(ctx, _outcome_of(exc))
            raise

    async def settle_embedding(self, ctx: RequestContext, outcome: Outcome) -> None:
        if self.embedding_policies:
            await self.embedding_policies.settle(ctx, outcome)

    async def stream(self, ctx: RequestContext) -> StreamStart | Reply:
        """Open the stream and wait for its first payload, so failures until then can still be retried. The model
        is always asked for the stream's usage (budgets, limits and usage rows need the prompt's tokens); the
        relay keeps that last chunk from a client that did not ask for it."""
        request = ctx.request  # as the policies leave it (a template rendered, an experiment's arm), then below

        async def open_stream(backend: Backend, index: int, headers: dict[str, str],
                              ) -> tuple[bytes | None, AsyncIterator[bytes]]:
            return await first_payload(backend.stream(request, index, headers))

        try:
            if self.has_policies:
                prepared = await self._prepare(ctx)
                if isinstance(prepared, Reply):
                    return prepared
            else:
                prepared = ctx.decision = await self._decide(ctx.request, False, ctx.principal)
            request = ctx.request.asking_usage()
            attempt, lease, relayed, (first, rest) = await self._first_success(ctx, prepared, open_stream)
        except BaseException as exc:
            await self.settle(ctx, _outcome_of(exc))
            raise
        ttft = time.monotonic() - lease.started
        relay = StreamRelay(self.gateway, ctx, request, attempt, lease, ttft)
        shown = None if first is None else relay.shown(first)
        return StreamStart(shown, relay.run(first, rest), route_headers(ctx, attempt, prepared, relayed),
                           relay.assembled)

    async def _first_success(self, ctx: RequestContext, decision: Decision,
                             call: Callable[[Backend, int, dict[str, str]], Awaitable[T]],
                             ) -> tuple[Attempt, Lease, dict[str, str], T]:
        """Try the decision's models in order and each one's deployments in the balancer's order, until `call`
        succeeds: retryable failures (connect, timeout, 5xx, 429) move on, anything else ends the request.
        With routing.request_timeout_s, each attempt gets only what is left of the request's deadline, and none
        starts after it (504). Returns the attempt, its lease, the upstream headers to relay (Retry-After,
        x-ratelimit-*) and the result."""
        gateway, traced = self.gateway, self._attempt
        last: GatewayError | None = None
        routing = gateway.config.routing  # per request: a reload may change it
        deadline = ctx.deadline
        if routing.request_timeout_s is not None:
            whole = ctx.started + routing.request_timeout_s
            deadline = ctx.deadline = whole if deadline is None else min(deadline, whole)
        left = 0.0
        for attempt in decision.attempts:
            backend, pool = gateway.backends.get(attempt.model.id), gateway.pools.get(attempt.model.id)
            if backend is None or pool is None:
                continue  # removed by a config reload since the decision
            for index in pool.attempts(gateway.rng):
                if deadline is not None and (left := deadline - time.monotonic()) <= 0:
                    breaker = pool.breakers[index]
                    breaker.release(breaker.probe())  # not tried: a half-open breaker's probe slot, just taken
                    raise _deadline_passed(routing.request_timeout_s, last)
                lease = pool.lease(index)
                ctx.attempts.append(lease.record)
                relayed: dict[str, str] = {}
                try:
                    if traced is None:
                        pending = call(backend, index, relayed)
                    else:  # a client span per attempt, its id sent upstream as the traceparent
                        pending = traced(ctx, attempt, backend, index, call, relayed)
                    result = await (pending if deadline is None else _within(pending, left))
                except UpstreamError as exc:
                    lease.fail(exc)
                    if exc.status == 429:
                        pool.hold(index, exc, routing.rate_limit_hold_max_s)
                    if not exc.retryable:
                        raise
                    last = exc
                    log.warning("%s deployment %s failed (%s); trying the next", attempt.model.id, index, exc.message)
                    continue
                except _DeadlineCut:
                    # the request's deadline ended it: that is the deployment's timeout only when it had the
                    # request's whole time to itself (the first attempt); a later one ends with no verdict
                    first = lease.record is ctx.attempts[0]
                    lease.fail(UpstreamTimeout("request deadline") if first else TimeoutError())
                    lease.record.error = "request_timeout"
                    raise _deadline_passed(routing.request_timeout_s, last) from None
                except BaseException as exc:
                    lease.fail(exc)
                    raise
                return attempt, lease, relayed, result
        raise (last or decision.rate_limited() or gateway.removed_since(decision)
               or gateway.nothing_to_try(decision, ctx.request))


class _DeadlineCut(Exception):
    """An attempt ran into the request's deadline (not the upstream's own timeout)."""


async def _within(pending: Awaitable[T], seconds: float) -> T:
    """`pending`, cancelled after `seconds`: then _DeadlineCut (a TimeoutError of its own passes as it is)."""
    timeout = asyncio.timeout(seconds)
    try:
        async with timeout:
            return await pending
    except TimeoutError:
        if timeout.expired():
            raise _DeadlineCut from None
        raise


def _deadline_passed(timeout_s: float | None, last: GatewayError | None) -> UpstreamTimeout:
    """The 504 a request gets when its deadline passes before any deployment answered."""
    whole = f" (routing.request_timeout_s: {timeout_s:g} s)" if timeout_s is not None else ""
    tail = f"; the last failure: {last.message}" if last is not None else ""
    return UpstreamTimeout(f"No deployment answered within the request's deadline{whole}{tail}")


async def first_payload(stream: AsyncIterator[bytes]) -> tuple[bytes | None, AsyncIterator[bytes]]:
    """A stream's first payload (None when it ends at once) and the rest; a failure before it closes the stream,
    so the caller can retry elsewhere while nothing has reached the client."""
    rest = aiter(stream)
    try:
        return await anext(rest), rest
    except StopAsyncIteration:
        return None, rest
    except BaseException:
        await rest.aclose()  # type: ignore[attr-defined]
        raise


def _usage(body: bytes) -> tuple[int | None, int | None]:
    """The response's usage (prompt, completion tokens), skipping the rest of the body."""
    try:
        usage = chunk_view(body).usage
    except msgspec.DecodeError:  # also a ValidationError: a body we cannot read just gives no figure
        return None, None
    return (usage.prompt_tokens, usage.completion_tokens) if usage is not None else (None, None)
