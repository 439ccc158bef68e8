"""OpenTelemetry traces: GenAI spans per request, child spans per step, traceparent accepted and sent upstream."""

from __future__ import annotations

import json
import logging
import re

import httpx
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from websockets.sync.client import connect

from backends.openai_upstream import OUTGOING_HEADERS
from config.loader import parse_config
from gateway.app import create_app
from gateway.tracing import Tracing
from policies.context import RequestContext
from protocol.openai import ChatCompletionRequest, decode_request
from tests.gateway.live import serve, wait_for

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


def _config(upstream_url: str, tmp_path, enabled: bool):
    return parse_config(f"""
models:
  - id: remote-a
    backend: openai
    base_url: {upstream_url}
    upstream_model: mock-model
storage:
  database_url: sqlite+aiosqlite:///{tmp_path}/usage.db
tracing:
  enabled: {str(enabled).lower()}
  exporter: none
""")


def _traced(config):
    """The app for `config` with its spans kept in memory."""
    exporter = InMemorySpanExporter()
    return create_app(config, tracing=Tracing(config.tracing, SimpleSpanProcessor(exporter))), exporter


def test_request_trace_with_genai_attributes_and_propagated_traceparent(upstream, tmp_path):
    app, exporter = _traced(_config(upstream.url, tmp_path, True))
    with serve(app) as url:
        response = httpx.post(url + "/v1/chat/completions", timeout=10, json={
            "model": "remote-a", "max_tokens": 7, "temperature": 0.5,
            "messages": [{"role": "user", "content": "hello"}],
        }, headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
        assert response.status_code == 200, response.text
        answer = response.json()
        # settle (the usage row) runs after the body is written: its span follows
        spans = wait_for(lambda: (s := exporter.get_finished_spans()) and
                         any(x.name == "policies.settle" for x in s) and s, what="the settle span")
    by_name = {s.name: s for s in spans}
    request = by_name["chat remote-a"]
    assert request.context.trace_id == int(CLIENT_TRACE, 16)
    assert request.parent is not None and request.parent.span_id == int(CLIENT_SPAN, 16)
    attrs = request.attributes
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "remote-a"
    assert attrs["gen_ai.response.model"] == "remote-a"
    assert attrs["gen_ai.request.max_tokens"] == 7
    assert attrs["gen_ai.request.temperature"] == 0.5
    assert attrs["gen_ai.usage.input_tokens"] == answer["usage"]["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == answer["usage"]["completion_tokens"]
    assert list(attrs["gen_ai.response.finish_reasons"]) == [answer["choices"][0]["finish_reason"]]
    for child in ("route", "policies.admit", "policies.approve", "policies.settle", "upstream remote-a"):
        assert by_name[child].parent.span_id == request.context.span_id, child
        assert by_name[child].context.trace_id == request.context.trace_id
    assert by_name["policies.admit"].attributes["pointsman.answered"] is False
    assert list(by_name["route"].attributes["pointsman.chain"]) == ["remote-a"]
    assert by_name["policies.settle"].attributes["pointsman.outcome"] == "ok"
    call = by_name["upstream remote-a"]
    assert call.attributes["server.address"] == "127.0.0.1"
    # the upstream saw a traceparent naming the attempt's span, in the client's trace
    assert answer["x_received"]["traceparent"] == f"00-{CLIENT_TRACE}-{call.context.span_id:016x}-01"


def test_stream_span_ends_with_the_stream_and_failures_are_marked(upstream, tmp_path):
    app, exporter = _traced(_config(upstream.url, tmp_path, True))
    with serve(app) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=10, json={
            "model": "remote-a", "stream": True, "messages": [{"role": "user", "content": "hi there"}],
        }) as response:
            assert response.status_code == 200
            assert "[DONE]" in response.read().decode()
        failed = httpx.post(url + "/v1/chat/completions", timeout=10, json={
            "model": "remote-a", "messages": [{"role": "user", "content": "status:400"}]})
        assert failed.status_code == 400
        spans = wait_for(lambda: (s := exporter.get_finished_spans()) and
                         sum(x.name == "chat remote-a" for x in s) == 2 and s, what="both request spans")
    requests = [s for s in spans if s.name == "chat remote-a"]
    streamed, errored = sorted(requests, key=lambda s: s.start_time)
    assert streamed.parent is None  # no client traceparent: a root span
    assert streamed.attributes["gen_ai.response.model"] == "remote-a"
    assert streamed.status.is_ok
    assert not errored.status.is_ok
    attempt = next(s for s in spans if s.name == "upstream remote-a" and s.context.trace_id == errored.context.trace_id)
    assert attempt.attributes["http.response.status_code"] == 400
    assert attempt.attributes["error.type"]


def test_a_routing_failure_marks_the_route_span(upstream, tmp_path):
    app, exporter = _traced(_config(upstream.url, tmp_path, True))
    with serve(app) as url:
        response = httpx.post(url + "/v1/chat/completions", timeout=10, json={
            "model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 404
        spans = wait_for(lambda: (s := exporter.get_finished_spans()) and
                         any(x.name == "chat no-such-model" for x in s) and s, what="the request span")
    route = next(s for s in spans if s.name == "route")
    assert not route.status.is_ok
    assert route.attributes["error.type"] == "model_not_found"
    assert [event.name for event in route.events] == ["exception"]
    assert "pointsman.chain" not in route.attributes
    request = next(s for s in spans if s.name == "chat no-such-model")
    assert route.parent.span_id == request.context.span_id
    assert not request.status.is_ok


def test_tracing_off_makes_no_span_and_sends_no_traceparent(upstream, tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(Tracing, "__init__", lambda self, *a, **k: started.append(a))
    app = create_app(_config(upstream.url, tmp_path, False))
    pipeline = app.state.pipeline
    assert pipeline.tracing is None and not started
    assert "complete" not in vars(pipeline) and "stream" not in vars(pipeline)  # the plain entry points
    with serve(app) as url:
        response = httpx.post(url + "/v1/chat/completions", timeout=10, json={
            "model": "remote-a", "messages": [{"role": "user", "content": "hello"}],
        }, headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
    assert response.status_code == 200
    assert response.json()["x_received"]["traceparent"] is None  # the client's is not forwarded either


def test_each_request_on_a_websocket_follows_the_upgrades_traceparent(upstream, tmp_path):
    """The WebSocket route took no traceparent: its requests were roots of traces of their own."""
    app, exporter = _traced(_config(upstream.url, tmp_path, True))
    chat = {"model": "remote-a", "messages": [{"role": "user", "content": "hello"}]}
    with serve(app) as url:
        with connect(url.replace("http://", "ws://") + "/v1/chat/completions/ws", open_timeout=10,
                     additional_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
                                         "tracestate": "vendor=x"}) as ws:
            for _ in range(2):  # two requests, one after the other, on the one socket
                ws.send(json.dumps(chat))
                while "done" not in json.loads(ws.recv(timeout=10)):
                    pass
        spans = wait_for(lambda: (s := exporter.get_finished_spans()) and
                         sum(x.name == "policies.settle" for x in s) == 2 and s, what="both settle spans")
    requests = [s for s in spans if s.name == "chat remote-a"]
    assert len(requests) == 2 and len({s.context.span_id for s in requests}) == 2
    for request in requests:
        assert request.context.trace_id == int(CLIENT_TRACE, 16)
        assert request.parent.span_id == int(CLIENT_SPAN, 16) and dict(request.parent.trace_state) == {"vendor": "x"}
    # each attempt's span, whose id is the traceparent the upstream gets, in the client's trace under its request
    attempts = [s for s in spans if s.name == "upstream remote-a"]
    assert sorted(s.parent.span_id for s in attempts) == sorted(s.context.span_id for s in requests)
    assert {s.context.trace_id for s in attempts} == {int(CLIENT_TRACE, 16)}


def test_unsampled_requests_make_no_spans_but_pass_the_trace_on(upstream, tmp_path):
    config = parse_config(f"""
models:
  - {{id: remote-a, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
storage: {{database_url: "sqlite+aiosqlite:///{tmp_path}/usage.db"}}
tracing: {{enabled: true, exporter: none, sample_ratio: 0.0}}
""")
    app, exporter = _traced(config)
    chat = {"model": "remote-a", "messages": [{"role": "user", "content": "hello"}]}
    with serve(app) as url:
        # a root request at ratio 0: no span at all, and the upstream is told the trace is not sampled
        unsampled = httpx.post(url + "/v1/chat/completions", timeout=10, json=chat).json()
        version, trace_id, _, flags = unsampled["x_received"]["traceparent"].split("-")
        assert version == "00" and not int(flags, 16) & 1 and int(trace_id, 16) != 0  # the sampled bit is clear
        # a client's sampled traceparent is followed (parent-based): this one is traced in full
        followed = httpx.post(url + "/v1/chat/completions", timeout=10, json=chat,
                              headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}).json()
        spans = wait_for(lambda: (s := exporter.get_finished_spans()) and
                         any(x.name == "policies.settle" for x in s) and s, what="the settle span")
    assert {s.context.trace_id for s in spans} == {int(CLIENT_TRACE, 16)}  # nothing from the unsampled one
    assert {s.name for s in spans} >= {"chat remote-a", "route", "policies.admit", "upstream remote-a"}
    assert int(followed["x_received"]["traceparent"].rsplit("-", 1)[1], 16) & 1


def test_roots_are_sampled_at_the_ratio_and_a_clients_flag_is_followed():
    config = parse_config("""
models: [{id: m, backend: openai, base_url: "http://127.0.0.1:9/v1"}]
tracing: {enabled: true, exporter: none, sample_ratio: 0.25}
""")
    exporter = InMemorySpanExporter()
    tracing = Tracing(config.tracing, SimpleSpanProcessor(exporter))
    request = decode_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, ChatCompletionRequest)

    def start(traceparent: str | None = None):
        ctx = RequestContext(request, request_id="r")
        if traceparent is not None:
            Tracing.accept(ctx, [(b"traceparent", traceparent.encode())])
        span = tracing._start_request(ctx)  # None: not sampled, only the traceparent to send upstream noted
        if span is not None:
            span.end()
        assert Tracing.sampled(ctx) == (span is not None)
        return span, OUTGOING_HEADERS.get()  # set in this context, as in a request's task

    started = [start() for _ in range(2000)]
    recorded = sum(span is not None for span, _ in started)
    assert 400 < recorded < 600  # 500 expected, sd ~19: this bound fails once in ~10^7 runs
    assert len(exporter.get_finished_spans()) == recorded
    # a sampled request sends its attempts' own traceparents, never the one an earlier request left in the task
    assert all(outgoing is None for span, outgoing in started if span is not None)
    # an unsampled root still sends a valid W3C traceparent of its own, flagged unsampled, a new trace each time
    sent = [outgoing["traceparent"] for span, outgoing in started if span is None]
    assert all(re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", t) for t in sent) and len(set(sent)) == len(sent)
    for flags, sampled in (("00", False), ("01", True)):  # a client's decision wins over the ratio, both ways
        for span, outgoing in (start(f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-{flags}") for _ in range(20)):
            if sampled:
                assert span is not None and span.get_span_context().trace_id == int(CLIENT_TRACE, 16)
            else:  # followed: not traced, the client's trace passed on under a span id of ours, flagged unsampled
                version, trace_id, span_id, sent_flags = outgoing["traceparent"].split("-")
                assert span is None and (trace_id, sent_flags) == (CLIENT_TRACE, "00") and span_id != CLIENT_SPAN


def test_relayed_responses_are_traced_when_sampled_and_pass_the_trace_on_when_not(upstream, tmp_path):
    config = parse_config(f"""
models:
  - {{id: native-a, backend: openai, responses: native, base_url: "{upstream.url}", upstream_model: mock-model}}
storage: {{database_url: "sqlite+aiosqlite:///{tmp_path}/usage.db"}}
tracing: {{enabled: true, exporter: none, sample_ratio: 0.0}}
""")
    app, exporter = _traced(config)
    ask = {"model": "native-a", "input": "hello"}
    with serve(app) as url:
        unsampled = httpx.post(url + "/v1/responses", timeout=10, json=ask).json()
        assert unsampled["x_received"]["traceparent"].endswith("-00")  # relayed untraced, flagged unsampled
        followed = httpx.post(url + "/v1/responses", timeout=10, json=ask,
                              headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}).json()
        spans = wait_for(lambda: (s := exporter.get_finished_spans()) and
                         any(x.name == "upstream native-a" for x in s) and s, what="the attempt span")
    assert {s.context.trace_id for s in spans} == {int(CLIENT_TRACE, 16)}  # nothing from the unsampled one
    call = next(s for s in spans if s.name == "upstream native-a")
    assert followed["x_received"]["traceparent"] == f"00-{CLIENT_TRACE}-{call.context.span_id:016x}-01"


def test_a_malformed_traceparent_makes_the_request_a_root_sampled_at_the_ratio():
    request = decode_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, ChatCompletionRequest)
    for ratio in (0.0, 1.0):
        config = parse_config(f"""
models: [{{id: m, backend: openai, base_url: "http://127.0.0.1:9/v1"}}]
tracing: {{enabled: true, exporter: none, sample_ratio: {ratio}}}
""")
        tracing = Tracing(config.tracing)
        ctx = RequestContext(request, request_id="r")
        Tracing.accept(ctx, [(b"traceparent", b"00-not-a-trace-01")])
        span = tracing._start_request(ctx)
        if ratio:
            assert span is not None and span.parent is None  # a root of a new trace
        else:
            assert span is None
            assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", OUTGOING_HEADERS.get()["traceparent"])


def test_a_clients_bad_trace_context_is_dropped_without_a_log_line(caplog):
    """Neither a malformed or oversized tracestate nor an oversized traceparent makes the propagator warn (one line
    per request, with the client's text in it); the tracestate is dropped, a long traceparent makes a root."""
    config = parse_config("""
models: [{id: m, backend: openai, base_url: "http://127.0.0.1:9/v1"}]
tracing: {enabled: true, exporter: none, sample_ratio: 1.0}
""")
    tracing = Tracing(config.tracing)
    request = decode_request({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, ChatCompletionRequest)
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"

    def start(headers: list[tuple[bytes, bytes]]):
        ctx = RequestContext(request, request_id="r")
        Tracing.accept(ctx, headers)
        return tracing._start_request(ctx)

    with caplog.at_level(logging.DEBUG):
        for state in (b"EVIL INJECTED CONTENT=@@@,===", b",".join(b"k%d=v" % i for i in range(33)),
                      b"k=" + b"v" * 9000, b"a=1,b=\xe9"):
            span = start([(b"traceparent", traceparent.encode()), (b"tracestate", state)])
            assert span.parent.trace_id == int(CLIENT_TRACE, 16) and not span.parent.trace_state
        span = start([(b"traceparent", (traceparent + "-x" * 300).encode())])
        assert span.parent is None
    assert caplog.records == []
    span = start([(b"traceparent", traceparent.encode()), (b"tracestate", b"vendor=x, t@sys=a b ,,")])
    assert dict(span.parent.trace_state) == {"vendor": "x", "t@sys": "a b"}  # a valid one is kept
