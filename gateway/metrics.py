"""GET /metrics: the metrics policy's series plus gauges read from the gateway's pools at scrape time."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric

from config.schema import Config
from gateway.service import Gateway
from policies.base import Policy
from policies.budget import BudgetPolicy
from policies.metrics import REQUEST_LOG, MetricsPolicy, RequestMetrics
from policies.state import StoreUnavailable

__all__ = ["CONTENT_TYPE_LATEST", "MULTIPROC_ENV", "BudgetCollector", "GatewayCollector", "Metrics", "observe_policies"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # set by `pointsman serve` with several workers (gateway/cli.py)
log = logging.getLogger("pointsman")
_BREAKER = {"closed": 0.0, "half_open": 1.0, "open": 2.0}


class GatewayCollector:
    """Gauges nobody needs to update per request: read from the live pools when scraped (reloads included)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.tasks: int | None = None  # the loop's tasks, counted by Metrics.render on the loop before each scrape

    def collect(self) -> Iterator[Metric]:
        if self.tasks is not None:  # a count that keeps growing when idle is a leak (bench/reliability's soak)
            yield GaugeMetricFamily("pointsman_event_loop_tasks", "asyncio tasks alive on this worker's event loop",
                                    value=self.tasks)
        in_flight = GaugeMetricFamily("pointsman_upstream_in_flight", "Attempts waiting on a model now",
                                      labels=["model"])
        breakers = GaugeMetricFamily("pointsman_circuit_breaker_state",
                                     "Circuit breaker per deployment: 0 closed, 1 half_open, 2 open",
                                     labels=["model", "deployment"])
        held = GaugeMetricFamily("pointsman_upstream_rate_limited_seconds",
                                 "Seconds a deployment stays out of routing for its upstream's 429 (0: none)",
                                 labels=["model", "deployment"])
        for model_id, pool in list(self.gateway.pools.items()):
            in_flight.add_metric([model_id], pool.in_flight)
            for state, breaker in zip(pool.states, pool.breakers, strict=True):
                breakers.add_metric([model_id, state.key], _BREAKER.get(breaker.state, 0.0))
                held.add_metric([model_id, state.key], breaker.held_s() or 0.0)
        yield in_flight
        yield breakers
        yield held


class BudgetCollector:
    """`pointsman_budget_remaining` and `pointsman_budget_limit` per budget, scope, member and kind (tokens, usd),
    from the counters read just before the scrape (`refresh`): the state store is async, a collector is not."""

    def __init__(self, budgets: BudgetPolicy, members: bool) -> None:
        self.budgets, self.members = budgets, members
        self.levels: list = []

    async def refresh(self) -> None:
        try:
            self.levels = await self.budgets.levels(self.members)
        except StoreUnavailable as exc:  # the page still answers, without the budget gauges
            log.warning("metrics: budget gauges left out, the state store cannot be read: %s", exc)
            self.levels = []

    def collect(self) -> Iterator[Metric]:
        labels = ["budget", "scope", "member", "kind", "period"]
        remaining = GaugeMetricFamily("pointsman_budget_remaining", "What is left of a budget in its current "
                                      "period (tokens or USD)", labels=labels)
        limit = GaugeMetricFamily("pointsman_budget_limit", "A budget's limit per period", labels=labels)
        for counter, used in self.levels:
            values = [str(counter.index), counter.budget.scope, counter.member, counter.kind, counter.budget.period]
            remaining.add_metric(values, max(0.0, counter.limit - used))
            limit.add_metric(values, counter.limit)
        yield remaining
        yield limit


class Metrics:
    """The app's metrics. One worker: one registry holds everything. Several workers (PROMETHEUS_MULTIPROC_DIR
    set before the workers import prometheus_client): counters and histograms live in the shared directory and
    any worker's scrape sums them all; the gauges are the answering worker's own pools (each worker has its own
    breakers and in-flight counts)."""

    def __init__(self, gateway: Gateway, budgets: BudgetPolicy | None = None, members: bool = False) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = RequestMetrics(self.registry, shared=self.multiprocess)
        self.gauges = GatewayCollector(gateway)
        if self.multiprocess:
            self.exposed = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.exposed)
        else:
            self.exposed = self.registry
        self.exposed.register(self.gauges)
        self.budgets = BudgetCollector(budgets, members) if budgets is not None else None
        if self.budgets is not None:
            self.exposed.register(self.budgets)

    async def render(self) -> bytes:
        """The Prometheus text page; several workers' files are read off the event loop."""
        self.gauges.tasks = len(asyncio.all_tasks())  # here, on the loop: the collectors may run in a thread
        if self.budgets is not None:
            await self.budgets.refresh()
        if self.multiprocess:
            return await asyncio.to_thread(generate_latest, self.exposed)
        return generate_latest(self.exposed)  # on the loop: the lock-free series are only ever touched there


def observe_policies(config: Config, gateway: Gateway, budgets: BudgetPolicy | None = None,
                     ) -> tuple[Metrics | None, list[Policy]]:
    """The metrics (when `metrics.enabled`; `budgets` adds the budget gauges) and the policy that feeds them and
    writes the JSON request lines (when `logging.requests`); no policy at all when both are off, so the chain
    stays free."""
    metrics = Metrics(gateway, budgets, config.metrics.member_labels) if config.metrics.enabled else None
    if config.logging.requests:
        _json_lines()
    if metrics is None and not config.logging.requests:
        return None, []
    return metrics, [MetricsPolicy(metrics.requests if metrics is not None else None, config.logging.requests)]


def _json_lines() -> None:
    """The request logger writes bare JSON lines to stderr, whatever format the root logger has."""
    logger = logging.getLogger(REQUEST_LOG)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not any(getattr(h, "_pointsman_json", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._pointsman_json = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
