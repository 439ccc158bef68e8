"""RecordedSpan and SpanSink: recorded spans reach the SDK's processors as ReadableSpans exporters can encode."""

from __future__ import annotations

import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, StatusCode, TraceFlags, TraceState

from config.loader import parse_config
from gateway import spans
from gateway.spans import MAX_LENGTH, MAX_STACKTRACE, SpanSink
from gateway.tracing import Tracing


def _sink() -> tuple[SpanSink, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    return SpanSink("svc", SimpleSpanProcessor(exporter)), exporter


def test_a_trace_of_recorded_spans_is_exported_and_encodes_as_otlp():
    sink, exporter = _sink()
    root = sink.start("chat m", None, SpanKind.SERVER, {"gen_ai.request.model": "m"})
    child = sink.start("route", root.get_span_context())
    child.set_attribute("pointsman.chain", ["a", "b"])
    child.end()
    root.set_attributes({"gen_ai.usage.input_tokens": 3})
    root.end()
    route, request = exporter.get_finished_spans()
    assert request.parent is None and request.kind is SpanKind.SERVER
    assert request.context.trace_flags.sampled and request.context.trace_id != 0
    assert route.parent.span_id == request.context.span_id and route.context.trace_id == request.context.trace_id
    assert route.context.span_id != request.context.span_id
    assert dict(request.attributes) == {"gen_ai.request.model": "m", "gen_ai.usage.input_tokens": 3}
    assert list(route.attributes["pointsman.chain"]) == ["a", "b"]
    assert request.resource.attributes["service.name"] == "svc" and request.instrumentation_scope.name == "pointsman"
    assert request.start_time <= route.start_time <= route.end_time <= request.end_time
    encoded = encode_spans([route, request])  # what the OTLP exporter sends
    scope_spans = encoded.resource_spans[0].scope_spans[0]
    assert [s.name for s in scope_spans.spans] == ["route", "chat m"]


def test_a_remote_parent_keeps_its_trace_and_state():
    sink, exporter = _sink()
    parent = SpanContext(0xABC, 0xDEF, True, TraceFlags(1), TraceState([("vendor", "x")]))
    sink.start("chat m", parent).end()
    (span,) = exporter.get_finished_spans()
    assert span.context.trace_id == 0xABC and span.parent.span_id == 0xDEF
    assert span.context.trace_state.get("vendor") == "x"


def test_exceptions_status_and_ending_behave_as_the_sdks_spans():
    sink, exporter = _sink()
    span = sink.start("step", None)
    try:
        raise ValueError("boom")
    except ValueError as exc:
        span.record_exception(exc)
    span.set_status(StatusCode.ERROR, "boom")
    span.set_status(StatusCode.UNSET)  # never undoes an error
    assert span.is_recording()
    span.end()
    span.end()  # once only
    span.set_attribute("late", 1)  # ignored once ended
    assert not span.is_recording()
    (recorded,) = exporter.get_finished_spans()
    assert recorded.status.status_code is StatusCode.ERROR and recorded.status.description == "boom"
    (event,) = recorded.events
    assert event.name == "exception" and event.attributes["exception.type"] == "ValueError"
    assert event.attributes["exception.message"] == "boom" and "Traceback" in event.attributes["exception.stacktrace"]
    assert "late" not in recorded.attributes


def test_a_recorded_span_can_be_the_current_span():
    sink, _ = _sink()
    span = sink.start("chat m", None)
    with trace.use_span(span, end_on_exit=True):
        assert trace.get_current_span() is span
    assert not span.is_recording()


def test_a_failing_processor_never_reaches_the_request(caplog):
    class Broken(SpanProcessor):
        def on_end(self, span):  # noqa: ANN001, ANN202
            raise RuntimeError("exporter down")

    sink = SpanSink("svc", Broken())
    with caplog.at_level(logging.ERROR, logger="pointsman"):
        sink.start("step", None).end()
    assert "span processor failed" in caplog.text


def test_batched_export_flushes_on_shutdown():
    exporter = InMemorySpanExporter()
    sink = SpanSink("svc", BatchSpanProcessor(exporter))
    for _ in range(3):
        sink.start("step", None).end()
    sink.shutdown()
    assert len(exporter.get_finished_spans()) == 3


def test_spans_reach_an_otlp_collector_over_http():
    """The default exporter (OTLP over HTTP, batched) against a collector stand-in that decodes what it gets."""
    received: list[ExportTraceServiceRequest] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["content-length"]))
            received.append(ExportTraceServiceRequest.FromString(body))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args) -> None:  # noqa: ANN002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = parse_config(f"""
models: [{{id: m, backend: openai, base_url: "http://127.0.0.1:9/v1"}}]
tracing: {{enabled: true, endpoint: "http://127.0.0.1:{server.server_address[1]}/v1/traces", service_name: gw}}
""")
        tracing = Tracing(config.tracing)
        root = tracing.sink.start("chat m", None, SpanKind.SERVER, {"gen_ai.request.model": "m"})
        tracing.sink.start("route", root.get_span_context()).end()
        root.end()
        tracing.shutdown()  # flushes the batch
    finally:
        server.shutdown()
    spans = [span for request in received for resource in request.resource_spans
             for scope in resource.scope_spans for span in scope.spans]
    assert sorted(span.name for span in spans) == ["chat m", "route"]
    resource = received[0].resource_spans[0].resource
    assert {a.key: a.value.string_value for a in resource.attributes}["service.name"] == "gw"
    by_name = {span.name: span for span in spans}
    assert by_name["route"].parent_span_id == by_name["chat m"].span_id
    assert by_name["chat m"].attributes[0].key == "gen_ai.request.model"


def test_a_clients_huge_strings_are_cut_so_the_export_batch_stays_small():
    """A 2 MB model name (in the span's name, an attribute, an exception's message and stack trace) is exported
    cut to MAX_LENGTH (the stack trace to MAX_STACKTRACE): it would otherwise make the whole batch too big for a
    collector."""
    sink, exporter = _sink()
    model = "z" * 2_000_000
    span = sink.start(f"chat {model}", None, SpanKind.SERVER, {"gen_ai.request.model": model, "n": 1})
    span.set_attribute("pointsman.chain", ["a", "b"])
    try:
        raise LookupError(f"model {model} not found")
    except LookupError as exc:
        span.record_exception(exc, {"extra": model})
    span.add_event("note", {"text": model})
    span.end()
    (recorded,) = exporter.get_finished_spans()
    assert recorded.name == f"chat {model}"[:MAX_LENGTH]
    assert recorded.attributes["gen_ai.request.model"] == model[:MAX_LENGTH] and recorded.attributes["n"] == 1
    assert list(recorded.attributes["pointsman.chain"]) == ["a", "b"]
    exception, note = recorded.events
    assert len(exception.attributes["exception.message"]) == len(exception.attributes["extra"]) == MAX_LENGTH
    assert exception.attributes["exception.stacktrace"].startswith("Traceback")
    assert len(exception.attributes["exception.stacktrace"]) == MAX_STACKTRACE
    assert len(note.attributes["text"]) == MAX_LENGTH
    assert len(encode_spans([recorded]).SerializeToString()) < 10_000


def test_an_unsampled_traceparent_has_valid_new_ids(monkeypatch):
    """W3C's shape, flagged unsampled, and never an all-zero trace or span id: such a draw is drawn again."""
    seen = {spans.unsampled_traceparent() for _ in range(200)}
    assert len(seen) == 200 and all(re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", t) for t in seen)
    draws = iter([0, 1 << 128, (1 << 128) - 1, (1 << 191) | 5])  # zeros, a zero trace id, a zero span id, valid
    monkeypatch.setattr(spans.random, "getrandbits", lambda bits: next(draws))
    assert spans.unsampled_traceparent() == "00-05" + "0" * 30 + "-" + "0" * 14 + "80-00"
