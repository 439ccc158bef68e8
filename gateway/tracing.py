"""OpenTelemetry traces of the request path: a GenAI-convention span per request, child spans per step."""

from __future__ import annotations

import functools
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import msgspec
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanContext, SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from backends.openai_upstream import OUTGOING_HEADERS
from config.schema import TracingConfig
from gateway.spans import RecordedSpan, SpanSink, new_span_id, unsampled_traceparent
from policies.base import PolicyChain
from policies.context import Outcome, Reply, RequestContext
from protocol.errors import GatewayError, UpstreamStatusError
from protocol.openai import ChatCompletionRequest, ParsedEmbeddings, chunk_view

if TYPE_CHECKING:
    from routing.router import Attempt

__all__ = ["TracedPolicies", "Tracing"]

T = TypeVar("T")
Step = Callable[[RequestContext], Awaitable[T]]  # a pipeline's complete or stream, bound to the pipeline
_PROPAGATOR = TraceContextTextMapPropagator()
_SPAN = "trace_span"  # ctx.state key: the request's span, parent of every step's span (settle runs after it ends)
_PARENT = "trace_parent"  # ctx.state key: the client's traceparent/tracestate, when it sent one
# one W3C tracestate list-member, as the SDK's TraceState parses them (opentelemetry/trace/span.py)
_TRACESTATE_MEMBER = re.compile(r"(?:[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
                                r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")


@functools.lru_cache(maxsize=256)
def _server(base_url: str) -> dict[str, Any]:
    """An upstream's server.address and server.port attributes, worked out once per URL."""
    url = urlsplit(base_url)
    return {"server.address": url.hostname or ""} | ({"server.port": url.port} if url.port is not None else {})


def _error_type(exc: BaseException) -> str:
    code = getattr(exc, "code", None) if isinstance(exc, GatewayError) else None
    return code or type(exc).__name__


def _fail(span: Span, exc: BaseException, record: bool = False) -> None:
    """Mark `span` failed by `exc`; `record` adds the exception as an event (a step's own failure or refusal)."""
    if record:
        span.record_exception(exc)
    span.set_attribute("error.type", _error_type(exc))
    if isinstance(exc, UpstreamStatusError):
        span.set_attribute("http.response.status_code", exc.status)
    span.set_status(StatusCode.ERROR, str(exc)[:200])


class Tracing:
    """Built only when `tracing.enabled`: the pipeline holds None otherwise and makes no span and no context.
    Sampling is decided here, once per request, before any span is made: a client's traceparent is followed
    (parent-based), a root is sampled at `sample_ratio`. A sampled request's spans are RecordedSpans
    (gateway/spans.py) handed to the SDK's span processor as they end. Step spans are parented explicitly
    through the request context, so a step that runs in another task (settle after the body is written, the
    rest of a stream) still joins its request's trace."""

    def __init__(self, config: TracingConfig, processor: SpanProcessor | None = None) -> None:
        self.sample_ratio = config.sample_ratio
        if processor is None and config.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # batched, exported from the processor's own thread: never on the event loop
            processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=config.endpoint))
        self.sink = SpanSink(config.service_name, processor)

    def shutdown(self) -> None:
        """Flush and stop the exporter (blocking: call it from a thread)."""
        self.sink.shutdown()

    @staticmethod
    def accept(ctx: RequestContext, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """Keep the client's W3C trace context (traceparent, tracestate) for the request span. What the propagator
        would warn about is dropped here, silently (a client must not make us log per request): a traceparent over
        the propagator's 512 characters (the request is a root, as for a malformed one) and an invalid tracestate (the
        traceparent is still followed, as W3C allows)."""
        carrier: dict[str, str] = {}
        for k, v in headers:  # a loop, not a comprehension: most requests have neither, and this runs on each
            if k == b"traceparent" or k == b"tracestate":
                carrier[k.decode("latin-1")] = v.decode("latin-1")
        if not carrier or len(carrier.get("traceparent", "")) > 512:
            return
        if "tracestate" in carrier and not _valid_tracestate(carrier["tracestate"]):
            del carrier["tracestate"]
        ctx.state[_PARENT] = carrier

    @staticmethod
    def _parent(ctx: RequestContext) -> SpanContext | None:
        """The parent of the request's step spans: its own span's context."""
        span = ctx.state.get(_SPAN)
        return span.context if span is not None else None

    def _start_request(self, ctx: RequestContext) -> RecordedSpan | None:
        """The request's span when it is sampled; None when not, with the traceparent for upstreams set in the
        request's task (its context is its own: nothing to reset; a sampled request's attempts set theirs)."""
        carrier = ctx.state.get(_PARENT)
        parent = None
        if carrier is not None:  # a malformed traceparent is no parent: the request is a root
            parent = trace.get_current_span(_PROPAGATOR.extract(carrier)).get_span_context()
            parent = parent if parent.is_valid else None
        if parent is None and random.random() >= self.sample_ratio:
            # an unsampled root: only ids for the traceparent sent upstream, flagged unsampled
            OUTGOING_HEADERS.set({"traceparent": unsampled_traceparent()})
            return None
        if parent is not None and not parent.trace_flags.sampled:
            # the client's trace says unsampled: followed, and passed on under a span id of ours
            OUTGOING_HEADERS.set(_w3c_headers(SpanContext(parent.trace_id, new_span_id(), False,
                                                          parent.trace_flags, parent.trace_state)))
            return None
        OUTGOING_HEADERS.set(None)  # not an earlier request's of this task (a WebSocket's requests share one)
        request = ctx.request
        body = request.body
        embeddings = isinstance(request, ParsedEmbeddings)
        operation = ("embeddings" if embeddings else "chat" if isinstance(body, ChatCompletionRequest)
                     else "text_completion")
        attributes: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.request.model": body.model,
                                      "pointsman.request_id": ctx.request_id}
        if not embeddings:  # the sampling settings a generation has
            if (max_tokens := request.max_new_tokens) is not None:
                attributes["gen_ai.request.max_tokens"] = max_tokens
            if body.temperature is not None:
                attributes["gen_ai.request.temperature"] = body.temperature
            if body.top_p is not None:
                attributes["gen_ai.request.top_p"] = body.top_p
        span = ctx.state[_SPAN] = self.sink.start(f"{operation} {body.model}", parent, SpanKind.SERVER, attributes)
        return span

    @staticmethod
    def sampled(ctx: RequestContext) -> bool:
        """Whether the request is traced (its steps run on the pipeline's traced twin)."""
        return _SPAN in ctx.state

    @staticmethod
    def _end_request(ctx: RequestContext, span: Span, body: bytes | None = None) -> None:
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

    def complete(self, ctx: RequestContext, plain: Step[T], traced: Step[T]) -> Awaitable[T]:
        """A plain request: `traced(ctx)` under the request's span when it is sampled (the span ends with the
        answer; settle joins it later), else `plain(ctx)` itself, awaited by the caller with no frame of ours
        around it."""
        span = self._start_request(ctx)
        return plain(ctx) if span is None else self._complete(ctx, span, traced)

    def embed(self, ctx: RequestContext, plain: Step[T], traced: Step[T]) -> Awaitable[T]:
        """An embeddings request, as `complete` (its answer's vectors are not read for the span)."""
        span = self._start_request(ctx)
        return plain(ctx) if span is None else self._complete(ctx, span, traced, finish_reasons=False)

    def stream(self, ctx: RequestContext, plain: Step[T], traced: Step[T]) -> Awaitable[T]:
        """As `complete`, but a stream's span ends when its last chunk has gone (or it broke, or the client left)."""
        span = self._start_request(ctx)
        return plain(ctx) if span is None else self._stream(ctx, span, traced)

    async def _complete(self, ctx: RequestContext, span: RecordedSpan, traced: Step[T],
                        finish_reasons: bool = True) -> T:
        """`traced(ctx)` under the request's span, ended with the answer (its finish reasons read from the body
        unless `finish_reasons` is off: an embeddings answer has none, only vectors)."""
        result = await self._under_span(ctx, span, traced)
        read = finish_reasons and not isinstance(result, Reply)
        self._end_request(ctx, span, getattr(result, "body", None) if read else None)
        return result

    async def _stream(self, ctx: RequestContext, span: RecordedSpan, traced: Step[T]) -> T:
        result = await self._under_span(ctx, span, traced)
        if isinstance(result, Reply):
            self._end_request(ctx, span)
        else:
            result.rest = self._until_end(ctx, span, result.rest)  # type: ignore[attr-defined]
        return result

    async def _under_span(self, ctx: RequestContext, span: Span, run: Step[T]) -> T:
        """Run `run(ctx)` in the request's span; a failure marks and ends the span, and is raised."""
        with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
            try:
                return await run(ctx)
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
        sink = self.sink

        async def traced(*args: Any) -> T:
            current = trace.get_current_span().get_span_context()  # the request's span (see _under_span)
            with _Step(sink.start("route", current if current.is_valid else None)) as span:
                decision = await decide(*args)
                span.set_attribute("pointsman.chain", [a.model.id for a in getattr(decision, "attempts", ())])
                return decision

        return traced

    async def attempt(self, ctx: RequestContext, attempt: Attempt, backend: Any, index: int,
                      call: Callable[[Any, int, dict[str, str]], Awaitable[T]], relayed: dict[str, str]) -> T:
        """One try of one deployment of a sampled request, as a client span whose id goes upstream in the
        `traceparent` header."""
        attributes: dict[str, Any] = {"gen_ai.request.model": attempt.model.id, "pointsman.deployment": index,
                                      "pointsman.route": attempt.route}
        upstreams = getattr(backend, "upstreams", None)
        if upstreams is not None and index < len(upstreams):
            attributes.update(_server(upstreams[index].base_url))
        span = self.sink.start(f"upstream {attempt.model.id}", Tracing._parent(ctx), SpanKind.CLIENT, attributes)
        token = OUTGOING_HEADERS.set(_w3c_headers(span.context))
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
    """A PolicyChain whose three phases each run under a span (`policies.admit`, `.approve`, `.settle`): the chain
    of the pipeline's traced twin, which only sampled requests run on."""

    __slots__ = ("chain", "tracing")

    def __init__(self, tracing: Tracing, chain: PolicyChain) -> None:
        self.tracing, self.chain = tracing, chain

    def __bool__(self) -> bool:
        return bool(self.chain)

    def for_endpoint(self, endpoint: str) -> PolicyChain:
        return self.chain.for_endpoint(endpoint)

    def _phase(self, ctx: RequestContext, name: str) -> AbstractContextManager[Span]:
        """One phase's span, a child of the request's, never made current (its steps parent explicitly)."""
        return _Step(self.tracing.sink.start(name, Tracing._parent(ctx)))

    async def admit(self, ctx: RequestContext) -> Reply | None:
        with self._phase(ctx, "policies.admit") as span:
            reply = await self.chain.admit(ctx)
            span.set_attribute("pointsman.answered", reply is not None)
            return reply

    async def approve(self, ctx: RequestContext, decision: Any) -> None:
        with self._phase(ctx, "policies.approve"):
            await self.chain.approve(ctx, decision)

    async def settle(self, ctx: RequestContext, outcome: Outcome) -> None:
        with self._phase(ctx, "policies.settle") as span:
            span.set_attribute("pointsman.outcome", outcome.status)
            await self.chain.settle(ctx, outcome)


class _Step:
    """A step's span around its work, ended however the work ends; a step that fails (or refuses the request)
    records the exception and is marked an error. A class, not @contextmanager: four of these run in every
    sampled request, and a generator's context manager costs ~1 us more each here (1.4 vs 0.4 us)."""

    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def __enter__(self) -> Span:
        return self.span

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            _fail(self.span, exc, record=True)
        self.span.end()


def _valid_tracestate(header: str) -> bool:
    """Whether the SDK takes `header` without a warning: at most 8192 characters, 32 members, each well-formed."""
    if len(header) > 8192:
        return False
    members = [m for m in (m.strip(" \t") for m in header.split(",")) if m]
    return len(members) <= 32 and all(_TRACESTATE_MEMBER.fullmatch(m) for m in members)


def _w3c_headers(context: SpanContext) -> dict[str, str]:
    """The W3C trace context sent upstream with the span of `context` as the parent (its sampled flag as the
    span's): what the propagator's inject writes, without the context it would be handed."""
    headers = {"traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"}
    if context.trace_state:
        headers["tracestate"] = context.trace_state.to_header()
    return headers

