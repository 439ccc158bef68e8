"""Spans recorded cheaply on the request path and handed, as they end, to OpenTelemetry's span processors."""

from __future__ import annotations

import logging
import random
import time
import traceback
from collections.abc import Mapping
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags

__all__ = ["RecordedSpan", "SpanSink", "new_span_id", "new_trace_id", "unsampled_traceparent"]

log = logging.getLogger("pointsman")
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)
# The longest string kept in a span's name or attribute values (the SDK's SpanLimits.max_span_attribute_length,
# which its Tracer applies and RecordedSpan does its own way): a client's model name goes into both, and one huge
# one would have its whole export batch refused by a collector's size limit. An exception's stack trace gets more.
MAX_LENGTH = 256
MAX_STACKTRACE = 4096


def _bounded(attributes: Mapping[str, Any]) -> Mapping[str, Any]:
    """`attributes` with each string value cut to MAX_LENGTH characters: themselves when none is longer (a scan
    and no copy, for the common case)."""
    for value in attributes.values():
        if type(value) is str and len(value) > MAX_LENGTH:
            return {k: v[:MAX_LENGTH] if type(v) is str else v for k, v in attributes.items()}
    return attributes


def new_trace_id() -> int:
    """A random W3C trace id, as the SDK's RandomIdGenerator makes them (never 0, the invalid id)."""
    return random.getrandbits(128) or 1


def new_span_id() -> int:
    return random.getrandbits(64) or 1


_LOW_128 = (1 << 128) - 1


def unsampled_traceparent() -> str:
    """A W3C traceparent of new ids, flagged unsampled: 192 random bits, the trace id's 128 and the span id's 64,
    neither all zeros (the invalid ids). Made from one draw and one bytes-to-hex: 3.6k machine instructions, where
    formatting the two ids as ints took 6.3k (callgrind), on every request the sampler passes over."""
    bits = random.getrandbits(192)
    while not (bits & _LOW_128 and bits >> 128):
        bits = random.getrandbits(192)
    return "00-" + bits.to_bytes(24, "little").hex("-", -16) + "-00"


class SpanSink:
    """Where a trace's spans go: each ended span becomes an SDK ReadableSpan of this service's resource and is
    handed to `processor` (a BatchSpanProcessor exporting over OTLP from its own thread, or a test's exporter).
    Without a processor the spans are still made, then dropped (`exporter: none`, for benchmarks).

    Why not the SDK's Tracer: its live spans (sampler, id generator, attribute cleaning under a lock, processor
    callbacks at start and end) cost ~20-30 us each on this machine, against ~5 us for a RecordedSpan and its
    ReadableSpan (timeit here; bench/tracing.py has the per-request figures). Sampling is decided by
    gateway/tracing.py before any span is made."""

    def __init__(self, service_name: str, processor: SpanProcessor | None = None) -> None:
        self.resource = Resource.create({"service.name": service_name})
        self.scope = InstrumentationScope("pointsman")
        self.processor = processor

    def start(self, name: str, parent: SpanContext | None, kind: SpanKind = SpanKind.INTERNAL,
              attributes: dict[str, Any] | None = None) -> RecordedSpan:
        """A sampled span, started now: a child of `parent` in its trace (remote or ours, its tracestate kept),
        else a new trace's root."""
        if parent is not None:
            context = SpanContext(parent.trace_id, new_span_id(), False, _SAMPLED, parent.trace_state)
        else:
            context = SpanContext(new_trace_id(), new_span_id(), False, _SAMPLED)
        return RecordedSpan(self, name, context, parent, kind, attributes if attributes is not None else {})

    def emit(self, span: ReadableSpan) -> None:
        if self.processor is not None:
            try:
                self.processor.on_end(span)
            except Exception:  # an exporter's trouble never reaches a request
                log.exception("tracing: the span processor failed on span %r", span.name)

    def shutdown(self) -> None:
        """Flush and stop the processor (blocking: call it from a thread)."""
        if self.processor is not None:
            self.processor.shutdown()


class RecordedSpan(Span):
    """An OpenTelemetry API span that records into plain fields and becomes one ReadableSpan when it ends; it
    can be made current (trace.use_span) like any span. Not thread-safe: one request's task uses it."""

    __slots__ = ("_ended", "_sink", "attributes", "context", "events", "kind", "name", "parent", "start_time",
                 "status")

    def __init__(self, sink: SpanSink, name: str, context: SpanContext, parent: SpanContext | None,
                 kind: SpanKind, attributes: dict[str, Any]) -> None:
        self._sink, self.name, self.context, self.parent, self.kind = sink, name, context, parent, kind
        self.attributes = attributes
        self.events: list[Event] = []
        self.status = _UNSET
        self.start_time = time.time_ns()
        self._ended = False

    def get_span_context(self) -> SpanContext:
        return self.context

    def is_recording(self) -> bool:
        return not self._ended

    def set_attribute(self, key: str, value: Any) -> None:
        if not self._ended:
            self.attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if not self._ended:
            self.attributes.update(attributes)

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None) -> None:
        if not self._ended:
            self.events.append(Event(name, _bounded(attributes) if attributes else attributes, timestamp))

    def update_name(self, name: str) -> None:
        self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._ended or self.status.status_code is StatusCode.OK:  # OK is final, as in the SDK
            return
        status = status if isinstance(status, Status) else Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self.status = status

    def record_exception(self, exception: BaseException, attributes: Mapping[str, Any] | None = None,
                         timestamp: int | None = None, escaped: bool = False) -> None:
        """An `exception` event with the attributes the SDK gives one."""
        kind = type(exception)
        module = kind.__module__
        recorded: dict[str, Any] = {
            "exception.type": f"{module}.{kind.__qualname__}" if module and module != "builtins" else kind.__qualname__,
            "exception.message": str(exception)[:MAX_LENGTH],
            "exception.stacktrace": "".join(traceback.format_exception(exception))[:MAX_STACKTRACE],
            "exception.escaped": str(escaped),
        }
        if not self._ended:  # not through add_event, which would cut the stack trace to MAX_LENGTH
            self.events.append(Event("exception", {**recorded, **_bounded(attributes or {})}, timestamp))

    def end(self, end_time: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self._sink.emit(ReadableSpan(
            name=self.name[:MAX_LENGTH], context=self.context, parent=self.parent, resource=self._sink.resource,
            attributes=_bounded(self.attributes), events=tuple(self.events), kind=self.kind, status=self.status,
            start_time=self.start_time, end_time=end_time if end_time is not None else time.time_ns(),
            instrumentation_scope=self._sink.scope))
