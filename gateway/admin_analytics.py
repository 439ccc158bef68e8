"""The admin API of usage: analytics, spend forecasts, cheaper-model advice, the usage rows and budgets now."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from litestar import Request, Router, get
from litestar.params import FromQuery
from sqlalchemy.ext.asyncio import AsyncEngine

from config.schema import Pricing
from gateway.service import Gateway
from gateway.storage import Storage
from policies.analytics import BUCKETS, GROUPS, budget_usage, forecast, iso, recommend, summarize, usage_page
from policies.database import checked, usage_rows
from protocol.errors import BadRequest, ServiceUnavailable
from protocol.openai import MAX_COUNT

__all__ = ["analytics_router", "parse_time"]

log = logging.getLogger("pointsman.admin")
_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_PAGE, _MAX_PAGE = 100, 1000
QueryText = FromQuery[str | None]  # every query parameter is read as text and checked here, to name it in a 400
_NEUTRAL = 0.5  # a task a model's `capabilities` leave out scores this in routing (routing/scoring.py)


def parse_time(value: str | None, param: str, now: datetime) -> datetime | None:
    """ISO 8601 (a time without an offset is UTC), `now`, or relative to now: -30s, -15m, -24h, -7d, -2w; None
    when not given. A BadRequest naming `param` otherwise."""
    if value is None or value == "":
        return None
    if value == "now":
        return now
    try:
        if (relative := _RELATIVE.match(value)) is not None:
            return now - timedelta(**{_UNITS[relative[2]]: float(relative[1])})
        try:  # a '+' in a query string arrives as a space
            parsed = datetime.fromisoformat(value.replace(" ", "+") if "T" in value else value)
        except ValueError:
            raise BadRequest(f"Invalid time for '{param}': {value!r}; use ISO 8601 (2026-01-05T10:00:00Z) or a "
                             "relative time (-15m, -24h, -7d).", param=param) from None
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        parsed.astimezone(UTC)  # the database compares in UTC: a time outside years 1-9999 there is refused here
        return parsed
    except OverflowError:
        raise BadRequest(f"Invalid time for '{param}': {value!r} is out of range (years 1 to 9999, UTC).",
                         param=param) from None


def _window(since: str | None, until: str | None) -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    start = parse_time(since, "since", now) or now - timedelta(hours=24)
    end = parse_time(until, "until", now) or now
    _check_window(start, end)
    return start, end


def _check_window(start: datetime, end: datetime) -> None:
    if start >= end:
        raise BadRequest(f"'since' ({iso(start)}) must be before 'until' ({iso(end)}).", param="since")


def _choice(value: str | None, param: str, allowed: tuple[str, ...] | dict) -> str | None:
    if value is None or value == "":
        return None
    if value not in allowed:
        raise BadRequest(f"Invalid value for '{param}': {value!r}; use one of {', '.join(allowed)}.", param=param)
    return value


def _int(value: str | None, param: str, low: int, high: int | None = None) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if number < low or (high is not None and number > high):
        raise BadRequest(f"Invalid value for '{param}': {value!r}; use a whole number from {low}"
                         + (f" to {high}." if high is not None else " up."), param=param)
    return number


def _engine(request: Request) -> AsyncEngine:
    engine = request.app.state.storage.engine
    if engine is None:
        raise BadRequest("Analytics need a database: set storage.database_url.")
    return engine


async def _flushed(storage: Storage) -> None:
    """Write this replica's queued usage rows first, so that the answer counts them."""
    if storage.usage is None:
        return
    try:
        await storage.usage.flush()
    except Exception as exc:  # the database is down: the query that follows says so
        log.debug("analytics: flushing the usage log failed: %s", exc)


async def _query(storage: Storage, run: Callable[[], Any]) -> Any:
    """Run an analytics query after a flush; a database that cannot be reached is a 503, never a 500."""
    await _flushed(storage)
    try:
        return await run()
    except (OSError, sa.exc.SQLAlchemyError) as exc:
        raise ServiceUnavailable(f"The usage database cannot be queried: {type(exc).__name__}; try again "
                                 "shortly.") from exc


def _capability(gateway: Gateway) -> Callable[[str, str], float]:
    """What automatic routing scores a model for a task (its `capabilities` entry), by the gateway's models now."""

    def capability_of(model_id: str, task: str) -> float:
        model = gateway.models.get(model_id) or gateway.models.get(model_id.partition("@")[0])
        return _NEUTRAL if model is None else model.capabilities.get(task, _NEUTRAL)

    return capability_of


def _served_pricing(gateway: Gateway) -> dict[str, Pricing | None]:
    """Each chat model id with the pricing it is served at now: its production version's where it has one (a
    version may override the pricing), else its own."""
    priced: dict[str, Pricing | None] = {}
    for model in gateway.config.models:
        if model.backend_kind == "embeddings":
            continue
        versions = gateway.table.versions.get(model.id)
        serving = None if versions is None or versions.serving is None else versions.configs.get(versions.serving)
        priced[model.id] = (serving or model).known_pricing
    return priced


def _budgets(storage: Storage) -> list:
    # the budgets in force: those the policy started with (a reload does not apply policies), none without it
    return list(storage.budgets.budgets) if storage.budgets is not None else []


def analytics_router(read_guard: Callable[..., Any], admin_guard: Callable[..., Any], middleware: list) -> Router:
    """Mounted at /admin: the aggregates behind `read_guard` (admin and readonly roles), the rows themselves
    behind `admin_guard`."""

    @get("/analytics", guards=[read_guard],
         summary="Requests, errors, tokens, cost, latency and cache hits over a window, grouped and bucketed")
    async def analytics(request: Request, since: QueryText = None, until: QueryText = None,
                        group_by: QueryText = None, bucket: QueryText = None) -> dict:
        engine = _engine(request)
        start, end = _window(since, until)
        grouping = _choice(group_by, "group_by", GROUPS)
        buckets = _choice(bucket, "bucket", BUCKETS)
        return await _query(request.app.state.storage, lambda: summarize(
            engine, since=start, until=end, group_by=grouping, bucket=buckets))

    @get("/analytics/forecast", guards=[read_guard],
         summary="Each budget member's spend rate this period, the projection at its end, and when it runs out")
    async def spend_forecast(request: Request) -> dict:
        storage: Storage = request.app.state.storage
        budgets = _budgets(storage)
        data = await _query(storage, lambda: forecast(storage.engine, budgets, storage.budgets, datetime.now(UTC)))
        return {"object": "list", "data": data}

    @get("/analytics/recommendations", guards=[read_guard],
         summary="Cheaper models about as capable for each task, with the savings on the window's traffic "
                 "(everyone's, or one team's or key's)")
    async def recommendations(request: Request, since: QueryText = None, until: QueryText = None,
                              min_requests: QueryText = None, team: QueryText = None,
                              key_id: QueryText = None) -> dict:
        engine = _engine(request)
        start, end = _window(since, until)
        least = _int(min_requests, "min_requests", 1)
        u = usage_rows.c  # text no row can hold is a 400, not a query the database refuses
        teamed, keyed = checked(team or None, u.team, "team"), checked(key_id or None, u.key_id, "key_id")
        gateway: Gateway = request.app.state.gateway
        data = await _query(request.app.state.storage, lambda: recommend(
            engine, _served_pricing(gateway), _capability(gateway), start, end,
            min_requests=least, team=teamed, key_id=keyed))
        return {"object": "list", "data": data}

    @get("/usage", guards=[admin_guard], summary="The usage rows, newest first, a page at a time (after_id)")
    async def usage(request: Request, since: QueryText = None, until: QueryText = None,
                    key_id: QueryText = None, team: QueryText = None, model: QueryText = None,
                    limit: QueryText = None, after_id: QueryText = None) -> dict:
        engine = _engine(request)
        now = datetime.now(UTC)
        start, end = parse_time(since, "since", now), parse_time(until, "until", now)
        if start is not None and end is not None:  # as /admin/analytics: an empty window is a 400, not no rows
            _check_window(start, end)
        size = _int(limit, "limit", 1, _MAX_PAGE) or _PAGE
        after = _int(after_id, "after_id", 1, MAX_COUNT)  # a database integer: 64 bits
        u = usage_rows.c  # text no row can hold is a 400, not a query the database refuses
        keyed, teamed = checked(key_id or None, u.key_id, "key_id"), checked(team or None, u.team, "team")
        modeled = checked(model or None, u.model_requested, "model")
        return await _query(request.app.state.storage, lambda: usage_page(
            engine, since=start, until=end, key_id=keyed, team=teamed, model=modeled, limit=size, after_id=after))

    @get("/budgets", guards=[read_guard], summary="Each budget with every member's used and remaining amounts now")
    async def budgets(request: Request) -> dict:
        storage: Storage = request.app.state.storage
        configured = _budgets(storage)
        data = await _query(storage, lambda: budget_usage(storage.engine, configured, storage.budgets,
                                                          datetime.now(UTC)))
        return {"object": "list", "data": data}

    return Router(path="/admin", route_handlers=[analytics, spend_forecast, recommendations, usage, budgets],
                  middleware=middleware)
