"""deploy/grafana/pointsman.json asks only for what a live gateway exports: every metric name its PromQL reads
appears on a real /metrics page (scraped with a readonly key, as Prometheus does), and every label it filters or
groups by is a label of that metric."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Process, http, start_gateway
from tests.deploy.conftest import DEPLOY

DASHBOARD = json.loads((DEPLOY / "grafana" / "pointsman.json").read_text(encoding="utf-8"))
ADMIN = "admin-" + uuid.uuid4().hex
TARGET_LABELS = {"job", "instance"}  # Prometheus adds these to every scraped series
# what the dashboard must show (the families policies/metrics.py and gateway/metrics.py export)
SHOWN = {"pointsman_requests_total", "pointsman_request_duration_seconds_bucket",
         "pointsman_time_to_first_token_seconds_bucket", "pointsman_tokens_total", "pointsman_cost_usd_total",
         "pointsman_cache_requests_total", "pointsman_budget_remaining", "pointsman_budget_limit",
         "pointsman_upstream_in_flight", "pointsman_circuit_breaker_state",
         "pointsman_gateway_overhead_seconds_bucket"}

_TOKEN = re.compile(r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<range>\[[^\]]*\])
  | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<var>\$\w+)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^(){},=<>])
  | (?P<space>\s+)
""", re.VERBOSE)
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset"}


def references(expr: str) -> tuple[set[str], set[str]]:
    """The metric names a PromQL expression reads, and the label names it matches on or groups by."""
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        assert match is not None, f"cannot read {expr[position:]!r} in {expr!r}"
        if match.lastgroup != "space":
            tokens.append((match.lastgroup or "", match.group()))
        position = match.end()
    metrics: set[str] = set()
    labels: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        after = tokens[i + 1][1] if i + 1 < len(tokens) else None
        if kind == "op" and text == "{":
            raise AssertionError(f"a selector without a metric name in {expr!r}")
        if kind != "name" or text in _KEYWORDS:
            i += 1
        elif text in _GROUPING:
            i += 1
            if after == "(":
                i += 1
                while tokens[i][1] != ")":
                    if tokens[i][0] == "name":
                        labels.add(tokens[i][1])
                    i += 1
        elif after == "(" or after in ("by", "without"):  # a function, or an aggregation like `sum by (x) (...)`
            i += 1
        else:
            metrics.add(text)
            i += 1
            if after == "{":
                i += 1
                while tokens[i][1] != "}":
                    if tokens[i][0] == "name":
                        labels.add(tokens[i][1])
                        i += 2  # the operator; the value is a string token, skipped below
                    i += 1
                i += 1
    return metrics, labels


def queries(dashboard: dict) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable (label_values(metric, label))."""
    panels = [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]
    for panel in panels:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
            assert match is not None, f"variable {variable['name']}: {query}"
            yield f"variable {variable['name']}", f"{match.group(1)}{{{match.group(2)}!=\"\"}}"


def problems(dashboard: dict, exported: dict[str, set[str]]) -> list[str]:
    """Every name or label the dashboard reads that `exported` (sample name -> its labels) does not have."""
    found = []
    for where, expr in queries(dashboard):
        metrics, labels = references(expr)
        if not metrics:
            found.append(f"{where}: reads no metric: {expr}")
        for metric in metrics:
            if metric not in exported:
                found.append(f"{where}: {metric} is not exported")
                continue
            for label in labels - exported[metric] - TARGET_LABELS:
                found.append(f"{where}: {metric} has no label {label!r}")
        if "histogram_quantile" in expr and not re.search(r"by \((?:[\w, ]*\b)?le\b", expr):
            found.append(f"{where}: histogram_quantile without `le` in its by (...)")
    return found


def scrape(server: Process, key: str, until, timeout: float = 20.0) -> dict[str, set[str]]:
    """GET /metrics with `key` until `until(samples)`: sample name -> the label names its series carry."""
    deadline = time.monotonic() + timeout
    while True:
        status, _, page = http("GET", server.url + "/metrics", headers={"authorization": f"Bearer {key}"})
        assert status == 200, page
        exported: dict[str, set[str]] = {}
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(page.decode()):
            for sample in family.samples:
                exported.setdefault(sample.name, set()).update(sample.labels)
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
        if until(values) or time.monotonic() > deadline:
            return exported
        time.sleep(0.05)


@pytest.fixture(scope="module")
def exported(upstream, tmp_path_factory) -> dict[str, set[str]]:
    """A live gateway's /metrics after known traffic: auth on, metrics on, a budget, the cache."""
    tmp = tmp_path_factory.mktemp("dashboard-metrics")
    config = f"""
models:
  - id: remote-a
    backend: openai
    base_url: {upstream.url}
    upstream_model: mock-model
    pricing: {{input_per_mtok: 1, output_per_mtok: 2}}
routing: {{health_check_s: 0}}
metrics: {{enabled: true}}
policies:
  cache: {{mode: always}}
  budgets:
    - {{scope: global, period: day, max_tokens: 1000000}}
"""
    server = start_gateway(tmp, config, env={"POINTSMAN_ADMIN_KEY": ADMIN})
    try:
        admin = {"authorization": f"Bearer {ADMIN}"}
        chat = {"model": "remote-a", "messages": [{"role": "user", "content": "one two three"}]}
        assert http("POST", server.url + "/v1/chat/completions", chat, admin)[0] == 200
        assert http("POST", server.url + "/v1/chat/completions", chat, admin)[0] == 200  # a cache hit
        assert http("POST", server.url + "/v1/chat/completions", {**chat, "stream": True,
                                                                  "messages": [{"role": "user", "content": "x"}]},
                    admin)[0] == 200
        # Prometheus' key, made the way the README says: a readonly key from `pointsman admin keys create`
        created = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "admin", "keys", "create", "--role", "readonly", "--json",
             "--url", server.url, "--key", ADMIN], capture_output=True, text=True, timeout=60)
        assert created.returncode == 0, created.stderr
        readonly = json.loads(created.stdout)["key"]
        assert http("GET", server.url + "/metrics")[0] == 401  # hence prometheus.yml's Bearer token
        return scrape(server, readonly, lambda v: v.get("pointsman_gateway_overhead_seconds_count") == 3)
    finally:
        server.stop()


def test_dashboard_reads_only_exported_metrics_and_labels(exported) -> None:
    assert not problems(DASHBOARD, exported)
    read = set().union(*(references(expr)[0] for _, expr in queries(DASHBOARD)))
    assert SHOWN <= read, f"not on the dashboard: {sorted(SHOWN - read)}"
    assert SHOWN <= exported.keys()  # the traffic above made every family appear


def test_the_check_catches_a_wrong_name_or_label(exported) -> None:
    broken = json.loads(json.dumps(DASHBOARD))
    target = broken["panels"][1]["targets"][0]
    target["expr"] = 'sum by (tenant) (rate(pointsman_requests_total{model="x"}[5m])) + pointsman_requests'
    found = problems(broken, exported)
    assert any("has no label 'tenant'" in p for p in found)
    assert any("pointsman_requests is not exported" in p for p in found)  # a counter's family name, no _total
    target["expr"] = "histogram_quantile(0.9, sum by (model) (rate(pointsman_request_duration_seconds_bucket[5m])))"
    assert any("without `le`" in p for p in problems(broken, exported))


def test_dashboard_is_well_formed() -> None:
    panels = [p for top in DASHBOARD["panels"] for p in (top, *top.get("panels", []))]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in panels:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
    used = {m.group(1) for _, expr in queries(DASHBOARD) for m in re.finditer(r"\$(\w+)", expr)}
    assert used <= variables.keys() | {"__rate_interval", "__range", "__interval"}
