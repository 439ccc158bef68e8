"""A/B experiments: sticky weighted assignment, the policy that routes a request to its arm, the experiments'
SQL rows kept in step on every replica, feedback scores, and the results with their statistics."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar

import msgspec
import numpy as np
import sqlalchemy as sa
from msgspec import Meta
from sqlalchemy.ext.asyncio import AsyncEngine

from config.schema import EXPERIMENT_METRICS, ExperimentConfig, ExperimentVariant, check_experiments
from policies.base import STAGES, no_op
from policies.context import Outcome, Principal, Reply, RequestContext
from policies.database import experiments as experiments_table
from policies.database import feedback as feedback_table
from policies.database import storable, usage_rows
from policies.experiment_stats import Summary, always_valid_p, compare_means, compare_proportions
from policies.state import StateStore
from protocol.errors import BadRequest, BudgetExceeded, GatewayError, NotFound
from protocol.openai import ChatCompletionRequest, ParsedRequest

__all__ = ["AmbiguousAnswer", "Arm", "ExperimentConflict", "ExperimentPolicy", "ExperimentStore", "Feedback",
           "FeedbackExists", "Live", "add_feedback", "assign", "compute_results", "decode_feedback", "enrolled"]

log = logging.getLogger("pointsman.experiments")
VERSION_KEY = "experiments:version"  # a token in the state store: replicas reload from SQL when it changes
_FORBIDDEN_PARAMS = frozenset({"model", "messages", "prompt", "stream", "template"})
_TWO64 = float(2**64)
# renders template NAME at VERSION (None: production) into ctx's messages, with these variables (None: the client's)
Render = Callable[[RequestContext, str, "str | None", "dict[str, Any] | None"], Any]


class ExperimentConflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


def _uniform(*parts: str) -> float:
    """A uniform number in (0, 1) from a hash of `parts`: the same on every replica and every run."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / _TWO64


def enrolled(experiment: str, unit: str, traffic: float) -> bool:
    """Whether `unit` is in the experiment's traffic share; a hash independent of the variant's, so raising
    `traffic` only adds units and never reshuffles the arms."""
    return traffic >= 1.0 or _uniform(experiment, "traffic", unit) < traffic


def assign(experiment: str, unit: str, weights: Sequence[tuple[str, float]]) -> str:
    """Weighted rendezvous hashing (highest random weight): each variant draws -ln(U)/weight from a hash of
    (experiment, variant, unit), the lowest wins. A variant wins with probability weight/sum, and raising one
    weight only lowers that variant's draws, so the units that move are exactly those that must (they move to it
    and nowhere else); weight 0 never wins. Never an empty name: draws that overflow to infinity (a weight too
    small for the arithmetic, which ExperimentConfig refuses) still pick a variant, and with no positive weight
    the first variant (the control) is picked."""
    best: str | None = None
    best_score = math.inf
    for name, weight in weights:
        if not weight > 0:
            continue
        score = -math.log(_uniform(experiment, name, unit)) / weight
        if best is None or score < best_score:
            best, best_score = name, score
    if best is None:
        return weights[0][0]
    return best


@dataclass(frozen=True, slots=True)
class Arm:
    """A variant as a request sees it: the model, the overrides for the decoded body and for the raw body."""

    name: str
    model: str
    body: dict[str, Any]
    raw: dict[str, Any]
    template: tuple[str, str | None] | None = None  # (name, version) the arm renders

    @classmethod
    def of(cls, variant: ExperimentVariant) -> Arm:
        bad = _FORBIDDEN_PARAMS.intersection(variant.params)
        if bad:
            raise BadRequest(f"variant {variant.name!r}: params may not set {', '.join(sorted(bad))}",
                             param="params")
        probe = {"model": variant.model, "messages": [{"role": "user", "content": ""}], **variant.params}
        try:  # the overrides must be valid request fields: checked once here, never per request
            checked = msgspec.convert(probe, ChatCompletionRequest)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"variant {variant.name!r}: params: {exc}", param="params") from exc
        known = ChatCompletionRequest.__struct_fields__
        body = {k: getattr(checked, k) for k in variant.params if k in known}
        template = None if variant.template is None else (variant.template.name, variant.template.version)
        return cls(variant.name, variant.model, body, dict(variant.params), template)

    def apply(self, ctx: RequestContext, render: Render | None = None) -> None:
        """Rewrite the request for this arm: its template version rendered first (through the template policy's
        `render`, which starts again from the request as the client sent it), then the model and the params.
        Without a renderer the template reference is handed on in the body's `template` field instead."""
        if self.template is not None and render is not None:
            render(ctx, self.template[0], self.template[1], None)  # None: the client's own variables
        request = ctx.request
        raw = {**request.raw, "model": self.model, **self.raw}
        if self.template is not None and render is None:
            given = request.raw.get("template")
            variables = given.get("variables", {}) if isinstance(given, dict) else {}
            raw["template"] = {"name": self.template[0], "version": self.template[1], "variables": variables}
        fields = request.body.__struct_fields__
        body = msgspec.structs.replace(request.body, model=self.model,
                                       **{k: v for k, v in self.body.items() if k in fields})
        ctx.request = ParsedRequest(body, raw)


@dataclass(frozen=True, slots=True)
class Live:
    """One experiment as the request path uses it, built once per reload."""

    config: ExperimentConfig
    promoted: str | None
    arms: dict[str, Arm]
    weights: tuple[tuple[str, float], ...]

    @classmethod
    def of(cls, config: ExperimentConfig, promoted: str | None = None) -> Live:
        """The weights are normalised to shares of 1 (ExperimentConfig keeps each positive one at least 1e-9 of
        the total), so that assign()'s draws stay finite however small or large the configured numbers are."""
        total = sum(v.weight for v in config.variants)
        return cls(config, promoted, {v.name: Arm.of(v) for v in config.variants},
                   tuple((v.name, v.weight / total) for v in config.variants))

    @property
    def control(self) -> Arm:
        return self.arms[self.config.control.name]

    def fallback(self, routable: Callable[[str], bool]) -> Arm | None:
        """Where a request that is not in the experiment goes: the promoted winner once there is one (while its
        model routes); the control when the target is no model of its own; else nowhere (the target serves it)."""
        if self.promoted is not None and self.promoted in self.arms:
            promoted = self.arms[self.promoted]
            if routable(promoted.model):
                return promoted
        return None if routable(self.config.target) else self.control


class ExperimentPolicy:
    """Stage 40: puts a request for an experiment's target into its unit's arm (model, params, template), marks
    it NAME=VARIANT in the context, the usage row and the `x-pointsman-experiment` header. The unit is the
    request's user (`user` field or x-pointsman-user), else its API key; a request with neither is not enrolled,
    nor is one whose API key may not use its arm's model (it goes to the target it named)."""

    name: ClassVar[str] = "experiment"
    stage: ClassVar[int] = STAGES["experiment"]

    def __init__(self, store: ExperimentStore, routable: Callable[[str], bool], render: Render | None = None,
                 ids_of: Callable[[str], tuple[str, ...]] | None = None) -> None:
        self.store = store
        self.routable = routable  # whether a model name routes (the gateway's table, which a reload replaces)
        # the model ids a name (a chain's elements, an alias's model) names, as the table parses it
        self.ids_of = ids_of or (lambda name: (name,))
        self.render = render  # the template policy's render_into, when templates are on
        self._gone: set[tuple[str, str, str]] = set()  # (experiment, variant, model) already logged as gone

    async def admit(self, ctx: RequestContext) -> Reply | None:
        target = ctx.request.body.model
        live = self.store.by_target.get(target) if target is not None else None
        if live is None:
            return None
        config = live.config
        unit = ctx.user or ctx.principal.key_id
        principal = ctx.principal
        if config.status == "running" and unit is not None and enrolled(config.name, unit, config.traffic):
            arm = live.arms[assign(config.name, unit, live.weights)]
            # an arm the caller's key may not use: the request is served as any outside the experiment is, below
            # (never refused for, nor told of, a model the client did not ask for)
            if self._may_route(principal, arm.model):
                if self.routable(arm.model):
                    arm.apply(ctx, self.render)
                    ctx.experiment = tag = f"{config.name}={arm.name}"
                    ctx.headers["x-pointsman-experiment"] = tag
                    return None
                # the arm's model is gone (a reload removed it): the control serves the request, which stays out
                # of the results, so that neither arm is charged with requests it did not get as assigned
                self._log_gone(config.name, arm)
                if self._may_route(principal, live.control.model):
                    live.control.apply(ctx, self.render)
                return None
        arm = live.fallback(self.routable)
        if arm is not None and self._may_route(principal, arm.model):
            arm.apply(ctx, self.render)
        return None

    def _may_route(self, principal: Principal, name: str) -> bool:
        """Whether every model `name` names is one the caller's key may use."""
        return not principal.restricted or all(principal.may_use(i) for i in self.ids_of(name))

    def _log_gone(self, experiment: str, arm: Arm) -> None:
        key = (experiment, arm.name, arm.model)
        if key not in self._gone:
            self._gone.add(key)
            log.warning("experiment %s: variant %s routes to %r, which is no model now: its units go to the "
                        "control, outside the experiment", experiment, arm.name, arm.model)

    @no_op
    async def approve(self, ctx: RequestContext, decision: Any) -> None:
        return None

    async def settle(self, ctx: RequestContext, outcome: Outcome) -> None:
        """The usage row carries the arm and the outcome; results are computed from those rows. A request a budget
        refused after its arm was chosen never reached the arm's model: it leaves the experiment, as one a rate
        limit refused before the arm was chosen never entered it (it is no error of the arm's)."""
        if ctx.experiment is not None and isinstance(outcome.error, BudgetExceeded):
            ctx.experiment = None


def _now() -> datetime:
    return datetime.now(UTC)


def _spec(config: ExperimentConfig) -> str:
    return msgspec.json.encode(config).decode()


def _decode(spec: str) -> ExperimentConfig:
    return msgspec.json.decode(spec, type=ExperimentConfig)


class ExperimentStore:
    """The experiments' SQL rows and this replica's snapshot of them (`by_target`, read per request, never a
    query). Every change is written to SQL, then a new token goes into the state store: each replica polls that
    token every `poll_s` and reloads when it changed (and every `refresh_s` regardless), so all replicas run the
    same definitions within about `poll_s`. Running experiments with `auto_promote` are evaluated every
    `evaluate_s`."""

    def __init__(self, engine: AsyncEngine, state: StateStore, configured: Sequence[ExperimentConfig] = (), *,
                 poll_s: float = 0.5, refresh_s: float = 30.0, evaluate_s: float = 30.0) -> None:
        self.engine, self.state, self.configured = engine, state, tuple(configured)
        self.poll_s, self.refresh_s, self.evaluate_s = poll_s, refresh_s, evaluate_s
        self.by_target: dict[str, Live] = {}
        self.by_name: dict[str, Live] = {}
        self._token: bytes | None = None
        self._task: asyncio.Task[None] | None = None
        for config in configured:
            Live.of(config)  # bad params fail at startup, not on the first request

    async def start(self) -> None:
        await self._seed()
        await self.load()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="pointsman.experiments")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _seed(self) -> None:
        """Write the config's experiments: new ones, and those whose definition in the file changed since it last
        wrote them; an experiment edited through the admin API keeps its edits while the file is unchanged."""
        table = experiments_table
        for config in self.configured:
            spec = _spec(config)
            async with self.engine.begin() as connection:
                seeded = (await connection.execute(
                    sa.select(table.c.seeded).where(table.c.name == config.name))).first()
                now = _now()
                if seeded is None:
                    with contextlib.suppress(sa.exc.IntegrityError):  # a replica starting beside us wrote it first
                        async with connection.begin_nested():
                            await connection.execute(table.insert().values(
                                name=config.name, spec=spec, status=config.status, seeded=spec, created_at=now,
                                updated_at=now))
                elif seeded[0] != spec:
                    await connection.execute(table.update().where(table.c.name == config.name).values(
                        spec=spec, status=config.status, seeded=spec, promoted=None, updated_at=now))

    async def load(self) -> None:
        """Replace the snapshot with the rows in SQL; a row that no longer decodes is skipped and logged."""
        async with self.engine.connect() as connection:
            rows = (await connection.execute(
                sa.select(experiments_table.c.name, experiments_table.c.spec, experiments_table.c.promoted))).all()
        by_name: dict[str, Live] = {}
        for name, spec, promoted in rows:
            try:
                by_name[name] = Live.of(_decode(spec), promoted)
            except (msgspec.ValidationError, GatewayError) as exc:
                log.error("experiment %s: stored definition refused, skipped: %s", name, exc)
        by_target: dict[str, Live] = {}
        for live in sorted(by_name.values(), key=lambda x: x.config.status != "running"):
            by_target.setdefault(live.config.target, live)  # a running experiment owns its target
        self.by_name, self.by_target = by_name, by_target

    async def _changed(self) -> None:
        await self.load()
        token = uuid.uuid4().hex.encode()
        try:
            await self.state.set(VERSION_KEY, token)
            self._token = token
        except Exception as exc:  # the other replicas pick the change up at their next full refresh
            log.warning("experiments: cannot announce a change through the state store: %s", exc)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        refreshed = evaluated = loop.time()
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                token = await self.state.get(VERSION_KEY)
                now = loop.time()
                if token != self._token or now - refreshed >= self.refresh_s:
                    self._token, refreshed = token, now
                    await self.load()
                if now - evaluated >= self.evaluate_s:
                    evaluated = now
                    await self.auto_promote()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a database or Redis outage: keep the snapshot, try again
                log.warning("experiments: cannot refresh (%s: %s); keeping the current definitions",
                            type(exc).__name__, exc)

    # ---- changes (the admin API) ----

    def get(self, name: str) -> Live:
        live = self.by_name.get(name)
        if live is None:
            raise NotFound(f"No experiment named {name!r}.", param="name")
        return live

    async def create(self, config: ExperimentConfig, routable: Callable[[str], bool] | None = None) -> Live:
        """Write a new experiment; with `routable` (whether a model name routes), every variant's model must."""
        Live.of(config)
        for variant in config.variants if routable is not None else ():
            if not routable(variant.model):
                raise BadRequest(f"experiment {config.name!r}, variant {variant.name!r}: unknown model "
                                 f"{variant.model!r}", param="variants")
        if config.name in self.by_name:
            raise ExperimentConflict(f"An experiment named {config.name!r} exists already.")
        self._check_targets(config)
        now = _now()
        try:
            async with self.engine.begin() as connection:
                await connection.execute(experiments_table.insert().values(
                    name=config.name, spec=_spec(config), status=config.status, created_at=now, updated_at=now))
        except sa.exc.IntegrityError as exc:
            raise ExperimentConflict(f"An experiment named {config.name!r} exists already.") from exc
        await self._changed()
        return self.get(config.name)

    async def update(self, name: str, changes: dict[str, Any], promoted: str | None = None) -> Live:
        """Apply `changes` (weights: {variant: weight}, status, traffic, alpha, min_samples, auto_promote,
        primary_metric) to the definition, validated as a whole before it is written."""
        current = self.get(name).config
        data = msgspec.to_builtins(current)
        weights = changes.pop("weights", None)
        if weights is not None:
            if not isinstance(weights, dict) or not set(weights) <= {v["name"] for v in data["variants"]}:
                raise BadRequest("weights: expected {variant name: weight} for variants of this experiment",
                                 param="weights")
            for variant in data["variants"]:
                variant["weight"] = weights.get(variant["name"], variant["weight"])
        unknown = set(changes) - {"status", "traffic", "alpha", "min_samples", "auto_promote", "primary_metric"}
        if unknown:
            raise BadRequest(f"cannot change {', '.join(sorted(unknown))}", param=sorted(unknown)[0])
        data.update(changes)
        try:
            config = msgspec.convert(data, ExperimentConfig)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"invalid experiment: {exc}") from exc
        self._check_targets(config)
        values: dict[str, Any] = {"spec": _spec(config), "status": config.status, "updated_at": _now()}
        if promoted is not None:
            values["promoted"] = promoted
        async with self.engine.begin() as connection:
            await connection.execute(experiments_table.update().where(experiments_table.c.name == name)
                                     .values(**values))
        await self._changed()
        return self.get(name)

    async def promote(self, name: str, winner: str) -> Live:
        """All the weight to `winner`, and stop: requests for the target then go to the winner."""
        live = self.get(name)
        if winner not in live.arms:
            raise BadRequest(f"experiment {name!r} has no variant {winner!r}", param="variant")
        weights = {v.name: (100.0 if v.name == winner else 0.0) for v in live.config.variants}
        log.warning("experiment %s: promoting %s (all the weight, experiment stopped)", name, winner)
        return await self.update(name, {"weights": weights, "status": "stopped"}, promoted=winner)

    def _check_targets(self, config: ExperimentConfig) -> None:
        others = [live.config for live in self.by_name.values() if live.config.name != config.name]
        try:
            check_experiments([*others, config])
        except ValueError as exc:
            raise ExperimentConflict(str(exc).split(": ", 1)[-1]) from exc

    async def auto_promote(self) -> None:
        for live in list(self.by_name.values()):
            config = live.config
            if config.status == "running" and config.auto_promote:
                report = await self.results(config.name)
                if report["winner"] is not None:
                    await self.promote(config.name, report["winner"])

    # ---- results ----

    async def results(self, name: str) -> dict:
        live = self.get(name)
        u, f = usage_rows.c, feedback_table.c
        async with self.engine.connect() as connection:
            rows = (await connection.execute(
                sa.select(u.variant, u.status, u.latency_ms, u.ttft_ms, u.cost_usd, u.completion_tokens)
                .where(u.experiment == name).order_by(u.id))).all()
            scores = (await connection.execute(
                sa.select(f.variant, f.metric, f.score).where(f.experiment == name).order_by(f.id))).all()
        report = await asyncio.to_thread(compute_results, live.config, rows, scores)
        report["promoted"] = live.promoted
        return report


# ---- results, pure ----

_LOWER_IS_BETTER = frozenset(EXPERIMENT_METRICS)  # feedback:<metric> scores are higher-is-better


def _percentile(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 6) if values.size else None


def compute_results(config: ExperimentConfig, rows: Sequence[Sequence[Any]], scores: Sequence[Sequence[Any]],
                    ) -> dict:
    """Per variant: counts and percentiles; per metric and variant against control: the fixed-horizon test, the
    always-valid p-value, and the winner, declared on the primary metric's sequential test alone.

    rows: (variant, status, latency_ms, ttft_ms, cost_usd, completion_tokens) in arrival order; scores:
    (variant, metric, score). Latency, TTFT, cost and tokens count served requests (status ok); the error rate
    counts served and failed ones (cancelled requests are neither). With k variants against control each test
    runs at alpha / k (Bonferroni), so the chance of any false winner stays at most alpha.
    """
    names = [v.name for v in config.variants]
    control = names[0]
    variant_of = np.array([r[0] for r in rows], dtype=object)
    status = np.array([r[1] for r in rows], dtype=object)
    served = status == "ok"

    def column(i: int, scale: float = 1.0) -> np.ndarray:
        return np.array([np.nan if r[i] is None else float(r[i]) * scale for r in rows], dtype=float)

    series: dict[str, tuple[np.ndarray, np.ndarray, bool]] = {}  # metric -> (values, variant per value, proportion)
    for metric, values in (("latency_s", column(2, 1e-3)), ("ttft_s", column(3, 1e-3)), ("cost_usd", column(4)),
                           ("completion_tokens", column(5))):
        keep = served & ~np.isnan(values) if rows else np.zeros(0, dtype=bool)
        series[metric] = (values[keep], variant_of[keep], False)
    counted = (status == "ok") | (status == "error")
    series["error_rate"] = ((status[counted] == "error").astype(float), variant_of[counted], True)
    for metric in sorted({s[1] for s in scores}):
        picked = [s for s in scores if s[1] == metric]
        series[f"feedback:{metric}"] = (np.array([s[2] for s in picked], dtype=float),
                                        np.array([s[0] for s in picked], dtype=object), False)

    variants = {}
    for name in names:
        mine = variant_of == name
        ok = mine & served
        latency = series["latency_s"][0][series["latency_s"][1] == name]
        ttft = series["ttft_s"][0][series["ttft_s"][1] == name]
        tokens = series["completion_tokens"][0][series["completion_tokens"][1] == name]
        cost = series["cost_usd"][0][series["cost_usd"][1] == name]
        errors = int(np.sum(mine & (status == "error")))
        variants[name] = {
            "requests": int(mine.sum()), "served": int(ok.sum()), "errors": errors,
            "latency_s": {"p50": _percentile(latency, 50), "p95": _percentile(latency, 95)},
            "ttft_s": {"p50": _percentile(ttft, 50), "p95": _percentile(ttft, 95)},
            "completion_tokens": int(tokens.sum()), "cost_usd": round(float(cost.sum()), 8),
            "feedback": {m.split(":", 1)[1]: {"n": int((s[1] == name).sum()),
                                              "mean": float(s[0][s[1] == name].mean()) if (s[1] == name).any()
                                              else None}
                         for m, s in series.items() if m.startswith("feedback:")},
        }

    k = max(1, len(names) - 1)
    metrics: dict[str, dict] = {}
    for metric, (values, owner, proportion) in series.items():
        per_variant = {}
        base = values[owner == control]
        for name in names[1:]:
            other = values[owner == name]
            if proportion:
                comparison = compare_proportions(int(base.sum()), base.size, int(other.sum()), other.size,
                                                 config.alpha)
            else:
                comparison = compare_means(Summary.of(base), Summary.of(other), config.alpha)
            pair = (owner == control) | (owner == name)
            sequential = always_valid_p(values[pair], owner[pair] == name, proportion=proportion)
            entry: dict[str, Any] = {"n_control": int(base.size), "n_variant": int(other.size),
                                     **(comparison.as_dict() if comparison is not None else {}),
                                     "always_valid_p": float(sequential[-1]) if sequential.size else 1.0}
            entry["significant"] = bool(entry["always_valid_p"] <= config.alpha / k
                                        and min(base.size, other.size) >= config.min_samples)
            per_variant[name] = entry
        metrics[metric] = per_variant
    winner, reason = _winner(config, metrics.get(config.primary_metric, {}), control)
    return {"experiment": config.name, "status": config.status, "primary_metric": config.primary_metric,
            "alpha": config.alpha, "min_samples": config.min_samples, "control": control,
            "effect_size": "Hedges' g for means, Cohen's h for proportions (variant minus control)",
            "variants": variants, "metrics": metrics, "winner": winner, "reason": reason}


def _winner(config: ExperimentConfig, primary: dict[str, dict], control: str) -> tuple[str | None, str]:
    lower = config.primary_metric in _LOWER_IS_BETTER
    better = {name: e for name, e in primary.items()
              if e["significant"] and e.get("diff") is not None and (e["diff"] < 0) == lower and e["diff"] != 0}
    if better:
        best = (min if lower else max)(better, key=lambda n: better[n]["variant_mean"])
        return best, f"{best} beats {control} on {config.primary_metric} (always-valid p <= alpha)"
    if primary and all(e["significant"] for e in primary.values()):
        return control, f"{control} beats every variant on {config.primary_metric} (always-valid p <= alpha)"
    return None, (f"no variant differs from {control} on {config.primary_metric} at the sequential test yet, "
                  f"or fewer than {config.min_samples} samples per arm")


# ---- feedback ----

class FeedbackExists(ExperimentConflict):
    code = "feedback_exists"


class Feedback(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/feedback: a score for the answer with this `id`, under a metric name."""

    id: Annotated[str, Meta(min_length=1, max_length=128)]
    score: float
    metric: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


def decode_feedback(data: bytes) -> Feedback:
    try:
        feedback = msgspec.json.decode(data, type=Feedback)
    except msgspec.ValidationError as exc:
        where = str(exc).rsplit("at `$.", 1)
        raise BadRequest(f"Invalid feedback: {exc}", param=where[1].rstrip("`") if len(where) == 2 else None) from exc
    except msgspec.DecodeError as exc:
        raise BadRequest(f"Invalid JSON body: {exc}") from exc
    if not math.isfinite(feedback.score):
        raise BadRequest("score: expected a finite number", param="score")
    return feedback


class AmbiguousAnswer(ExperimentConflict):
    code = "ambiguous_id"


async def _answers(engine: AsyncEngine, answer_id: str, caller: Principal | None) -> list[Sequence[Any]]:
    """The usage rows (at most two, oldest first) that `answer_id` names: those whose answer has that id, else
    (no such answer) those of the request with that id; of the `caller`'s own API key unless it is an admin (or
    None: anyone's). The answer's id is indexed; the request id is looked up only when no answer has the id."""
    u = usage_rows.c
    picked = (u.request_id, u.experiment, u.variant, u.completion_id)
    # another key's answer is no answer for this caller (its score, experiment and arm are not the caller's)
    own = () if caller is None or caller.role == "admin" else (
        u.key_id.is_(None) if caller.key_id is None else u.key_id == caller.key_id,)
    async with engine.connect() as connection:
        rows: list[Sequence[Any]] = []
        if storable(answer_id, u.completion_id):
            rows = list((await connection.execute(
                sa.select(*picked).where(u.completion_id == answer_id, *own).order_by(u.id).limit(2))).all())
        if not rows and storable(answer_id, u.request_id):
            rows = list((await connection.execute(
                sa.select(*picked).where(u.request_id == answer_id, *own).order_by(u.id).limit(2))).all())
    return rows


async def add_feedback(engine: AsyncEngine, feedback: Feedback,
                       flush: Callable[[], Awaitable[None]] | None = None, caller: Principal | None = None) -> dict:
    """Store a score for the request that produced answer `feedback.id`, with that request's experiment arm. A
    `caller` that is not an admin scores only its own API key's answers: another key's is a 404, as unknown.

    `id` is the answer's own id (the upstream's `id` field, handed on unchanged) or the gateway's request id (the
    `x-request-id` header of the answer). An upstream may give several answers the same id (some servers always
    do): such an id names no one answer, and is refused with 409 ambiguous_id rather than scored on whichever
    request came first; the request id names it. Scores are kept per request: one per request and metric.

    Usage rows reach SQL in batches (within the log's flush interval): when the id is not found, `flush` writes
    this replica's queued rows and the lookup runs once more. 404 for an id no request produced, 409 for a second
    score under the same metric (a unique constraint, so replicas cannot both accept one).
    """
    rows = await _answers(engine, feedback.id, caller)
    if not rows and flush is not None:
        with contextlib.suppress(Exception):  # the database is down: the lookup below says 404 or fails itself
            await flush()
        rows = await _answers(engine, feedback.id, caller)
    if not rows:
        raise NotFound(f"No answer with id {feedback.id!r} is known to this gateway.", param="id")
    if len(rows) > 1:
        raise AmbiguousAnswer(f"Several answers have the id {feedback.id!r} (their upstream repeats ids): send the "
                              f"answer's x-request-id header as `id` instead.", param="id")
    request_id, experiment, variant, answer = rows[0]
    f = feedback_table.c
    try:
        async with engine.begin() as connection:
            # the key is the request (feedback.completion_id holds its request id); a score stored under the
            # answer's own id, as before, counts too
            keys = {request_id} if answer is None else {request_id, answer}
            given = (await connection.execute(sa.select(f.id).where(
                f.completion_id.in_(keys), f.metric == feedback.metric, f.request_id == request_id).limit(1))).first()
            if given is not None:
                raise FeedbackExists(f"Answer {feedback.id!r} already has a {feedback.metric!r} score.",
                                     param="metric")
            await connection.execute(feedback_table.insert().values(
                completion_id=request_id, metric=feedback.metric, score=feedback.score, request_id=request_id,
                experiment=experiment, variant=variant, created_at=_now()))
    except sa.exc.IntegrityError as exc:
        raise FeedbackExists(f"Answer {feedback.id!r} already has a {feedback.metric!r} score.",
                             param="metric") from exc
    return {"object": "feedback", "id": feedback.id, "metric": feedback.metric, "score": feedback.score,
            "request_id": request_id, "experiment": experiment, "variant": variant}
