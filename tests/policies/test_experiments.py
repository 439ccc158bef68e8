"""Experiments in process: sticky weighted assignment over 10,000 simulated units, the policy's rewrite, SQL
persistence across a restart, two replicas in step, usage rows with the arm, feedback, results and promotion."""

from __future__ import annotations

from collections import Counter

import msgspec
import pytest

from config.schema import ExperimentConfig
from policies.context import Outcome, Principal, RequestContext
from policies.experiments import (
    ExperimentConflict,
    ExperimentPolicy,
    ExperimentStore,
    FeedbackExists,
    add_feedback,
    assign,
    compute_results,
    decode_feedback,
    enrolled,
)
from policies.state import StateStore
from policies.usage import UsagePolicy
from policies.usage_log import UsageLog
from protocol.errors import BadRequest, NotFound
from protocol.openai import ChatCompletionRequest, decode_request
from tests.policies.conftest import eventually

session_loop = pytest.mark.asyncio(loop_scope="session")  # fixtures and tests share one loop
UNITS = [f"user-{i}" for i in range(10_000)]


def _experiment(**changes) -> ExperimentConfig:
    data = {"name": "small-vs-remote", "target": "chat-default", "primary_metric": "latency_s", "min_samples": 50,
            "variants": [{"name": "control", "model": "small", "weight": 50},
                         {"name": "remote", "model": "remote-a", "weight": 50, "params": {"temperature": 0.2},
                          "template": {"name": "greeting", "version": "1.1.0"}}]}
    data.update(changes)
    return msgspec.convert(data, ExperimentConfig)


def test_assignment_is_sticky_and_splits_by_weight_within_2_percent():
    for weights in ([("a", 50), ("b", 50)], [("a", 20), ("b", 30), ("c", 50)]):
        first = [assign("exp", u, weights) for u in UNITS]
        assert first == [assign("exp", u, weights) for u in UNITS]  # the same unit, the same variant
        counts = Counter(first)
        total = sum(w for _, w in weights)
        for name, weight in weights:
            assert abs(counts[name] / len(UNITS) - weight / total) < 0.02, (name, counts)
    # another experiment draws independently: its arms are not the same units
    same = sum(assign("exp", u, [("a", 1), ("b", 1)]) == assign("other", u, [("a", 1), ("b", 1)]) for u in UNITS)
    assert abs(same / len(UNITS) - 0.5) < 0.02


def test_changing_weights_moves_only_the_units_that_must_move():
    before = [assign("exp", u, [("a", 50), ("b", 50)]) for u in UNITS]
    after = [assign("exp", u, [("a", 60), ("b", 40)]) for u in UNITS]
    moved = [(x, y) for x, y in zip(before, after, strict=True) if x != y]
    assert all(x == "b" and y == "a" for x, y in moved)  # only towards the variant that gained weight
    assert abs(len(moved) / len(UNITS) - 0.10) < 0.02  # the 10% that must move, no more
    # weight 0: nobody; the others keep their units
    zeroed = [assign("exp", u, [("a", 50), ("b", 0)]) for u in UNITS]
    assert set(zeroed) == {"a"}


def test_traffic_share_is_independent_and_only_grows():
    half = {u for u in UNITS if enrolled("exp", u, 0.5)}
    more = {u for u in UNITS if enrolled("exp", u, 0.7)}
    assert abs(len(half) / len(UNITS) - 0.5) < 0.02 and half <= more
    arms = Counter(assign("exp", u, [("a", 1), ("b", 1)]) for u in half)
    assert abs(arms["a"] / len(half) - 0.5) < 0.03  # entering does not bias the arm


def test_config_validation():
    with pytest.raises(msgspec.ValidationError, match="unique"):
        _experiment(variants=[{"name": "a", "model": "x"}, {"name": "a", "model": "y"}])
    with pytest.raises(msgspec.ValidationError, match="sum to more than 0"):
        _experiment(variants=[{"name": "a", "model": "x", "weight": 0}, {"name": "b", "model": "y", "weight": 0}])
    with pytest.raises(msgspec.ValidationError, match="primary_metric"):
        _experiment(primary_metric="happiness")
    with pytest.raises(msgspec.ValidationError, match="Expected `float` >= 0"):
        _experiment(variants=[{"name": "a", "model": "x", "weight": -1}, {"name": "b", "model": "y"}])
    assert _experiment(primary_metric="feedback:quality").control.name == "control"


def _ctx(model: str = "chat-default", user: str | None = "alice", key: str | None = None) -> RequestContext:
    raw = {"model": model, "messages": [{"role": "user", "content": "hi"}],
           "template": {"name": "greeting", "variables": {"who": "Bo"}}}
    return RequestContext(decode_request(raw, ChatCompletionRequest), Principal(key_id=key), "req-1", user)


@session_loop
async def test_a_key_that_may_not_use_an_arms_model_is_not_enrolled(engine, store: StateStore):
    """The arm's model names are parsed as routing parses them: `org/model:v2` is one model (splitting it on the
    colon refused a key allowed exactly that model)."""
    experiment = _experiment(variants=[{"name": "control", "model": "org/model:v2", "weight": 1},
                                       {"name": "other", "model": "org/model:v2", "weight": 1}])
    experiments = ExperimentStore(engine, store, [experiment], poll_s=0.02)
    await experiments.start()
    ids = {"org/model:v2": ("org/model:v2",)}
    policy = ExperimentPolicy(experiments, routable=lambda _: True, ids_of=lambda name: ids.get(name, (name,)))
    try:
        for allowed, enrolled_ in ((("org/model:v2",), True), (("small",), False)):
            ctx = _ctx(key="k")
            ctx.principal = Principal(key_id="k", role="user", allowed_models=allowed)
            await policy.admit(ctx)
            assert (ctx.experiment is not None) is enrolled_
            assert ctx.request.body.model == ("org/model:v2" if enrolled_ else "chat-default")
    finally:
        await experiments.aclose()


@session_loop
async def test_the_policy_puts_a_request_into_its_arm(engine, store: StateStore):
    experiments = ExperimentStore(engine, store, [_experiment()], poll_s=0.02)
    await experiments.start()
    policy = ExperimentPolicy(experiments, routable=lambda name: name != "chat-default")
    try:
        arms = {}
        for user in UNITS[:40]:
            ctx = _ctx(user=user)
            assert await policy.admit(ctx) is None
            name, _, variant = ctx.experiment.partition("=")
            assert name == "small-vs-remote" and ctx.headers["x-pointsman-experiment"] == ctx.experiment
            arms[variant] = ctx
        remote, control = arms["remote"], arms["control"]
        assert remote.request.body.model == remote.request.raw["model"] == "remote-a"
        assert remote.request.body.temperature == remote.request.raw["temperature"] == 0.2
        # the arm's template version, the client's variables
        assert remote.request.raw["template"] == {"name": "greeting", "version": "1.1.0", "variables": {"who": "Bo"}}
        assert control.request.body.model == "small" and control.request.body.temperature is None
        # the API key is the unit when there is no user; with neither, not enrolled: the target is no model of its
        # own here, so the control serves it, unmarked
        keyed = _ctx(user=None, key="key-1")
        await policy.admit(keyed)
        assert keyed.experiment is not None
        nobody = _ctx(user=None)
        await policy.admit(nobody)
        assert nobody.experiment is None and nobody.request.body.model == "small"
        other = _ctx(model="remote-a")
        await policy.admit(other)
        assert other.experiment is None and other.request.body.model == "remote-a"
    finally:
        await experiments.aclose()


@session_loop
async def test_definitions_persist_and_two_replicas_agree(engine, store: StateStore):
    config = _experiment()
    first = ExperimentStore(engine, store, [config], poll_s=0.02)
    second = ExperimentStore(engine, store, [config], poll_s=0.02)
    await first.start()
    await second.start()
    try:
        policies = [ExperimentPolicy(s, routable=lambda _: True) for s in (first, second)]

        async def arms() -> list[list[str | None]]:
            seen = []
            for policy in policies:
                row = []
                for unit in UNITS[:200]:
                    ctx = _ctx(user=unit)
                    await policy.admit(ctx)
                    row.append(ctx.experiment)
                seen.append(row)
            return seen

        a, b = await arms()
        assert a == b and len(set(a)) == 2
        await first.update("small-vs-remote", {"weights": {"control": 0}})
        await eventually(lambda: second.get("small-vs-remote").config.variants[0].weight == 0)
        a, b = await arms()
        assert a == b == ["small-vs-remote=remote"] * 200
        created = _experiment(name="made-by-admin", target="other", status="draft")
        await second.create(created)
        await eventually(lambda: "made-by-admin" in first.by_name)
        with pytest.raises(ExperimentConflict):
            await first.create(created)
        with pytest.raises(ExperimentConflict, match="already has a running"):
            await first.create(_experiment(name="clash"))
        with pytest.raises(BadRequest):
            await first.update("small-vs-remote", {"weights": {"nobody": 3}})
        with pytest.raises(BadRequest):
            await first.update("small-vs-remote", {"traffic": 2})
        with pytest.raises(NotFound):
            first.get("missing")
    finally:
        await first.aclose()
        await second.aclose()
    # a restart: the admin's edits stay while the config file's definition is unchanged...
    restarted = ExperimentStore(engine, store, [config])
    await restarted.start()
    await restarted.aclose()
    assert restarted.get("small-vs-remote").config.variants[0].weight == 0
    assert restarted.get("made-by-admin").config.status == "draft"
    # ...and the file wins once it changes
    edited = ExperimentStore(engine, store, [_experiment(traffic=0.5)])
    await edited.start()
    await edited.aclose()
    assert edited.get("small-vs-remote").config.traffic == 0.5
    assert edited.get("small-vs-remote").config.variants[0].weight == 50


@session_loop
async def test_usage_rows_carry_the_arm_and_feedback_attaches_to_them(engine, store: StateStore):
    experiments = ExperimentStore(engine, store, [_experiment()])
    await experiments.start()
    log = UsageLog(engine, flush_interval_s=60)
    usage, policy = UsagePolicy(log), ExperimentPolicy(experiments, routable=lambda _: True)
    try:
        ctx = _ctx()
        await policy.admit(ctx)
        await usage.settle(ctx, Outcome("ok", body=b'{"id":"chatcmpl-42","object":"chat.completion","choices":[]}'))
        # not flushed yet: feedback writes this replica's queued rows first
        stored = await add_feedback(engine, decode_feedback(b'{"id":"chatcmpl-42","score":4,"metric":"quality"}'),
                                    log.flush)
        experiment, _, variant = ctx.experiment.partition("=")
        assert stored["experiment"] == experiment and stored["variant"] == variant and stored["request_id"] == "req-1"
        [row] = await log.rows()
        assert (row.experiment, row.variant, row.completion_id) == (experiment, variant, "chatcmpl-42")
        with pytest.raises(FeedbackExists):
            await add_feedback(engine, decode_feedback(b'{"id":"chatcmpl-42","score":1,"metric":"quality"}'))
        await add_feedback(engine, decode_feedback(b'{"id":"chatcmpl-42","score":1,"metric":"helpful"}'))
        with pytest.raises(NotFound):
            await add_feedback(engine, decode_feedback(b'{"id":"chatcmpl-0","score":1,"metric":"quality"}'),
                               log.flush)
        for bad in (b'{"id":"x","score":"high","metric":"q"}', b'{"id":"x","score":1}', b'{"id":"x"',
                    b'{"id":"x","score":1,"metric":"no spaces"}', b'{"id":"x","score":1e999,"metric":"q"}'):
            with pytest.raises(BadRequest):
                decode_feedback(bad)
        report = await experiments.results("small-vs-remote")
        assert report["variants"][variant]["feedback"]["quality"] == {"n": 1, "mean": 4.0}
    finally:
        await log.aclose()
        await experiments.aclose()


def _rows(rng, n: int, effect_s: float) -> list[tuple]:
    rows = []
    for i in range(n):
        variant = "control" if i % 2 else "remote"
        latency = rng.lognormal(0, 0.3) * 1000 + (effect_s * 1000 if variant == "remote" else 0)
        status = "error" if rng.random() < 0.02 else "ok"
        rows.append((variant, status, latency, latency / 4, 0.001, 20))
    return rows


def test_results_declare_a_winner_only_on_the_sequential_test_with_min_samples():
    import numpy as np
    rng = np.random.default_rng(5)
    config = _experiment(min_samples=300)
    faster = compute_results(config, _rows(rng, 2000, -0.3), [])
    latency = faster["metrics"]["latency_s"]["remote"]
    assert latency["diff"] < 0 and latency["p_value"] < 1e-6 and latency["always_valid_p"] < 0.05
    assert faster["winner"] == "remote"
    assert faster["metrics"]["error_rate"]["remote"]["test"] == "two_proportion_z"
    assert faster["variants"]["remote"]["requests"] == 1000
    # the same effect with fewer than min_samples per arm: no winner yet
    assert compute_results(config, _rows(rng, 400, -0.3), [])["winner"] is None
    # A/A: no winner
    assert compute_results(config, _rows(rng, 2000, 0.0), [])["winner"] is None
    # feedback is higher-is-better
    scores = [("control" if i % 2 else "remote", "quality", 3.0 + (i % 2 == 0) + rng.normal(0, 0.5))
              for i in range(1000)]
    judged = compute_results(_experiment(primary_metric="feedback:quality", min_samples=300), [], scores)
    assert judged["winner"] == "remote"


@session_loop
async def test_auto_promotion_gives_the_winner_the_target(engine, store: StateStore):
    experiments = ExperimentStore(engine, store, [_experiment(auto_promote=True)])
    await experiments.start()
    try:
        await experiments.promote("small-vs-remote", "remote")
        live = experiments.get("small-vs-remote")
        assert live.promoted == "remote" and live.config.status == "stopped"
        ctx = _ctx(user=None)  # not enrolled, and the experiment is stopped: the winner serves everyone
        await ExperimentPolicy(experiments, routable=lambda _: True).admit(ctx)
        assert ctx.request.body.model == "remote-a" and ctx.experiment is None
    finally:
        await experiments.aclose()


@session_loop
async def test_a_template_version_as_a_variant_renders_through_the_template_policy(engine, store: StateStore):
    from config.schema import TemplateConfig
    from policies.templates import TemplatePolicy

    templates = TemplatePolicy([msgspec.convert({"name": "greeting", "versions": [
        {"version": "1.0.0", "messages": [{"role": "system", "content": "Hello {{ who }}."}],
         "variables": {"who": {"type": "string"}}},
        {"version": "1.1.0", "stage": "staging", "messages": [{"role": "system", "content": "Hi there, {{ who }}!"}],
         "variables": {"who": {"type": "string"}}}]}, TemplateConfig)], None, store)
    experiments = ExperimentStore(engine, store, [_experiment()])
    await experiments.start()
    policy = ExperimentPolicy(experiments, routable=lambda _: True, render=templates.render_into)
    try:
        rendered = {}
        for unit in UNITS[:40]:
            ctx = _ctx(user=unit)
            await templates.admit(ctx)  # stage 20: the client's template (production, 1.0.0)
            await policy.admit(ctx)  # stage 40: the arm's version replaces it for the remote arm
            rendered[ctx.experiment.split("=")[1]] = ctx
        remote, control = rendered["remote"], rendered["control"]
        assert remote.request.body.messages[0].content == "Hi there, Bo!"
        assert remote.request.body.model == "remote-a" and remote.request.raw["temperature"] == 0.2
        assert "template" not in remote.request.raw and remote.request.raw["messages"][0]["content"] == "Hi there, Bo!"
        assert control.request.body.messages[0].content == "Hello Bo."
        assert len(remote.request.body.messages) == len(control.request.body.messages) == 2
    finally:
        await experiments.aclose()


# ---- regressions: tiny weights, arms whose model is gone, feedback on repeated answer ids ----

def test_tiny_weights_are_refused_or_normalised_and_assign_never_answers_no_variant():
    """{"control": 1e-310, "t": 0} was accepted and then -ln(U)/1e-310 was infinite for every unit: assign()
    answered "" and every enrolled request failed with a KeyError (500)."""
    tiny = [("control", 1e-310), ("t", 0.0)]
    assert {assign("exp", u, tiny) for u in UNITS[:200]} == {"control"}
    assert assign("exp", "u", [("a", 0.0), ("b", 0.0)]) == "a"  # no positive weight: the control, never ""
    from policies.experiments import Live
    live = Live.of(_experiment(variants=[{"name": "control", "model": "x", "weight": 1e-310},
                                         {"name": "t", "model": "y", "weight": 0}]))
    assert live.weights == (("control", 1.0), ("t", 0.0))
    for weights, message in (((1.0, 1e-12), "too small"), ((1e308, 1e308), "more than a float"),
                             ((float("inf"), 1.0), "finite"), ((float("nan"), 1.0), "finite|>= 0")):
        with pytest.raises(msgspec.ValidationError, match=message):
            _experiment(variants=[{"name": "a", "model": "x", "weight": weights[0]},
                                  {"name": "b", "model": "y", "weight": weights[1]}])


@session_loop
async def test_a_tiny_weight_set_through_the_store_still_assigns_every_unit(engine, store: StateStore):
    experiments = ExperimentStore(engine, store, [_experiment()])
    await experiments.start()
    policy = ExperimentPolicy(experiments, routable=lambda name: name != "chat-default")
    try:
        await experiments.update("small-vs-remote", {"weights": {"control": 1e-310, "remote": 0}})
        for unit in UNITS[:50]:
            ctx = _ctx(user=unit)
            await policy.admit(ctx)
            assert ctx.experiment == "small-vs-remote=control" and ctx.request.body.model == "small"
        with pytest.raises(BadRequest, match="too small"):
            await experiments.update("small-vs-remote", {"weights": {"control": 1, "remote": 1e-12}})
    finally:
        await experiments.aclose()


def _config(experiment_models: tuple[str, str]) -> dict:
    return {"models": [{"id": "remote-a", "backend": "openai", "base_url": "http://127.0.0.1:9/v1",
                        "aliases": ["ra"], "versions": [{"version": "1.0.0", "stage": "production"},
                                                        {"version": "0.9.0", "stage": "archived"}]}],
            "storage": {"database_url": "sqlite+aiosqlite:///x.db"},
            "experiments": [{"name": "ab", "target": "chat-default",
                             "variants": [{"name": "control", "model": experiment_models[0]},
                                          {"name": "treatment", "model": experiment_models[1]}]}]}


def test_the_config_refuses_an_experiment_whose_variant_names_no_model():
    from config.schema import Config
    for models in (("remote-a", "ra"), ("remote-a@1.0.0", "auto"), ("auto-fast", "ra:auto")):
        msgspec.convert(_config(models), Config)  # ids, aliases, versions, profiles and chains all route
    for bad in ("remote-b", "remote-a@0.9.0", "ra:nope"):
        with pytest.raises(msgspec.ValidationError,
                           match=rf"experiment 'ab', variant 'treatment': unknown model '{bad}'"):
            msgspec.convert(_config(("remote-a", bad)), Config)


@session_loop
async def test_an_arm_whose_model_is_gone_sends_its_units_to_the_control(engine, store: StateStore):
    """A reload removed the treatment's model: its units got 404 "The model ... does not exist", recorded as the
    treatment's errors. Now the control serves them, outside the experiment; creating one such arm is a 400."""
    experiments = ExperimentStore(engine, store, [_experiment()])
    await experiments.start()
    gone = {"remote-a", "chat-default"}
    policy = ExperimentPolicy(experiments, routable=lambda name: name not in gone)
    try:
        seen = Counter()
        for unit in UNITS[:60]:
            ctx = _ctx(user=unit)
            await policy.admit(ctx)
            assert ctx.request.body.model == "small"
            seen[ctx.experiment] += 1
        assert set(seen) == {"small-vs-remote=control", None} and ctx.headers.get("x-pointsman-experiment") in (
            None, "small-vs-remote=control")
        with pytest.raises(BadRequest, match="experiment 'made', variant 'remote': unknown model 'remote-a'"):
            await experiments.create(_experiment(name="made", target="other"), routable=lambda n: n not in gone)
        assert "made" not in experiments.by_name
    finally:
        await experiments.aclose()


@session_loop
async def test_feedback_on_an_answer_id_several_requests_share_is_refused_and_request_ids_work(
        engine, store: StateStore):
    """An upstream that repeats answer ids (the test mock always says mock-1): the score went to the first
    request with that id, and the next one's was refused as feedback_exists."""
    from policies.experiments import AmbiguousAnswer
    experiments = ExperimentStore(engine, store, [_experiment()])
    await experiments.start()
    log = UsageLog(engine, flush_interval_s=60)
    usage, policy = UsagePolicy(log), ExperimentPolicy(experiments, routable=lambda _: True)
    body = b'{"id":"mock-1","object":"chat.completion","choices":[]}'
    try:
        arms = {}
        for i, unit in enumerate(UNITS[:40]):
            ctx = _ctx(user=unit)
            ctx.request_id = f"req-{i}"
            await policy.admit(ctx)
            await usage.settle(ctx, Outcome("ok", body=body))
            arms[ctx.request_id] = ctx.experiment.partition("=")[2]
        first = await add_feedback(engine, decode_feedback(b'{"id":"req-0","score":4,"metric":"quality"}'),
                                   log.flush)
        assert (first["request_id"], first["variant"]) == ("req-0", arms["req-0"])
        with pytest.raises(AmbiguousAnswer, match="x-request-id"):
            await add_feedback(engine, decode_feedback(b'{"id":"mock-1","score":1,"metric":"quality"}'))
        other = next(r for r, arm in arms.items() if arm != arms["req-0"])
        second = await add_feedback(engine, decode_feedback(
            msgspec.json.encode({"id": other, "score": 2, "metric": "quality"})))
        assert (second["request_id"], second["variant"]) == (other, arms[other])
        with pytest.raises(FeedbackExists):
            await add_feedback(engine, decode_feedback(b'{"id":"req-0","score":1,"metric":"quality"}'))
        report = await experiments.results("small-vs-remote")
        assert report["variants"][arms["req-0"]]["feedback"]["quality"] == {"n": 1, "mean": 4.0}
        assert report["variants"][arms[other]]["feedback"]["quality"] == {"n": 1, "mean": 2.0}
    finally:
        await log.aclose()
        await experiments.aclose()
