"""Usage analytics over the usage rows: totals, groups and time series, budget forecasts, cheaper-model advice."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from config.schema import BudgetConfig, Pricing
from policies.budget import BudgetPolicy, period_window, reset_iso, settled_key
from policies.database import usage_rows
from policies.state import StoreUnavailable

__all__ = ["BUCKETS", "CACHE_HITS", "GROUPS", "MIN_REQUESTS", "SAMPLE_ROWS", "budget_usage", "forecast", "iso",
           "recommend", "summarize", "usage_page"]

u = usage_rows.c
CACHE_HITS = ("hit", "semantic-hit")  # what policies/cache.py and semantic_cache.py write for an answer from cache
# group_by name -> the column (or expression) grouped on; a model is the one that served, else the one asked for
GROUPS: dict[str, Any] = {
    "model": sa.func.coalesce(u.model_served, u.model_requested),
    "task": u.task, "team": u.team, "route": u.route, "key": u.key_id, "user": u.user, "status": u.status,
}
BUCKETS = ("minute", "hour", "day")
MIN_REQUESTS = 10  # a (task, model) with fewer answered requests in the window is too little to advise on
SAMPLE_ROWS = 50_000  # percentiles come from at most the latest this many rows of the window (memory stays bounded)
# the live counter and the usage rows add the same costs in another order (and Redis in long double): sums that
# differ only in their last digits are the same use
_SAME = 1e-9
_SQLITE_BUCKETS = {"minute": "%Y-%m-%d %H:%M:00", "hour": "%Y-%m-%d %H:00:00", "day": "%Y-%m-%d 00:00:00"}
_MODEL = GROUPS["model"]


def iso(value: datetime) -> str:
    """A UTC time as ISO 8601 with a Z ("2026-11-26T10:00:00Z")."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _utc(value: Any) -> datetime:
    """A bucket as the database gave it (SQLite: text, PostgreSQL: a naive UTC timestamp) as an aware datetime."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _bucket(dialect: str, bucket: str) -> Any:
    """The start of each row's UTC minute, hour or day, computed by the database, so that GROUP BY can use it."""
    # literals, not bound parameters: PostgreSQL matches a GROUP BY expression to the selected one only when the
    # two are written alike, and each bound parameter gets a number of its own ($1, $2, ...)
    if dialect == "postgresql":  # date_trunc on a timestamptz truncates in the session's time zone: go to UTC first
        return sa.func.date_trunc(sa.literal_column(f"'{bucket}'"),
                                  sa.func.timezone(sa.literal_column("'UTC'"), u.created_at))
    if dialect == "sqlite":  # stored as naive UTC text, which strftime reads
        return sa.func.strftime(sa.literal_column(f"'{_SQLITE_BUCKETS[bucket]}'"), u.created_at)
    raise ValueError(f"analytics: no time buckets for the {dialect} dialect")


def _is_hit() -> Any:
    return u.cache.in_(CACHE_HITS)


_AGGREGATES = (
    sa.func.count().label("requests"),
    sa.func.sum(sa.case((u.status == "error", 1), else_=0)).label("errors"),
    sa.func.sum(u.prompt_tokens).label("prompt_tokens"),
    sa.func.sum(u.completion_tokens).label("completion_tokens"),
    sa.func.sum(u.cost_usd).label("cost_usd"),
    sa.func.avg(u.latency_ms).label("latency_ms_avg"),
    sa.func.avg(u.ttft_ms).label("ttft_ms_avg"),
    sa.func.sum(sa.case((_is_hit(), 1), else_=0)).label("cache_hits"),
)


def _metrics(row: Any, latencies: list[float] | None) -> dict[str, Any]:
    requests = int(row.requests or 0)
    hits = int(row.cache_hits or 0)
    return {
        "requests": requests,
        "errors": int(row.errors or 0),
        "prompt_tokens": int(row.prompt_tokens or 0),
        "completion_tokens": int(row.completion_tokens or 0),
        "cost_usd": float(row.cost_usd or 0.0),
        "latency_ms_avg": None if row.latency_ms_avg is None else float(row.latency_ms_avg),
        "latency_ms_p50": _percentile(latencies, 50),
        "latency_ms_p95": _percentile(latencies, 95),
        "ttft_ms_avg": None if row.ttft_ms_avg is None else float(row.ttft_ms_avg),
        "cache_hits": hits,
        "cache_hit_rate": hits / requests if requests else None,
    }


def _percentile(values: list[float] | None, q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default); `values` sorted."""
    if not values:
        return None
    position = (len(values) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


@dataclass(slots=True)
class _Sample:
    """Latencies of the latest rows of the window, sorted, for the whole window, each group and each bucket."""

    total: list[float] = field(default_factory=list)
    groups: dict[Any, list[float]] = field(default_factory=dict)
    series: dict[tuple[Any, Any], list[float]] = field(default_factory=dict)

    @classmethod
    def of(cls, rows: Sequence[Any]) -> _Sample:
        sample = cls()
        for latency, key, bucket in rows:
            sample.total.append(latency)
            sample.groups.setdefault(key, []).append(latency)
            sample.series.setdefault((bucket, key), []).append(latency)
        sample.total.sort()
        for values in (*sample.groups.values(), *sample.series.values()):
            values.sort()
        return sample


async def summarize(engine: AsyncEngine, *, since: datetime, until: datetime, group_by: str | None,
                    bucket: str | None) -> dict:
    """Requests, errors, tokens, cost, latency (average, p50, p95), TTFT and cache hits over [since, until), in
    total, per `group_by` value and per `bucket` (and value); and the requests per route and model.

    Sums and averages are computed by the database over every row of the window; the percentiles from the latest
    SAMPLE_ROWS rows that have a latency (`sampled` says when there were more).
    """
    if group_by is not None and group_by not in GROUPS:
        raise ValueError(f"group_by must be one of {', '.join(GROUPS)}")
    if bucket is not None and bucket not in BUCKETS:
        raise ValueError(f"bucket must be one of {', '.join(BUCKETS)}")
    window = (u.created_at >= since, u.created_at < until)
    key = GROUPS[group_by] if group_by else sa.null()
    at = _bucket(engine.dialect.name, bucket) if bucket else sa.null()
    async with engine.connect() as connection:
        totals = (await connection.execute(sa.select(*_AGGREGATES).where(*window))).one()
        groups = [] if group_by is None else (await connection.execute(
            sa.select(key.label("key"), *_AGGREGATES).where(*window).group_by(key))).all()
        series = [] if bucket is None else (await connection.execute(
            sa.select(at.label("bucket"), key.label("key"), *_AGGREGATES).where(*window)
            .group_by(at, *([key] if group_by else [])))).all()
        routes = (await connection.execute(
            sa.select(u.route, _MODEL.label("model"), sa.func.count().label("requests")).where(*window)
            .group_by(u.route, _MODEL))).all()
        sampled = (await connection.execute(
            sa.select(u.latency_ms, key, at).where(*window, u.latency_ms.is_not(None))
            .order_by(u.created_at.desc(), u.id.desc()).limit(SAMPLE_ROWS + 1))).all()
    capped = len(sampled) > SAMPLE_ROWS
    sample = await asyncio.to_thread(_Sample.of, sampled[:SAMPLE_ROWS])  # sorting 50,000 floats: off the loop
    by_bucket = [(_utc(r.bucket), r) for r in series]
    by_bucket.sort(key=lambda item: (item[0], item[1].key is None, item[1].key or ""))  # None last
    return {
        "object": "analytics",
        "since": iso(since),
        "until": iso(until),
        "group_by": group_by,
        "bucket": bucket,
        "sampled": capped,
        "totals": _metrics(totals, sample.total),
        "groups": sorted(({"key": r.key, **_metrics(r, sample.groups.get(r.key))} for r in groups),
                         key=lambda g: (-g["requests"], g["key"] is None, g["key"] or "")),
        "series": [{"bucket": iso(when), "key": r.key, **_metrics(r, sample.series.get((r.bucket, r.key)))}
                   for when, r in by_bucket],
        "routes": sorted(({"route": r.route, "model": r.model, "requests": int(r.requests)} for r in routes),
                         key=lambda r: (-r["requests"], r["route"] is None, r["route"] or "", r["model"] is None,
                                        r["model"] or "")),
    }


async def usage_page(engine: AsyncEngine, *, since: datetime | None = None, until: datetime | None = None,
                     key_id: str | None = None, team: str | None = None, model: str | None = None,
                     limit: int = 100, after_id: int | None = None) -> dict:
    """The usage rows themselves, newest first, `limit` at a time: the next page starts after `last_id` (rows
    with a smaller id). `model` matches the model served or the one asked for."""
    query = sa.select(usage_rows).order_by(u.id.desc()).limit(limit + 1)
    if since is not None:
        query = query.where(u.created_at >= since)
    if until is not None:
        query = query.where(u.created_at < until)
    if after_id is not None:
        query = query.where(u.id < after_id)
    if key_id is not None:
        query = query.where(u.key_id == key_id)
    if team is not None:
        query = query.where(u.team == team)
    if model is not None:
        query = query.where(sa.or_(u.model_served == model, u.model_requested == model))
    async with engine.connect() as connection:
        rows = [{**row, "created_at": iso(row["created_at"])} for row in (await connection.execute(query)).mappings()]
    page = rows[:limit]
    return {"object": "list", "data": page, "has_more": len(rows) > limit, "last_id": page[-1]["id"] if page else None}


# ---- budgets: what each member used this period, and where that is heading


@dataclass(slots=True)
class _Used:
    """One member's usage of one budget in its current period, from the usage rows (cache hits cost nothing)."""

    tokens: float = 0.0
    usd: float = 0.0
    first: datetime | None = None  # its first row in the period

    def add(self, tokens: float, usd: float, first: datetime | None) -> None:
        self.tokens += tokens
        self.usd += usd
        if first is not None and (self.first is None or first < self.first):
            self.first = first


# (a literal, not a bound parameter: see _bucket)
_MEMBER_COLUMNS: dict[str, Any] = {"key": sa.func.coalesce(u.key_id, sa.literal_column("'anonymous'")),
                                   "user": u.user, "team": u.team, "model": u.model_served}


async def _members(engine: AsyncEngine | None, budget: BudgetConfig, start: int, end: int | None
                   ) -> dict[str, _Used]:
    """The budget's members with usage rows in the period (a `match` budget: its one member; global: "*"), each
    with what the rows say it used; without a database only the members known without rows."""
    fixed = "*" if budget.scope == "global" else budget.match
    members: dict[str, _Used] = {} if fixed is None else {fixed: _Used()}
    if engine is None:
        return members
    column = None if budget.scope == "global" else _MEMBER_COLUMNS[budget.scope]
    charged = sa.or_(u.cache.is_(None), u.cache.not_in(CACHE_HITS))
    tokens = sa.case((charged, sa.func.coalesce(u.prompt_tokens, 0) + sa.func.coalesce(u.completion_tokens, 0)),
                     else_=0)
    usd = sa.case((charged, sa.func.coalesce(u.cost_usd, 0.0)), else_=0.0)
    query = sa.select(sa.func.sum(tokens), sa.func.sum(usd), sa.func.min(u.created_at),
                      *([] if column is None else [column]))
    query = query.where(u.created_at >= datetime.fromtimestamp(start, UTC))
    if end is not None:
        query = query.where(u.created_at < datetime.fromtimestamp(end, UTC))
    if column is not None:
        query = query.where(column.is_not(None)).group_by(column)
        if budget.match is not None:  # a model budget counts every version of the model (id@1.2.0)
            query = query.where(sa.or_(column == budget.match, column.startswith(budget.match + "@", autoescape=True))
                                if budget.scope == "model" else column == budget.match)
    async with engine.connect() as connection:
        rows = (await connection.execute(query)).all()
    for row in rows:
        if row[2] is None:  # global with no rows in the period
            continue
        member = "*" if column is None else str(row[3])
        if budget.scope == "model":
            member = member.partition("@")[0]
        members.setdefault(member, _Used()).add(float(row[0] or 0), float(row[1] or 0), _utc(row[2]))
    return members


@dataclass(slots=True)
class _Member:
    member: str
    used: dict[str, float]  # kind (tokens, usd) -> used this period
    first: datetime | None
    source: str  # store (the live counters) | usage_rows


@dataclass(slots=True)
class _BudgetNow:
    index: int
    budget: BudgetConfig
    start: int
    end: int | None
    limits: dict[str, float]
    members: list[_Member]


async def _budgets_now(engine: AsyncEngine | None, budgets: Sequence[BudgetConfig], policy: BudgetPolicy | None,
                       now: datetime) -> list[_BudgetNow]:
    """Each budget's members this period with what they used: the larger of the usage rows and the live counter of
    settled use where the budget policy's store answers (the worst case reserved by requests in flight is not
    use). The counter is ahead of the rows by what is not yet written; the rows are ahead of a counter the store
    lost (an in-process store after a restart, Redis without persistence)."""
    live = policy is not None and tuple(policy.budgets) == tuple(budgets)  # counters are keyed by budget index
    out: list[_BudgetNow] = []
    for index, budget in enumerate(budgets):
        start, end = period_window(budget.period, now.timestamp())
        limits = {kind: float(limit) for kind, limit in (("tokens", budget.max_tokens), ("usd", budget.max_cost_usd))
                  if limit is not None}
        members: list[_Member] = []
        for member, rows in sorted((await _members(engine, budget, start, end)).items()):
            used = {"tokens": rows.tokens, "usd": rows.usd}
            source = "usage_rows"
            if live and policy is not None:
                try:
                    counted = {kind: await policy.store.counter(settled_key(index, member, kind, start))
                               for kind in limits}
                except StoreUnavailable:
                    pass
                else:
                    if all(counted[kind] >= used[kind] or math.isclose(counted[kind], used[kind], rel_tol=_SAME)
                           for kind in limits):
                        source = "store"
                        used.update(counted)
                    else:
                        used.update({kind: max(value, used[kind]) for kind, value in counted.items()})
            members.append(_Member(member, {k: used[k] for k in limits}, rows.first, source))
        out.append(_BudgetNow(index, budget, start, end, limits, members))
    return out


def _describe(state: _BudgetNow) -> dict[str, Any]:
    budget = state.budget
    return {"budget": state.index, "scope": budget.scope, "match": budget.match, "period": budget.period,
            "period_start": iso(datetime.fromtimestamp(state.start, UTC)), "resets_at": reset_iso(state.end)}


async def budget_usage(engine: AsyncEngine | None, budgets: Sequence[BudgetConfig], budget_policy: BudgetPolicy | None,
                       now: datetime) -> list[dict]:
    """Each budget with every member seen this period: its limits, and each member's used and remaining amounts
    (as BudgetPolicy.remaining reports them for one caller)."""
    result = []
    for state in await _budgets_now(engine, budgets, budget_policy, now):
        members = []
        for m in state.members:
            row: dict[str, Any] = {"member": m.member, "source": m.source}
            for kind, limit in state.limits.items():
                row[f"used_{kind}"] = m.used[kind]
                row[f"remaining_{kind}"] = max(0.0, limit - m.used[kind])
            members.append(row)
        result.append({**_describe(state), **{f"limit_{k}": v for k, v in state.limits.items()}, "members": members})
    return result


async def forecast(engine: AsyncEngine | None, budgets: Sequence[BudgetConfig], budget_policy: BudgetPolicy | None,
                   now: datetime) -> list[dict]:
    """For each budget, member active this period and limit (tokens, USD): what is used, the rate so far (per hour
    since the period started), the projection at the period's end at that rate, and `alert` with `runs_out_at`
    when the projection passes the limit before the period ends (or the limit is spent already).

    A `total` budget never ends: its rate runs from the member's first row, `projected` is None, `runs_out_at`
    says when the limit would be spent at that rate, and it alerts only once the limit is spent.
    """
    clock = now.timestamp()
    result = []
    for state in await _budgets_now(engine, budgets, budget_policy, now):
        for m in state.members:
            for kind, limit in state.limits.items():
                used = m.used[kind]
                began = state.start if state.end is not None else (m.first.timestamp() if m.first else None)
                rate = used / max(clock - began, 1.0) if began is not None else None  # per second
                projected = None if state.end is None or rate is None else used + rate * (state.end - clock)
                runs_out = None
                if used >= limit:
                    runs_out = clock
                elif rate:
                    runs_out = clock + (limit - used) / rate
                alert = used >= limit or (projected is not None and projected > limit)
                # a period's run-out only when it comes before the period ends (the alert); a total's whenever known
                shown = runs_out if alert or state.end is None else None
                result.append({
                    **_describe(state), "member": m.member, "kind": kind, "limit": limit, "used": used,
                    "remaining": max(0.0, limit - used), "rate_per_hour": None if rate is None else rate * 3600,
                    "projected": projected, "alert": alert,
                    "runs_out_at": iso(datetime.fromtimestamp(round(shown), UTC)) if shown else None,
                    "source": m.source,
                })
    return result


# ---- recommendations: the same traffic on a cheaper model that is about as capable


async def recommend(engine: AsyncEngine, candidates: Mapping[str, Pricing | None],
                    capability_of: Callable[[str, str], float], since: datetime, until: datetime, *,
                    tolerance: float = 0.05, min_requests: int | None = None, team: str | None = None,
                    key_id: str | None = None) -> list[dict]:
    """For each (task, served model) with at least `min_requests` (None: MIN_REQUESTS, 10) answered requests in
    [since, until), of one `team` or API key (`key_id`) when given (else everyone's), so that advice never rests
    on a handful of requests: the model
    of `candidates` (model id -> the pricing that id is served at now, None: unknown) that would have cost least
    for the same tokens, among those whose capability for the task (as `capability_of(model_id, task)` scores it
    for automatic routing) is at most `tolerance` below the current one's; only where it saves money. Requests
    without a task (manual routes) and cache hits are not counted; the current cost is what the rows were billed.
    Largest savings first."""
    charged = sa.or_(u.cache.is_(None), u.cache.not_in(CACHE_HITS))
    whose = [*([u.team == team] if team is not None else []), *([u.key_id == key_id] if key_id is not None else [])]
    query = (sa.select(u.task, u.model_served, sa.func.count(), sa.func.sum(u.prompt_tokens),
                       sa.func.sum(u.completion_tokens), sa.func.sum(u.cost_usd))
             .where(u.created_at >= since, u.created_at < until, u.status == "ok", u.task.is_not(None),
                    u.model_served.is_not(None), charged, *whose)
             .group_by(u.task, u.model_served))
    async with engine.connect() as connection:
        traffic = (await connection.execute(query)).all()
    least = MIN_REQUESTS if min_requests is None else min_requests
    priced = list(candidates.items())
    advice = []
    for task, model, requests, prompt, completion, cost in traffic:
        prompt, completion, current = int(prompt or 0), int(completion or 0), float(cost or 0.0)
        if current <= 0 or requests < least:
            continue
        base = model.partition("@")[0]
        have = capability_of(model, task)
        best: dict[str, Any] | None = None
        for candidate, price in priced:
            if candidate == base or price is None:
                continue
            score = capability_of(candidate, task)
            if score < have - tolerance - 1e-9:
                continue
            projected = (prompt * price.input_per_mtok + completion * price.output_per_mtok) / 1e6
            savings = current - projected
            if savings > 0 and (best is None or (savings, score) > (best["savings_usd"], best["to_capability"])):
                best = {"task": task, "from_model": model, "to_model": candidate, "requests": int(requests),
                        "prompt_tokens": prompt, "completion_tokens": completion, "current_cost_usd": current,
                        "projected_cost_usd": projected, "savings_usd": savings, "savings_pct": 100 * savings / current,
                        "from_capability": have, "to_capability": score}
        if best is not None:
            advice.append(best)
    advice.sort(key=lambda a: (-a["savings_usd"], a["task"], a["from_model"]))
    return advice
