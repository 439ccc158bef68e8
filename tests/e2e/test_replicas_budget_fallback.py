"""A USD budget across two replicas, when a chain's first model fails and a pricier fallback serves.

README: "Budgets reserve a request's worst case ... atomically across every budget that applies before any model
runs, and settle to the actual usage afterwards ..., so a budget is never exceeded, across replicas too"."""

from __future__ import annotations

import httpx

from tests.conftest import free_port
from tests.e2e.replicas import replicas, send

LIMIT_USD = 0.02
PRICE = 1000.0  # USD per million tokens on the fallback: 0.001 USD a token


def _config(upstream: str, redis: str, database: str) -> str:
    return f"""
models:
  - {{id: cheap, backend: openai, base_url: "http://127.0.0.1:{free_port()}/v1", load: lazy,
      pricing: {{input_per_mtok: 1, output_per_mtok: 1}}}}
  - {{id: pricey, backend: openai, base_url: "{upstream}", upstream_model: mock-model,
      pricing: {{input_per_mtok: {PRICE}, output_per_mtok: {PRICE}}}}}
routing: {{health_check_s: 0, retries: 0,
           circuit_breaker: {{failures: 100000, min_requests: 100000, error_rate: 1.0}}}}
storage: {{redis_url: "{redis}", database_url: "{database}"}}
policies:
  budgets:
    - {{scope: global, period: day, max_cost_usd: {LIMIT_USD}}}
"""


BODY = {"model": "cheap:pricey", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}


def test_usd_budget_is_not_overspent_by_concurrent_fallbacks_to_a_pricier_model(tmp_path):
    with replicas(tmp_path, _config) as (first, second, _):
        answers = send([first.url, second.url], [BODY] * 40)
        served = [a for a in answers if a.status_code == 200]
        # 502: `cheap` (dead) tried alone, where the budget had no room left for `pricey`'s worst case
        assert all(a.status_code in (200, 429, 502) for a in answers), [a.text for a in answers
                                                                       if a.status_code not in (200, 429, 502)]
        assert served and all(a.headers["x-pointsman-model"] == "pricey" for a in served)
        spent = sum(a.json()["usage"]["total_tokens"] for a in served) * PRICE / 1e6
        usage = httpx.get(first.url + "/v1/usage").json()
        counted = next(b for b in usage["budgets"] if b["scope"] == "global")["used_usd"]
        # each served answer costs 0.003 USD (3 tokens at 0.001): the 0.02 USD budget holds 6 of them (7 at most,
        # allowing one estimate's error); the reservations were priced at `cheap` (9 tokens at 1 USD/Mtok)
        assert spent <= LIMIT_USD + 0.003, (
            f"{len(served)} of 40 served by the fallback, spending {spent:.3f} USD of a {LIMIT_USD} USD budget "
            f"(the budget counter says {counted:.3f})")


MODEL_LIMIT = 30  # tokens in total for `pricey`


def _model_budget_config(upstream: str, redis: str, database: str) -> str:
    return f"""
models:
  - {{id: cheap, backend: openai, base_url: "http://127.0.0.1:{free_port()}/v1", load: lazy}}
  - {{id: pricey, backend: openai, base_url: "{upstream}", upstream_model: mock-model}}
routing: {{health_check_s: 0, retries: 0,
           circuit_breaker: {{failures: 100000, min_requests: 100000, error_rate: 1.0}}}}
storage: {{redis_url: "{redis}", database_url: "{database}"}}
policies:
  budgets:
    - {{scope: model, match: pricey, period: total, max_tokens: {MODEL_LIMIT}}}
"""


def test_a_model_token_budget_is_not_overspent_by_concurrent_fallbacks_to_it(tmp_path):
    with replicas(tmp_path, _model_budget_config) as (first, second, _):
        answers = send([first.url, second.url], [BODY] * 40)
        served = [a for a in answers if a.status_code == 200]
        assert served and all(a.headers["x-pointsman-model"] == "pricey" for a in served)
        used = sum(a.json()["usage"]["total_tokens"] for a in served)
        # `pricey` may serve 30 tokens in total: 10 answers of 3 (one more at most, for an estimate's error)
        assert used <= MODEL_LIMIT + 9, (
            f"{len(served)} of 40 served by the fallback `pricey`: {used} tokens of its {MODEL_LIMIT}-token budget")
