"""The budget policy: tokens and USD per calendar period per scope member, reserved at the worst case up front."""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from config.schema import BudgetConfig, ModelConfig, Period, TransformersModel
from policies.alerts import BudgetAlerts
from policies.api_keys import principal_of_row
from policies.base import COMPLETIONS, STAGES, no_op
from policies.context import Outcome, Reply, RequestContext, embedding_tokens, scope_member
from policies.database import api_keys
from policies.state import Reservation, StateStore, StoreUnavailable
from policies.usage_log import charged_usage
from protocol.errors import BudgetExceeded, ServiceUnavailable
from protocol.openai import ChatCompletionRequest, ParsedEmbeddings, ParsedRequest, message_text

__all__ = ["DEFAULT_NEW_TOKENS", "BudgetPolicy", "counter_key", "estimate_prompt_tokens", "period_window", "reset_iso",
           "settled_key", "worst_case_tokens"]

log = logging.getLogger("pointsman.policies")

DEFAULT_NEW_TOKENS = 256  # what a request without max_tokens may generate, for a model that states no default
_SLACK_S = 60.0  # a counter outlives its period by this much, so that a late settle still finds it
_UNBOUNDED = sys.float_info.max  # a limit that any amount fits: charges what was served, unconditionally
_PERIOD_S = {"minute": 60, "hour": 3600, "day": 86400}
_SEED_TIMEOUT_S = 30.0  # seeding the counters from the usage rows delays startup at most this long
Kind = Literal["tokens", "usd"]


def period_window(period: Period, now: float) -> tuple[int, int | None]:
    """The calendar period (UTC) that `now` falls in: (start, end) in epoch seconds; `total` is (0, None)."""
    if period == "total":
        return 0, None
    if period == "month":
        day = datetime.fromtimestamp(now, UTC)
        start = datetime(day.year, day.month, 1, tzinfo=UTC)
        end = datetime(day.year + day.month // 12, day.month % 12 + 1, 1, tzinfo=UTC)
        return int(start.timestamp()), int(end.timestamp())
    size = _PERIOD_S[period]
    start = int(now // size) * size
    return start, start + size


def reset_iso(end: float | None) -> str:
    """When a period ends, as ISO 8601 UTC ("2024-05-02T00:00:00Z"), or "never" for a `total` budget."""
    if end is None:
        return "never"
    return datetime.fromtimestamp(end, UTC).isoformat().replace("+00:00", "Z")


def estimate_prompt_tokens(request: ParsedRequest) -> int:
    """The prompt at 4 characters a token: each message's text plus 4 tokens of chat framing per message; for
    a completion, its prompt text (token ids count one each)."""
    body = request.body
    if isinstance(body, ChatCompletionRequest):
        tokens = 0
        for message in body.messages:  # a loop, not sum() over a generator: this runs on every request
            tokens += len(message_text(message.content)) // 4 + 4
        return tokens
    if isinstance(body.prompt, str):
        return len(body.prompt) // 4
    return sum(len(p) // 4 if isinstance(p, str) else 1 if isinstance(p, int) else len(p) for p in body.prompt)


def worst_case_tokens(request: ParsedRequest | ParsedEmbeddings, model: ModelConfig) -> tuple[int, int]:
    """(prompt, completion) tokens a request may cost at most on `model`: the estimated prompt, and its
    `max_tokens` (or `max_completion_tokens`) for each choice (`n`, or `best_of` for a completion). Without a
    limit a transformers model generates its `max_new_tokens_default`; any other model is assumed to stop
    within DEFAULT_NEW_TOKENS (256), which an upstream's own default may exceed: settle then charges the rest.
    An embeddings request generates nothing: its input is all it costs."""
    if isinstance(request, ParsedEmbeddings):
        return embedding_tokens(request), 0
    body = request.body
    new = request.max_new_tokens
    if new is None:
        new = model.max_new_tokens_default if isinstance(model, TransformersModel) else DEFAULT_NEW_TOKENS
    choices = body.n if isinstance(body, ChatCompletionRequest) else max(body.n, body.best_of or 1)
    return estimate_prompt_tokens(request), new * choices


@dataclass(slots=True)  # not frozen: built on every request, and frozen ones cost 4x to build
class _Counter:
    """One counter a request is charged to: `kind` of budget number `index`, for one member in one period."""

    index: int | str  # the config's budget number, or "key" for an API key's own budget
    budget: BudgetConfig
    member: str
    kind: Kind
    key: str  # what is used plus what requests in flight reserved: what approve checks against the limit
    settled: str  # what settled requests used, nothing reserved: what alerts and forecasts read
    limit: float
    start: int  # when its period started (epoch seconds; 0 for `total`)
    end: int | None  # when its period ends (epoch seconds); None: never
    alert_from: float = math.inf  # the usage at its budget's lowest alert threshold: below it, nothing to check

    def describe(self) -> str:
        who = "global budget" if self.budget.scope == "global" else f"{self.budget.scope} budget {self.member!r}"
        per = "in total" if self.budget.period == "total" else f"per {self.budget.period}"
        return f"{who} of {_amount(self.kind, self.limit)} {per}"


@dataclass(slots=True)
class _Reserved:
    """What approve reserved, kept in ctx.state["budget"] so that settle adjusts exactly those counters."""

    model: str
    counters: tuple[_Counter, ...]
    amounts: tuple[float, ...]


class BudgetPolicy:
    """Tokens and/or USD per calendar period (UTC minute, hour, day, month, or `total`, which never resets), each
    budget per member of its scope (`match`: only that member), one counter per (budget, member, kind, period
    start) in the state store, so that every replica shares it and a new period starts from zero.

    approve reserves the request's worst case (`worst_case_tokens`, priced at the model's rates) before any model
    runs, walking `decision.attempts` in order and making one all-or-nothing `reserve` per attempt across every
    applicable counter; the first attempt that fits is reserved. Since a reservation never lets a counter pass
    its limit, concurrent requests and replicas cannot overspend together: at most the gap between an estimate
    and the actual usage, which settle charges afterwards (a prompt longer than its 4-characters-a-token estimate,
    a remote model that ignores the assumed 256-token default).

    A `model` budget that cannot cover an attempt removes that attempt from the decision and records why in
    `decision.skipped`, so neither a fallback nor automatic routing goes to a model whose budget is spent; later
    fallbacks whose model budgets are already spent are removed as well. Any other budget that cannot cover the
    request, or no attempt left, refuses it with BudgetExceeded (429, `retry-after` until the period ends).

    A model with unknown pricing cannot be checked against USD budgets: its requests count as 0 USD (a spent USD
    budget still refuses them), and a warning is logged once per model.

    The reservation is priced at the first model that fits; settle adjusts every reserved counter by the actual
    usage minus the reservation (tokens the context reports, `ctx.cost_usd` at the served model's price; nothing
    for a cache hit or a request that failed before any output) in one `adjust`. When a fallback of another model
    served instead (a version counts as its model), the reserved model's own `model` budgets are refunded and the
    served model's are charged what it used, also when nothing applied to the first attempt.

    Beside each counter a second one (`settled_key`) holds settled use alone: settle adds the actual usage to it in
    the same `adjust` (no round trip more), and makes it, once a period, when that finds none.
    Alerts and forecasts read it, so that another request's worst case in flight is never taken for use.

    A store that cannot be reached refuses requests with a 503 naming the budget under `on_store_error: deny` (the
    default) and lets them through unreserved under `allow` (a warning once per outage). A settle that cannot
    reach the store leaves the worst case counted.

    An API key's own budget (`Principal.budget`, scope `key`) applies beside the config's, as budget "key".

    An in-process store starts empty: `seed`, run once before the gateway serves, starts the current period's
    counters at what the usage rows say settle charged (Redis keeps its counters and needs none).
    """

    __slots__ = ("_counter_cache", "_down", "_model_budgets", "_numbered", "_unpriced", "_usd", "alerts", "budgets",
                 "clock", "store")

    name: ClassVar[str] = "budget"
    stage: ClassVar[int] = STAGES["budget"]
    endpoints: ClassVar[frozenset[str]] = COMPLETIONS | {"embeddings"}

    def __init__(self, budgets: Sequence[BudgetConfig], store: StateStore,
                 clock: Callable[[], float] = time.time, alerts: BudgetAlerts | None = None) -> None:
        self.budgets = tuple(budgets)
        self.store = store
        self.clock = clock
        self.alerts = alerts
        self._down = False  # the store failed and has not answered since: warned once already
        self._unpriced: set[str] = set()  # models already warned about for unknown pricing
        self._usd = any(b.max_cost_usd is not None for b in self.budgets)  # whether unknown pricing matters
        self._model_budgets = any(b.scope == "model" for b in self.budgets)  # (an API key's own is scope key)
        # (budget index, member, period start) -> its counters: the same few are built for request after request
        self._counter_cache: dict[tuple[int | str, str, int], tuple[_Counter, ...]] = {}
        self._numbered: tuple[tuple[int | str, BudgetConfig], ...] = tuple(enumerate(self.budgets))

    @no_op
    async def admit(self, ctx: RequestContext) -> Reply | None:
        return None

    async def approve(self, ctx: RequestContext, decision: Any) -> None:
        if not self.budgets and ctx.principal.budget is None:
            return
        now = self.clock()
        attempts = list(decision.attempts)
        dropped: set[str] = set()
        fallbacks_from = len(attempts)  # set where an attempt is reserved (or needs no reservation)
        last_refusal: BudgetExceeded | None = None
        for position, attempt in enumerate(attempts):
            model: ModelConfig = attempt.model
            if model.id in dropped:
                continue
            counters, amounts = self._charges(ctx, model, now)
            if not counters:
                if self._model_budgets and position + 1 < len(attempts):  # a fallback that serves is charged
                    ctx.state[self.name] = _Reserved(model.id, (), ())
                fallbacks_from = position + 1
                break
            # a fallback may serve instead: the budgets every model shares are reserved at the dearest worst case
            # of the chain from here, so that no fallback spends what was not reserved
            later = [a.model for a in attempts[position + 1:] if a.model.id not in dropped and a.model.id != model.id
                     ] if position + 1 < len(attempts) else None
            covering = self._covering(ctx, counters, amounts, later) if later else amounts
            result = await self._reserve(counters, covering, now)
            if result is not None and not result.ok and covering is not amounts \
                    and counters[result.failed or 0].budget.scope != "model":
                # the fallbacks' worst case does not fit, this model's own may: it serves alone
                result = await self._reserve(counters, amounts, now)
                if result is not None and result.ok and later:
                    for other in later:
                        dropped.add(other.id)
                        decision.skipped[other.id] = "budget: no room left for this fallback's worst case"
                covering = amounts
            if result is None:
                break  # the store is down and every applicable budget allows then: through, unreserved
            if result.ok:
                ctx.state[self.name] = _Reserved(model.id, tuple(counters), tuple(covering))
                fallbacks_from = position + 1
                break
            failed, needed = counters[result.failed or 0], covering[result.failed or 0]
            refusal = _refusal(failed, result.current, needed, now)
            if failed.budget.scope != "model":
                raise refusal
            # non-model counters come first and are checked in order: they all fit, only this model's budget not
            dropped.add(model.id)
            decision.skipped[model.id] = f"budget exceeded: {refusal.message}"
            last_refusal = refusal
        if fallbacks_from < len(attempts):  # the attempt that goes first has fallbacks: their model budgets too
            await self._reserve_fallbacks(ctx, decision, attempts[fallbacks_from:], dropped, now)
        if dropped:
            decision.attempts[:] = [a for a in decision.attempts if a.model.id not in dropped]
        if not decision.attempts and last_refusal is not None:
            raise last_refusal

    async def _reserve(self, counters: Sequence[_Counter], amounts: Sequence[float], now: float) -> Any:
        """Reserve `amounts` on `counters` at once; None when the store cannot be reached and every counter
        allows then (a `deny` budget raises 503)."""
        try:
            result = await self.store.reserve(_reservations(counters, amounts, now))
        except StoreUnavailable as exc:
            self._store_failed(exc)
            denying = next((c for c in counters if c.budget.on_store_error == "deny"), None)
            if denying is not None:
                raise ServiceUnavailable(
                    f"budgets cannot be checked (the state store cannot be reached) and the "
                    f"{denying.describe()} (budget #{denying.index}) refuses requests then "
                    "(on_store_error: deny); try again shortly"
                ) from exc
            return None
        if self._down:
            self._store_answered()
        return result

    def _covering(self, ctx: RequestContext, counters: Sequence[_Counter], amounts: Sequence[float],
                  later: Sequence[ModelConfig]) -> list[float]:
        """`amounts`, but for the counters every model shares (not `model` budgets): the largest worst case of
        this model and the `later` ones."""
        worst = [self._worst_case(ctx, m) for m in later]
        tokens, usd = max(t for t, _ in worst), max(u for _, u in worst)
        return [a if c.budget.scope == "model" else max(a, tokens if c.kind == "tokens" else usd)
                for c, a in zip(counters, amounts, strict=True)]

    async def _reserve_fallbacks(self, ctx: RequestContext, decision: Any, later: Sequence[Any],
                                 dropped: set[str], now: float) -> None:
        """Reserve each later attempt's own `model` budgets for its worst case (settle charges the one that served
        and refunds the rest); one that cannot take it is dropped, with the reason. A store that cannot be reached
        leaves a fallback in, charged in settle if it serves."""
        reserved = ctx.state.get(self.name)
        added: list[tuple[_Counter, float]] = []
        held = {c.key for c in reserved.counters} if isinstance(reserved, _Reserved) else set()
        for attempt in later:
            model = attempt.model
            if model.id in dropped:
                continue
            charges = self._charges(ctx, model, now, models_only=True)
            # a counter reserved already (another version of the same model): once is enough
            kept = [(c, a) for c, a in zip(*charges, strict=True) if c.key not in held]
            if not kept:
                continue
            counters, amounts = [c for c, _ in kept], [a for _, a in kept]
            held.update(c.key for c in counters)
            try:
                result = await self.store.reserve(_reservations(counters, amounts, now))
            except StoreUnavailable as exc:
                self._store_failed(exc)
                continue
            if result.ok:
                added += zip(counters, amounts, strict=True)
            else:
                failed = counters[result.failed or 0]
                dropped.add(model.id)
                decision.skipped[model.id] = (
                    f"budget exceeded: {_refusal(failed, result.current, amounts[result.failed or 0], now).message}")
        if added:
            base = reserved if isinstance(reserved, _Reserved) else _Reserved(later[0].model.id, (), ())
            ctx.state[self.name] = _Reserved(base.model, base.counters + tuple(c for c, _ in added),
                                             base.amounts + tuple(a for _, a in added))

    async def settle(self, ctx: RequestContext, outcome: Outcome) -> None:
        """Adjust what approve reserved to what was actually used; never raises (the response is out)."""
        reserved = ctx.state.get(self.name)
        if not isinstance(reserved, _Reserved):
            return
        try:
            if ctx.cache == "hit":
                tokens, usd = 0.0, 0.0
            else:
                tokens = float((ctx.prompt_tokens or 0) + (ctx.completion_tokens or 0))
                usd = ctx.cost_usd or 0.0
            served = ctx.model
            served_model = None if served is None else served.partition("@")[0]  # a version counts as its model
            deltas: list[tuple[str, float]] = []
            settled: list[tuple[str, float]] = []
            charged: list[tuple[_Counter, float]] = []
            for counter, amount in zip(reserved.counters, reserved.amounts, strict=True):
                actual = tokens if counter.kind == "tokens" else usd
                if counter.budget.scope == "model" and counter.member != served_model:
                    actual = 0.0  # reserved for a model that did not serve
                deltas.append((counter.key, actual - amount))
                settled.append((counter.settled, actual))  # a 0 delta still reads the value for the alerts
                charged.append((counter, actual))
            # one round trip: the reservations become the actual use, and the settled counters grow by it
            used: list[float | None] = list(await self.store.adjust(deltas + settled))[len(deltas):] if deltas else []
            if None in used:  # a settled counter this period has not made yet (adjust makes none): made here, once
                await self._make_settled(charged, used)
            if (served_model is not None and served_model != reserved.model.partition("@")[0] and (tokens or usd)
                    and not any(c.budget.scope == "model" and c.member == served_model for c in reserved.counters)):
                # a fallback whose model budgets were not reserved (the store was down then): charged now
                fallback = await self._charge_fallback(ctx, served, tokens, usd)
                charged += fallback
                used += [None] * len(fallback)
            if self._down:
                self._store_answered()
            if self.alerts is not None and (watched := _watched(charged, used)):
                await self._alert(self.alerts, watched)
        except StoreUnavailable as exc:
            self._store_failed(exc)
        except Exception:
            log.exception("budget: settling request %s failed", ctx.request_id)

    async def _make_settled(self, charged: list[tuple[_Counter, float]], used: list[float | None]) -> None:
        """Add their use to the settled counters `adjust` did not find, making them (they expire with their period);
        their `used` stays None, read back by the alerts. Two requests doing so at once each add their own use."""
        now = self.clock()
        made = [Reservation(c.settled, actual, _UNBOUNDED, None if c.end is None else c.end - now + _SLACK_S)
                for (c, actual), value in zip(charged, used, strict=True)
                if value is None and (c.end is None or c.end - now + _SLACK_S > 0)]  # a period over: no counter
        if made:
            await self.store.reserve(made)

    async def seed(self, engine: AsyncEngine, *, keys: bool = False, timeout_s: float = _SEED_TIMEOUT_S) -> int:
        """Start the current period's counters (both kinds) at what the usage rows say their members were charged
        so far: an in-process store starts empty after a restart. One grouped query per budget (API keys' own
        budgets with `keys`: one per period), run before the gateway serves, since a request charged meanwhile
        would count twice. A database that cannot be read leaves the counters at zero, with one warning. Returns
        how many counters were seeded."""
        try:
            return await asyncio.wait_for(self._seed(engine, keys), timeout_s)
        except Exception as exc:  # the database, its driver, the timeout: the counters stay at zero, as before
            log.warning("budget: counters start at zero: the usage rows could not be read (%s: %s)",
                        type(exc).__name__, exc)
            return 0

    async def _seed(self, engine: AsyncEngine, keys: bool) -> int:
        now = self.clock()
        until = datetime.fromtimestamp(now, UTC)
        budgets: list[tuple[int | str, BudgetConfig]] = list(self._numbered)
        if keys:
            budgets += [("key", budget) for budget in await _key_budgets(engine)]
        charged: dict[tuple[str, str | None, int], dict[str, tuple[float, float]]] = {}
        made: list[Reservation] = []
        alerted: list[tuple[int | str, str, int, str, float, float, BudgetConfig, float | None]] = []
        for index, budget in budgets:
            start, end = period_window(budget.period, now)
            match = None if index == "key" else budget.match  # the keys' own: one query for all of them
            asked = (budget.scope, match, start)
            if asked not in charged:
                charged[asked] = await charged_usage(engine, budget.scope, match,
                                                     datetime.fromtimestamp(start, UTC), until)
            found = charged[asked]
            members = found.items() if index != "key" else [(m, found[m]) for m in (budget.match,) if m in found]
            ttl = None if end is None else end - now + _SLACK_S
            for member, (tokens, usd) in members:
                for kind, limit, used in (("tokens", budget.max_tokens, tokens), ("usd", budget.max_cost_usd, usd)):
                    if limit is not None and used > 0:  # both counters: nothing is reserved before serving
                        made += [Reservation(counter_key(index, member, kind, start), used, _UNBOUNDED, ttl),
                                 Reservation(settled_key(index, member, kind, start), used, _UNBOUNDED, ttl)]
                        alerted.append((index, member, start, kind, used, float(limit), budget, end))
        if made:
            await self.store.reserve(made)
        if self.alerts is not None:  # the thresholds passed before the restart alerted then: not again
            for index, member, start, kind, used, limit, budget, end in alerted:
                await self.alerts.passed(index, member, start, kind, used, limit, budget.alert_at, end)
        log.info("budget: %d counters seeded from the usage rows", len(made) // 2)
        return len(made) // 2

    async def remaining(self, ctx: RequestContext) -> list[dict[str, Any]]:
        """Each budget that applies to the caller (not `model` budgets): scope, member, period, limits, what is
        used and remaining in the current period, and when it resets. Raises ServiceUnavailable when the store
        cannot be reached."""
        now = self.clock()
        rows: list[dict[str, Any]] = []
        for index, budget in self._applying(ctx):
            if budget.scope == "model":
                continue
            member = scope_member(budget.scope, budget.match, ctx, None)
            if member is None:
                continue
            start, end = period_window(budget.period, now)
            row: dict[str, Any] = {"scope": budget.scope, "member": member, "period": budget.period,
                                   "resets_at": reset_iso(end)}
            for kind, limit in (("tokens", budget.max_tokens), ("usd", budget.max_cost_usd)):
                if limit is None:
                    continue
                try:
                    used = await self.store.counter(counter_key(index, member, kind, start))
                except StoreUnavailable as exc:
                    self._store_failed(exc)
                    raise ServiceUnavailable("budget usage is unavailable: the state store cannot be reached; "
                                             "try again shortly") from exc
                row[f"limit_{kind}"] = limit
                row[f"used_{kind}"] = used
                row[f"remaining_{kind}"] = max(0.0, limit - used)
            rows.append(row)
        return rows

    def _counters(self, ctx: RequestContext, model: str, now: float, *, models_only: bool = False
                  ) -> list[_Counter]:
        """Every counter of every budget that applies, other scopes first and `model` budgets last (so that a
        failed reservation naming a model counter means every other counter fitted)."""
        first: list[_Counter] = []
        last: list[_Counter] = []
        for index, budget in self._applying(ctx):
            if models_only and budget.scope != "model":
                continue
            member = scope_member(budget.scope, budget.match, ctx, model)
            if member is None:
                continue
            into = last if budget.scope == "model" else first
            into.extend(self._member_counters(index, budget, member, now))
        return first + last

    def _member_counters(self, index: int | str, budget: BudgetConfig, member: str, now: float
                         ) -> tuple[_Counter, ...]:
        """One member's counters of one budget in the period `now` falls in, built once per period."""
        start, end = period_window(budget.period, now)
        cached = self._counter_cache.get((index, member, start))
        if cached is None:
            cached = tuple(_Counter(index, budget, member, kind, counter_key(index, member, kind, start),
                                    settled_key(index, member, kind, start), float(limit), start, end,
                                    _alert_from(budget, limit))
                           for kind, limit in (("tokens", budget.max_tokens), ("usd", budget.max_cost_usd))
                           if limit is not None)
            if len(self._counter_cache) >= _COUNTER_CACHE:
                self._counter_cache.clear()  # old periods and departed members: cheaper than an LRU
            self._counter_cache[(index, member, start)] = cached
        return cached

    async def levels(self, members: bool = False) -> list[tuple[_Counter, float]]:
        """Each current counter with what is used of it, for the budget gauges: the one member of a global or
        `match` budget, and the members this process has charged in the current period (team and model members
        are bounded by the config; key and user members, and API keys' own budgets, only when `members`).
        Raises StoreUnavailable when the store cannot be read."""
        now = self.clock()
        counters: dict[str, _Counter] = {}
        for index, budget in self._numbered:
            if budget.scope == "global" or budget.match is not None:
                member = "*" if budget.scope == "global" else budget.match
                counters.update((c.key, c) for c in self._member_counters(index, budget, member, now))
        for cached in list(self._counter_cache.values()):
            for counter in cached:
                unbounded = counter.budget.scope in ("key", "user")
                current = period_window(counter.budget.period, now)[0] == counter.start
                if current and (members or not unbounded):
                    counters[counter.key] = counter
        chosen = sorted(counters.values(), key=lambda c: (str(c.index), c.member, c.kind))
        used = await asyncio.gather(*(self.store.counter(c.key) for c in chosen))
        return list(zip(chosen, used, strict=True))

    def _applying(self, ctx: RequestContext) -> Sequence[tuple[int | str, BudgetConfig]]:
        """The config's budgets by number, and the caller's API key's own budget (as "key") when it has one."""
        own = ctx.principal.budget
        return self._numbered if own is None else [*self._numbered, ("key", own)]

    def _worst_case(self, ctx: RequestContext, model: ModelConfig) -> tuple[float, float]:
        """(tokens, USD) the request may cost at most on `model`; USD is 0 when its pricing is unknown."""
        prompt, completion = worst_case_tokens(ctx.request, model)
        price = model.known_pricing
        if price is None:
            if self._usd and model.id not in self._unpriced:
                self._unpriced.add(model.id)
                log.warning("budget: model %r has no pricing; its requests count as 0 USD against USD budgets",
                            model.id)
            return float(prompt + completion), 0.0
        return float(prompt + completion), (prompt * price.input_per_mtok + completion * price.output_per_mtok) / 1e6

    def _charges(self, ctx: RequestContext, model: ModelConfig, now: float, *, models_only: bool = False
                 ) -> tuple[list[_Counter], list[float]]:
        """The counters a request on `model` is charged to, and its worst case for each."""
        counters = self._counters(ctx, model.id, now, models_only=models_only)
        if not counters:
            return [], []
        tokens, usd = self._worst_case(ctx, model)
        amounts = []
        for counter in counters:  # loops, not comprehensions, over the one or two counters of every request
            amounts.append(tokens if counter.kind == "tokens" else usd)
        return counters, amounts

    async def spent(self, ctx: RequestContext, models: Sequence[ModelConfig], now: float | None = None
                    ) -> dict[str, str]:
        """The models whose `model` budgets cannot cover this request's worst case now, each with the reason
        (counters read, nothing reserved). A store that cannot be read leaves a model in: it is unknown."""
        now = self.clock() if now is None else now
        checks: list[tuple[str, _Counter, float]] = []
        for model in models:
            counters, amounts = self._charges(ctx, model, now, models_only=True)
            checks += [(model.id, c, a) for c, a in zip(counters, amounts, strict=True)]
        if not checks:
            return {}
        values = await asyncio.gather(*(self.store.counter(c.key) for _, c, _ in checks), return_exceptions=True)
        spent: dict[str, str] = {}
        for (model_id, counter, amount), value in zip(checks, values, strict=True):
            if isinstance(value, StoreUnavailable):
                continue  # unknown: the model stays, and is charged in settle if it serves
            if isinstance(value, BaseException):
                raise value
            if value + amount > counter.limit and model_id not in spent:
                spent[model_id] = f"budget exceeded: {_refusal(counter, value, amount, now).message}"
        return spent

    async def _charge_fallback(self, ctx: RequestContext, served: str, tokens: float, usd: float
                               ) -> list[tuple[_Counter, float]]:
        """Charge a fallback that served its own `model` budgets (unconditionally: the tokens are spent); returns
        each counter charged with its amount."""
        now = self.clock()
        charged = [(c, tokens if c.kind == "tokens" else usd)
                   for c in self._counters(ctx, served, now, models_only=True)]
        if charged:
            await self.store.reserve([
                Reservation(key, amount, _UNBOUNDED, None if c.end is None else c.end - now + _SLACK_S)
                for c, amount in charged for key in (c.key, c.settled)
            ])
        return charged

    async def _alert(self, alerts: BudgetAlerts, watched: Sequence[tuple[_Counter, float, float | None]]) -> None:
        """After a settle: each counter of `_watched` alerts for the thresholds its charge crossed (`used - charge`
        before, `used` after, both its settled use: reservations of requests still running do not count). A used
        value of None is read back here. A store that fails here only loses the alerts."""
        unknown = [c for c, _, value in watched if value is None]
        read = iter(await asyncio.gather(*(self.store.counter(c.settled) for c in unknown), return_exceptions=True)
                    if unknown else ())
        for counter, amount, value in watched:
            after = next(read) if value is None else value
            if isinstance(after, BaseException):
                log.warning("budget: alerts for budget #%s skipped: %s", counter.index, after)
                continue
            await alerts.crossed(counter.index, counter.member, counter.start, counter.kind, after - amount, after,
                                 counter.limit, counter.budget.alert_at, counter.end)

    def _store_failed(self, exc: StoreUnavailable) -> None:
        if not self._down:
            self._down = True
            log.warning("budgets not enforced while the state store is unreachable "
                        "(budgets with on_store_error: deny refuse requests): %s", exc)

    def _store_answered(self) -> None:
        """The store answered after an outage (callers check `_down` first: a check, not a call, a request)."""
        self._down = False
        log.warning("budgets enforced again: the state store answers")


_COUNTER_CACHE = 10_000


def _reservations(counters: Sequence[_Counter], amounts: Sequence[float], now: float) -> list[Reservation]:
    """`amounts` on `counters`, each within its limit, kept until its period has ended."""
    reservations = []
    for c, amount in zip(counters, amounts, strict=True):
        reservations.append(Reservation(c.key, amount, c.limit, None if c.end is None else c.end - now + _SLACK_S))
    return reservations


async def _key_budgets(engine: AsyncEngine) -> list[BudgetConfig]:
    """The own budgets of the API keys stored in the database that are not revoked."""
    query = sa.select(api_keys).where(api_keys.c.budget.is_not(None), api_keys.c.revoked_at.is_(None))
    async with engine.connect() as connection:
        rows = (await connection.execute(query)).all()
    return [budget for row in rows if (budget := principal_of_row(row).budget) is not None]


def _watched(charged: Sequence[tuple[_Counter, float]], used: Sequence[float | None]
             ) -> list[tuple[_Counter, float, float | None]]:
    """The counters a settle charged that may have crossed an alert threshold, with their charge and their value
    after it (None where adjust did not return one): a budget with thresholds, used at least up to the lowest.
    Checked before any alert coroutine is made: most budgets have no thresholds."""
    watched = []
    for (c, amount), value in zip(charged, used, strict=True):
        if amount > 0 and c.alert_from < math.inf and (value is None or value >= c.alert_from):
            watched.append((c, amount, value))
    return watched


def _alert_from(budget: BudgetConfig, limit: float) -> float:
    """The usage below which no alert threshold of `budget` can be crossed (a hair low: BudgetAlerts.crossed
    decides exactly), inf without thresholds."""
    return min(budget.alert_at) * limit * (1 - 1e-9) if budget.alert_at else math.inf


def counter_key(index: int | str, member: str, kind: str, start: int) -> str:
    """The counter approve reserves on: settled use plus the worst case of the requests in flight."""
    return f"budget:{index}:{member}:{kind}:{start}"


def settled_key(index: int | str, member: str, kind: str, start: int) -> str:
    """The counter of settled use alone (no reservations), beside `counter_key`'s: alerts and forecasts read it."""
    return f"budget:{index}:{member}:{kind}:{start}:settled"


def _amount(kind: Kind, value: float) -> str:
    return f"{value:g} tokens" if kind == "tokens" else f"{value:.6g} USD"


def _refusal(counter: _Counter, current: float, needed: float, now: float) -> BudgetExceeded:
    if needed > counter.limit:  # no period will ever hold it: retrying cannot help (as the rate limit says it)
        error = BudgetExceeded(
            f"Request too large for the {counter.describe()}: it may need up to {_amount(counter.kind, needed)} "
            "(prompt plus max_tokens or its default); shorten the prompt or lower max_tokens"
        )
        error.headers = {"x-should-retry": "false"}
        return error
    resets = reset_iso(counter.end)
    error = BudgetExceeded(
        f"Budget exceeded: the {counter.describe()} has {_amount(counter.kind, current)} used and this request "
        f"may need up to {_amount(counter.kind, needed)} (prompt plus max_tokens or its default); it resets "
        + ("never" if counter.end is None else f"at {resets}")
    )
    if counter.end is not None:
        error.headers = {"retry-after": str(max(1, math.ceil(counter.end - now)))}
    return error
