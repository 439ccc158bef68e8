"""The metrics policy: per-request Prometheus counters and histograms, and one JSON log line per request."""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram

from policies.base import COMPLETIONS, STAGES, no_op
from policies.context import Outcome, Reply, RequestContext
from policies.loop_metrics import LoopCounter, LoopHistogram

__all__ = ["REQUEST_LOG", "MetricsPolicy", "RequestMetrics", "status_class"]

REQUEST_LOG = "pointsman.requests"  # the logger the JSON request lines go to

# seconds: a cache hit answers in well under a millisecond, a long generation takes minutes
_DURATION = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class RequestMetrics:
    """The per-request series, registered once on `registry`. Labels are bounded: model ids from the config,
    route mode, status class, token kind, cache result; never a key, user or requested name. `shared`: several
    workers, so prometheus-client's own classes, whose values its multiprocess files hold; else the lock-free
    ones of policies/loop_metrics.py, with the same samples."""

    def __init__(self, registry: CollectorRegistry, shared: bool = False) -> None:
        counter: Any = Counter if shared else LoopCounter
        histogram: Any = Histogram if shared else LoopHistogram
        self.requests = counter("pointsman_requests", "Requests by served model, route mode and status class",
                                ("model", "route", "status"), registry=registry)
        self.duration = histogram("pointsman_request_duration_seconds", "Request duration, end to end",
                                  ("model", "route"), buckets=_DURATION, registry=registry)
        self.ttft = histogram("pointsman_time_to_first_token_seconds", "Time to the first streamed token",
                              ("model",), buckets=_DURATION, registry=registry)
        self.tokens = counter("pointsman_tokens", "Tokens by model and kind (prompt, completion)",
                              ("model", "kind"), registry=registry)
        self.cost = counter("pointsman_cost_usd", "Cost in US dollars by model", ("model",), registry=registry)
        self.cache = counter("pointsman_cache_requests", "Cache lookups by result (hit, semantic-hit, miss, bypass)",
                             ("result",), registry=registry)
        self.overhead = histogram("pointsman_gateway_overhead_seconds",
                                  "Request time not spent waiting on a model (duration minus the attempts' time)",
                                  (), buckets=_OVERHEAD, registry=registry)


def status_class(outcome: Outcome) -> str:
    """`2xx` for an answer (served or a policy's), the error's class (`4xx`, `5xx`), or `cancelled`."""
    if outcome.status == "cancelled":
        return "cancelled"
    error = outcome.error
    return f"{error.status // 100}xx" if error is not None else "2xx"


def _labels_of(ctx: RequestContext) -> tuple[str, str]:
    """The model and route labels: the served model's and the route it came by; else, for a request that routing
    chose for but that no model served (upstream failures after retries), the first choice's model and route;
    else "none" and "none" (never the requested name, which the client controls and which would make the label
    unbounded)."""
    if ctx.model is not None:
        return ctx.model, ctx.route or "none"
    attempts = getattr(ctx.decision, "attempts", None)
    if attempts:
        first = attempts[0]
        return first.model.id, ctx.route or first.route
    return "none", ctx.route or "none"


class _Series:
    """One (model, route, status)'s label children, resolved once: a request then costs no label lookup."""

    __slots__ = ("completion", "cost", "duration", "prompt", "requests", "ttft")

    def __init__(self, m: RequestMetrics, model: str, route: str, status: str) -> None:
        self.requests = m.requests.labels(model, route, status)
        self.duration = m.duration.labels(model, route)
        self.ttft = m.ttft.labels(model)
        self.prompt = m.tokens.labels(model, "prompt")
        self.completion = m.tokens.labels(model, "completion")
        self.cost = m.cost.labels(model)


class MetricsPolicy:
    """Observes only: counts every ending once (settle), and writes the JSON request line when `log_requests`."""

    name: ClassVar[str] = "metrics"
    stage: ClassVar[int] = STAGES["observe"]
    endpoints: ClassVar[frozenset[str]] = COMPLETIONS | {"embeddings"}

    def __init__(self, metrics: RequestMetrics | None, log_requests: bool = False) -> None:
        self.metrics = metrics
        self.log = logging.getLogger(REQUEST_LOG) if log_requests else None
        self._series: dict[tuple[str, str, str], _Series] = {}
        results = ("hit", "semantic-hit", "miss", "bypass")
        self._cache = {} if metrics is None else {r: metrics.cache.labels(r) for r in results}
        self._encode = msgspec.json.Encoder().encode

    @no_op
    async def admit(self, ctx: RequestContext) -> Reply | None:
        return None

    @no_op
    async def approve(self, ctx: RequestContext, decision: Any) -> None:
        return None

    async def settle(self, ctx: RequestContext, outcome: Outcome) -> None:
        now = time.monotonic()
        duration = now - ctx.started
        (model, route), status = _labels_of(ctx), status_class(outcome)
        if self.metrics is not None:
            self._count(ctx, duration, now, model, route, status)
        if self.log is not None:
            self.log.info(self._encode({
                "request_id": ctx.request_id, "key_id": ctx.principal.key_id, "model": model, "route": route,
                "status": outcome.status, "http_status": _http_status(outcome),
                "error": outcome.error.code if outcome.error is not None else None,
                "latency_ms": round(duration * 1000, 3), "prompt_tokens": ctx.prompt_tokens,
                "completion_tokens": ctx.completion_tokens, "cost_usd": ctx.cost_usd, "cache": ctx.cache,
            }).decode())

    def _count(self, ctx: RequestContext, duration: float, now: float, model: str, route: str, status: str) -> None:
        series = self._series.get((model, route, status))
        if series is None:  # the label sets are bounded by the config, so this dict is too
            series = self._series[(model, route, status)] = _Series(self.metrics, model, route, status)  # type: ignore[arg-type]
        series.requests.inc()
        series.duration.observe(duration)
        waited = 0.0
        for attempt in ctx.attempts:
            waited += (attempt.ended if attempt.ended is not None else now) - attempt.started
        self.metrics.overhead.observe(max(duration - waited, 0.0))  # type: ignore[union-attr]
        if (ttft := ctx.ttft_s) is not None:
            series.ttft.observe(ttft)
        if ctx.prompt_tokens:
            series.prompt.inc(ctx.prompt_tokens)
        if ctx.completion_tokens:
            series.completion.inc(ctx.completion_tokens)
        if ctx.cost_usd:
            series.cost.inc(ctx.cost_usd)
        if ctx.cache is not None and (cache := self._cache.get(ctx.cache)) is not None:
            cache.inc()


def _http_status(outcome: Outcome) -> int | None:
    if outcome.status == "cancelled":
        return None
    return outcome.error.status if outcome.error is not None else 200
