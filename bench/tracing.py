"""OpenTelemetry tracing: what the request pipeline costs with tracing off, and with it on (spans made, not sent)."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from report import stamp, write_section  # noqa: E402

from config.loader import parse_config  # noqa: E402
from gateway.app import create_app  # noqa: E402
from gateway.tracing import Tracing  # noqa: E402
from policies.context import RequestContext  # noqa: E402
from protocol.openai import ChatCompletionRequest, decode_request  # noqa: E402

SECTION = "## Tracing"
BODY = (b'{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":'
        b'{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,'
        b'"completion_tokens":1,"total_tokens":4}}')
REQUEST = b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hello"}]}'
CONFIG = """
models:
  - id: m
    backend: openai
    base_url: http://127.0.0.1:9/v1
storage:
  database_url: ""
tracing:
  enabled: {enabled}
  exporter: none
  sample_ratio: {ratio}
"""


class _Answer:
    """A backend that answers at once: what is left is the gateway's own time."""

    async def complete(self, request, index=0, headers=None) -> bytes:
        return BODY

    async def aclose(self) -> None: ...


async def _run(enabled: bool, n: int, ratio: float = 1.0, parent: bool = True) -> list[float]:
    config = parse_config(CONFIG.format(enabled=str(enabled).lower(), ratio=ratio))
    app = create_app(config, backends={"m": _Answer()})  # type: ignore[dict-item]
    pipeline = app.state.pipeline
    tracing = pipeline.tracing
    times = []
    for i in range(n + n // 10):
        t0 = time.perf_counter()
        ctx = RequestContext(decode_request(REQUEST, ChatCompletionRequest), request_id=str(i))
        if tracing is not None and parent:  # a client's sampled traceparent: followed whatever the ratio
            tracing.accept(ctx, [(b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")])
        await pipeline.complete(ctx)
        if i >= n // 10:  # the first tenth warms up
            times.append((time.perf_counter() - t0) * 1e6)
    if tracing is not None:
        assert isinstance(tracing, Tracing)
        tracing.shutdown()
    return times


VARIANTS = (  # label, tracing enabled, sample_ratio, a client's sampled traceparent
    ("tracing off", False, 1.0, False),
    ("tracing on, a sampled client traceparent (spans made, no exporter)", True, 1.0, True),
    ("tracing on, root traces, sample_ratio 1.0", True, 1.0, False),
    ("tracing on, root traces, sample_ratio 0.1", True, 0.1, False),
    ("tracing on, root traces, sample_ratio 0 (no span made)", True, 0.0, False),
    ("tracing off, again", False, 1.0, False),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of every variant, interleaved; each figure is its best round (a shared machine)")
    parser.add_argument("--write", action="store_true", help="write the figures into bench/RESULTS.md")
    args = parser.parse_args()
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.rounds):
        for label, enabled, ratio, parent in VARIANTS:
            times = asyncio.run(_run(enabled, args.n, ratio, parent))
            figures = (statistics.median(times), statistics.quantiles(times, n=100)[98])
            held = best.get(label)
            best[label] = figures if held is None else (min(held[0], figures[0]), min(held[1], figures[1]))
    rows = [(label, *best[label]) for label, *_ in VARIANTS]
    table = ["| pipeline.complete, in process, instant backend | p50 us | p99 us |", "|---|---:|---:|",
             *(f"| {label} | {p50:.1f} | {p99:.1f} |" for label, p50, p99 in rows)]
    off = (rows[0][1] + rows[-1][1]) / 2
    added = [f"{label.removeprefix('tracing on, ')} {p50 - off:+.1f} us" for label, p50, _ in rows[1:-1]]
    verdict = ("Added at p50 per request over tracing off (3 spans when sampled, no policies: request, route, "
               "upstream): " + "; ".join(added) + ". Unsampled requests make no child span and send the "
               "upstream the request's own (unsampled) traceparent.")
    print("\n".join(table))
    print(verdict)
    if args.write:
        write_section(SECTION, [stamp(), "",
                                "In process, one request at a time: a decoded chat request through Pipeline.complete "
                                "with no policies and a backend that answers at once, so the figures are the "
                                "gateway's own time. Off, the pipeline holds no Tracing and makes no span or context "
                                "(its entry points are the untraced ones; one `is None` per attempt). A sampled "
                                "request's spans are gateway/spans.py's RecordedSpans, each built into an SDK "
                                f"ReadableSpan as it ends. Each figure is the best of {args.rounds} interleaved "
                                "rounds.", "",
                                *table, "", verdict])
        print(f"wrote the '{SECTION}' section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
