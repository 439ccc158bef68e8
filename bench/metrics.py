"""Metrics policy: the cost of one request's settle (counters, histograms, JSON line) on the request path."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from prometheus_client import CollectorRegistry  # noqa: E402
from report import stamp, write_section  # noqa: E402

from policies.context import AttemptRecord, Outcome, RequestContext  # noqa: E402
from policies.metrics import REQUEST_LOG, MetricsPolicy, RequestMetrics  # noqa: E402
from protocol.openai import ChatCompletionRequest, ParsedRequest  # noqa: E402

SECTION = "## Metrics"


def _ctx() -> RequestContext:
    body = ChatCompletionRequest(model="m1", messages=[{"role": "user", "content": "hi"}])
    ctx = RequestContext(ParsedRequest(body, {}), request_id="req-1")
    ctx.model, ctx.route, ctx.prompt_tokens, ctx.completion_tokens, ctx.cost_usd = "m1", "manual", 12, 30, 1e-5
    ctx.attempts.append(AttemptRecord("m1", "d0", ctx.started, ended=ctx.started + 0.01, ok=True))
    return ctx


async def per_request(policy: MetricsPolicy, n: int) -> float:
    """µs per settle, the context built outside the timed loop (the pipeline builds it anyway)."""
    contexts, outcome = [_ctx() for _ in range(n)], Outcome("ok")
    await policy.settle(contexts[0], outcome)  # the label children are resolved once
    start = time.perf_counter()
    for ctx in contexts:
        await policy.settle(ctx, outcome)
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    n = 100_000
    logging.getLogger(REQUEST_LOG).addHandler(logging.NullHandler())  # formatting measured, no terminal write
    logging.getLogger(REQUEST_LOG).propagate = False
    logging.getLogger(REQUEST_LOG).setLevel(logging.INFO)
    rows = [
        ("metrics only", asyncio.run(per_request(MetricsPolicy(RequestMetrics(CollectorRegistry())), n))),
        ("metrics only, prometheus-client's own classes (as several workers use, here without their files)",
         asyncio.run(per_request(MetricsPolicy(RequestMetrics(CollectorRegistry(), shared=True)), n))),
        ("metrics + JSON request line", asyncio.run(
            per_request(MetricsPolicy(RequestMetrics(CollectorRegistry()), log_requests=True), n))),
        ("JSON request line only", asyncio.run(per_request(MetricsPolicy(None, log_requests=True), n))),
    ]
    table = ["| settle | µs per request |", "|---|---|", *(f"| {name} | {us:.2f} |" for name, us in rows)]
    print("\n".join(table))
    write_section(SECTION, [stamp(), "", f"`python bench/metrics.py`: {n:,} settles of the metrics policy "
                            "(one worker: its lock-free series, policies/loop_metrics.py; the JSON line to a "
                            "NullHandler).", "", *table])


if __name__ == "__main__":
    main()
