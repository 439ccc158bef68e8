"""The lock-free counters and histograms expose exactly what prometheus-client's own do for the same updates."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from policies.loop_metrics import LoopCounter, LoopHistogram

BUCKETS = (0.001, 0.0025, 0.01, 1, 300)
AMOUNTS = [0.0, 0.0005, 0.001, 0.0011, 0.0025, 0.5, 1.0, 299.9, 300.0, 300.1, 1e9]


def _fill(counter, histogram, bare) -> None:
    counter.labels("m1", "2xx").inc()
    counter.labels("m1", "2xx").inc(2.5)
    counter.labels("m2", "4xx").inc()
    counter.labels("m3", "5xx")  # made, never incremented: still exposed at 0
    for amount in AMOUNTS:
        histogram.labels("m1").observe(amount)
    histogram.labels("m2").observe(0.002)
    for amount in AMOUNTS[:4]:
        bare.observe(amount)


def _samples(registry: CollectorRegistry) -> tuple[list, dict]:
    """Every family's type and help, and every sample but the creation times (which differ by nature)."""
    text = generate_latest(registry).decode()
    families = sorted((f.name, f.type, f.documentation) for f in text_string_to_metric_families(text))
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in text_string_to_metric_families(text) for s in f.samples if not s.name.endswith("_created")}
    created = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name.endswith("_created")]
    return families, values | {("created", ()): len(created)}


def test_same_samples_as_prometheus_client() -> None:
    theirs, ours = CollectorRegistry(auto_describe=True), CollectorRegistry(auto_describe=True)
    _fill(Counter("pointsman_requests", "Requests", ("model", "status"), registry=theirs),
          Histogram("pointsman_duration_seconds", "Duration", ("model",), buckets=BUCKETS, registry=theirs),
          Histogram("pointsman_overhead_seconds", "Overhead", (), buckets=BUCKETS, registry=theirs))
    _fill(LoopCounter("pointsman_requests", "Requests", ("model", "status"), registry=ours),
          LoopHistogram("pointsman_duration_seconds", "Duration", ("model",), buckets=BUCKETS, registry=ours),
          LoopHistogram("pointsman_overhead_seconds", "Overhead", (), buckets=BUCKETS, registry=ours))
    assert _samples(ours) == _samples(theirs)
    values = _samples(ours)[1]
    assert values[("pointsman_duration_seconds_bucket", (("le", "0.001"), ("model", "m1")))] == 3
    assert values[("pointsman_duration_seconds_bucket", (("le", "+Inf"), ("model", "m1")))] == len(AMOUNTS)
    assert values[("pointsman_requests_total", (("model", "m1"), ("status", "2xx")))] == 3.5


def test_wrong_label_count_and_duplicate_names_are_refused() -> None:
    registry = CollectorRegistry(auto_describe=True)
    counter = LoopCounter("pointsman_requests", "Requests", ("model",), registry=registry)
    with pytest.raises(ValueError):
        counter.labels("m1", "extra")
    with pytest.raises(ValueError):  # the registry sees the family's names, as it does prometheus-client's
        Counter("pointsman_requests", "Requests again", ("model",), registry=registry)
