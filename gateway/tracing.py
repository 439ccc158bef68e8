"""OpenTelemetry traces of the request path: a GenAI-convention span per request, child spans per step."""

from __future__ import annotations

import functools
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import msgspec
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from backends.openai_upstream import OUTGOING_HEADERS
from config.schema import TracingConfig
from policies.base import PolicyChain
from policies.context import Outcome, Reply, RequestContext
from protocol.errors import GatewayError, UpstreamStatusError
from protocol.openai import ChatCompletionRequest, chunk_view

if TYPE_CHECKING:
    from routing.router import Attempt

__all__ = ["TracedPolicies", "Tracing"]

T = TypeVar("T")
_PROPAGATOR = TraceContextTextMapPropagator()
_SPAN = "trace_span"  # ctx.state key: the request's span, parent of every step's span (settle runs after it ends)
_PARENT = "trace_parent"  # ctx.state key: the client's traceparent/tracestate, when it sent one


@functools.lru_cache(maxsize=256)
def _server(base_url: str) -> dict[str, Any]:
    """An upstream's server.address and server.port attributes, worked out once per URL."""
    url = urlsplit(base_url)
    return {"server.address": url.hostname or ""} | ({"server.port": url.port} if url.port is not None else {})


def _error_type(exc: BaseException) -> str:
    code = getattr(exc, "code", None) if isinstance(exc, GatewayError) else None
    return code or type(exc).__name__


def _fail(span: Span, exc: BaseException) -> None:
    span.set_attribute("error.type", _error_type(exc))
    if isinstance(exc, UpstreamStatusError):
        span.set_attribute("http.response.status_code", exc.status)
    span.set_status(StatusCode.ERROR, str(exc)[:200])


class Tracing:
    """Built only when `tracing.enabled`: the pipeline holds None otherwise and makes no span and no context.
    Spans are parented explicitly through the request context, so a step that runs in another task (settle
    after the body is written, the rest of a stream) still joins its request's trace."""

    def __init__(self, config: TracingConfig, processor: SpanProcessor | None = None) -> None:
        # a request without a client's traceparent is sampled here, at sample_ratio (see _start_request), so the
        # SDK only ever sees the roots to record; spans under a parent follow the parent's sampled flag
        self.sample_ratio = config.sample_ratio
        self.provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}),
                                       sampler=ParentBased(ALWAYS_ON))
        self._ids = self.provider.id_generator
        if processor is None and config.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # batched, exported from the processor's own thread: never on the event loop
            processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=config.endpoint))
        if processor is not None:
            self.provider.add_span_processor(processor)
        self.tracer = self.provider.get_tracer("pointsman")

    def shutdown(self) -> None:
        """Flush and stop the exporter (blocking: call it from a thread)."""
        self.provider.shutdown()

    @staticmethod
    def accept(ctx: RequestContext, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """Keep the client's W3C trace context (traceparent, tracestate) for the request span."""
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers
                   if k == b"traceparent" or k == b"tracestate"}
        if carrier:
            ctx.state[_PARENT] = carrier

    def _child_context(self, ctx: RequestContext) -> Context | None:
        span = ctx.state.get(_SPAN)
        return trace.set_span_in_context(span) if span is not None else None

    def _start_request(self, ctx: RequestContext) -> Span:
        carrier = ctx.state.get(_PARENT)
        if carrier is None and random.random() >= self.sample_ratio:
            # an unsampled root: only its ids, for the traceparent sent upstream (the SDK's sampler, span and
            # context cost ~20 us a request for a span that records nothing)
            span: Span = NonRecordingSpan(SpanContext(self._ids.generate_trace_id(), self._ids.generate_span_id(),
                                                      is_remote=False, trace_flags=TraceFlags(TraceFlags.DEFAULT)))
            ctx.state[_SPAN] = span
            return span
        body = ctx.request.body
        operation = "chat" if isinstance(body, ChatCompletionRequest) else "text_completion"
        attributes: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.request.model": body.model,
                                      "pointsman.request_id": ctx.request_id}
        if (max_tokens := ctx.request.max_new_tokens) is not None:
            attributes["gen_ai.request.max_tokens"] = max_tokens
        if body.temperature is not None:
            attributes["gen_ai.request.temperature"] = body.temperature
        if body.top_p is not None:
            attributes["gen_ai.request.top_p"] = body.top_p
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        span = self.tracer.start_span(f"{operation} {body.model}", context=parent, kind=SpanKind.SERVER,
                                      attributes=attributes)
        ctx.state[_SPAN] = span
        return span

    @staticmethod
    def _end_request(ctx: RequestContext, span: Span, body: bytes | None = None) -> None:
        if not span.is_recording():  # not sampled: nothing to describe
            span.end()
            return
        attributes: dict[str, Any] = {}
        if ctx.model is not None:
            attributes["gen_ai.response.model"] = ctx.model
        if ctx.route is not None:
            attributes["pointsman.route"] = ctx.route
        if ctx.prompt_tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = ctx.prompt_tokens
        if ctx.completion_tokens is not None:
            attributes["gen_ai.usage.output_tokens"] = ctx.completion_tokens
        if ctx.cache is not None:
            attributes["pointsman.cache"] = ctx.cache
        if body is not None:
            try:  # skips everything but the choices' finish_reason: one cheap decode, only while traced
                reasons = [c.finish_reason for c in chunk_view(body).choices if c.finish_reason]
            except msgspec.DecodeError:
                reasons = []
            if reasons:
                attributes["gen_ai.response.finish_reasons"] = reasons
        span.set_attributes(attributes)  # one lock for all of them, not one per attribute
        span.end()

    async def complete(self, ctx: RequestContext, run: Callable[[], Awaitable[T]]) -> T:
        """Run a plain request's steps under its span; the span ends with the answer (settle joins it later)."""
        span, result = await self._under_span(ctx, run)
        self._end_request(ctx, span, None if isinstance(result, Reply) else getattr(result, "body", None))
        return result

    async def stream(self, ctx: RequestContext, run: Callable[[], Awaitable[T]]) -> T:
        """As `complete`, but a stream's span ends when its last chunk has gone (or it broke, or the client left)."""
        span, result = await self._under_span(ctx, run)
        if isinstance(result, Reply):
            self._end_request(ctx, span)
        else:
            result.rest = self._until_end(ctx, span, result.rest)  # type: ignore[attr-defined]
        return result

    async def _under_span(self, ctx: RequestContext, run: Callable[[], Awaitable[T]]) -> tuple[Span, T]:
        """Start the request's span and run `run` in it; a failure marks and ends the span, and is raised."""
        span = self._start_request(ctx)
        if not span.is_recording():  # nothing below makes a span: no context to set either
            try:
                return span, await run()
            except BaseException:
                span.end()
                raise
        with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
            try:
                return span, await run()
            except BaseException as exc:
                _fail(span, exc)
                self._end_request(ctx, span)
                raise

    async def _until_end(self, ctx: RequestContext, span: Span, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async for chunk in rest:
                yield chunk
        except BaseException as exc:
            _fail(span, exc)
            raise
        finally:
            await rest.aclose()  # type: ignore[attr-defined]
            self._end_request(ctx, span)

    def decide(self, decide: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        """Gateway.decide under a `route` span (a child of the current request span)."""
        tracer = self.tracer

        async def traced(*args: Any) -> T:
            if not trace.get_current_span().is_recording():  # the request is not sampled: no child spans
                return await decide(*args)
            with tracer.start_as_current_span("route") as span:
                decision = await decide(*args)
                span.set_attribute("pointsman.chain", [a.model.id for a in getattr(decision, "attempts", ())])
                return decision

        return traced

    async def attempt(self, ctx: RequestContext, attempt: Attempt, backend: Any, index: int,
                      call: Callable[[Any, int, dict[str, str]], Awaitable[T]], relayed: dict[str, str]) -> T:
        """One try of one deployment, as a client span whose id goes upstream in the `traceparent` header (an
        unsampled request sends its own span's, flagged unsampled, and makes no span here)."""
        parent = ctx.state.get(_SPAN)
        if not _sampled(ctx):
            token = OUTGOING_HEADERS.set(_unsampled_headers(parent) if parent is not None else {})
            try:
                return await call(backend, index, relayed)
            finally:
                OUTGOING_HEADERS.reset(token)
        attributes: dict[str, Any] = {"gen_ai.request.model": attempt.model.id, "pointsman.deployment": index,
                                      "pointsman.route": attempt.route}
        upstreams = getattr(backend, "upstreams", None)
        if upstreams is not None and index < len(upstreams):
            attributes.update(_server(upstreams[index].base_url))
        span = self.tracer.start_span(f"upstream {attempt.model.id}", context=self._child_context(ctx),
                                      kind=SpanKind.CLIENT, attributes=attributes)
        outgoing = {}
        _PROPAGATOR.inject(outgoing, context=trace.set_span_in_context(span))
        token = OUTGOING_HEADERS.set(outgoing)
        try:
            return await call(backend, index, relayed)
        except BaseException as exc:
            _fail(span, exc)
            raise
        finally:
            OUTGOING_HEADERS.reset(token)
            span.end()

    def policies(self, chain: PolicyChain) -> TracedPolicies:
        return TracedPolicies(self, chain)


class TracedPolicies:
    """A PolicyChain whose three phases each run under a span: `policies.admit`, `.approve`, `.settle`."""

    __slots__ = ("chain", "tracing")

    def __init__(self, tracing: Tracing, chain: PolicyChain) -> None:
        self.tracing, self.chain = tracing, chain

    def __bool__(self) -> bool:
        return bool(self.chain)

    def for_endpoint(self, endpoint: str) -> PolicyChain:
        return self.chain.for_endpoint(endpoint)

    def _span(self, ctx: RequestContext, name: str):
        return self.tracing.tracer.start_as_current_span(name, context=self.tracing._child_context(ctx))

    async def admit(self, ctx: RequestContext) -> Reply | None:
        if not _sampled(ctx):
            return await self.chain.admit(ctx)
        with self._span(ctx, "policies.admit") as span:
            reply = await self.chain.admit(ctx)
            span.set_attribute("pointsman.answered", reply is not None)
            return reply

    async def approve(self, ctx: RequestContext, decision: Any) -> None:
        if not _sampled(ctx):
            return await self.chain.approve(ctx, decision)
        with self._span(ctx, "policies.approve"):
            await self.chain.approve(ctx, decision)

    async def settle(self, ctx: RequestContext, outcome: Outcome) -> None:
        if not _sampled(ctx):
            return await self.chain.settle(ctx, outcome)
        with self._span(ctx, "policies.settle") as span:
            span.set_attribute("pointsman.outcome", outcome.status)
            await self.chain.settle(ctx, outcome)


def _unsampled_headers(span: Span) -> dict[str, str]:
    """The W3C headers an unsampled request sends upstream: its own span's ids, the sampled flag clear."""
    context = span.get_span_context()
    headers = {"traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"}
    if context.trace_state:
        headers["tracestate"] = context.trace_state.to_header()
    return headers


def _sampled(ctx: RequestContext) -> bool:
    """Whether the request's span records: an unsampled request makes no child spans at all."""
    span = ctx.state.get(_SPAN)  # ended already when settle runs: its context still says whether it was sampled
    return span is not None and span.get_span_context().trace_flags.sampled
