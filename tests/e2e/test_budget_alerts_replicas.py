"""Budget alerts through two replicas sharing Redis: each threshold alerts once per period, on one replica."""

from __future__ import annotations

import json
import time

import httpx

from tests.e2e.replicas import one_model, replicas, send

THRESHOLDS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


_config = one_model(f"""
  budgets:
    - {{scope: global, period: day, max_tokens: 200, alert_at: {THRESHOLDS}}}
""".strip("\n"))


def _alerts(*gateways) -> list[dict]:
    found = []
    for gateway in gateways:
        for line in gateway.output().splitlines():
            start = line.find('{"event": "budget_alert"')
            if start >= 0:
                found.append(json.loads(line[start:]))
    return found


BODY = {"model": "remote-a", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}


def test_each_threshold_alerts_once_across_replicas(tmp_path):
    with replicas(tmp_path, _config) as (first, second, _):
        answers = send([first.url, second.url], [BODY] * 80)
        served = sum(1 for a in answers if a.status_code == 200)
        used = next(b for b in httpx.get(first.url + "/v1/usage").json()["budgets"])["used_tokens"]
        expected = [t for t in THRESHOLDS if t * 200 <= used]
        deadline = time.monotonic() + 10
        while len({a["threshold"] for a in _alerts(first, second)}) < len(expected) and time.monotonic() < deadline:
            time.sleep(0.1)
        thresholds = sorted(a["threshold"] for a in _alerts(first, second))
        assert thresholds == expected, (served, used, thresholds)
