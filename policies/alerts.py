"""Budget alerts: once per period per scope member and threshold, a structured log line and an optional webhook."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from policies.state import Reservation, StateStore, StoreUnavailable

__all__ = ["BudgetAlerts"]

log = logging.getLogger("pointsman.alerts")

_SLACK_S = 60.0  # a dedup mark outlives its period by this much, like the budget counter it guards
_TOTAL_TTL_S = None  # a `total` budget never resets: its marks never expire
_REMEMBER = 65536  # marks this process knows are taken (oldest forgotten first; forgetting costs one round trip)


class BudgetAlerts:
    """Fires an alert when a budget counter's usage crosses one of its thresholds (fractions of the limit).

    Each (budget, member, kind, period, threshold) alerts at most once, across every replica sharing the state
    store: the first caller to reserve the alert's mark (a counter of limit 1) fires, every later one finds it
    taken. Every threshold at or below `used_after` whose mark this process has not yet seen taken is tried, not
    only those above `used_before`: two settles that land together may both read the counter after both were
    added, and neither would see the lower threshold pass. Marks seen taken are remembered, so a threshold
    costs each replica one store round trip per period.

    An alert is one WARNING line of JSON on the "pointsman.alerts" logger and, when `webhook` is set, a POST of
    the same JSON made in a background task (never awaited by the request path), tried `tries` times with
    doubling backoff from `backoff_s`; a webhook that still fails is logged, never raised. A store that cannot
    be reached skips the alert (it cannot be deduplicated; the budget counts as before).
    """

    __slots__ = ("_client", "_taken", "_tasks", "backoff_s", "clock", "store", "tries", "webhook")

    def __init__(self, webhook: str | None, store: StateStore, *, tries: int = 3, backoff_s: float = 0.5,
                 timeout_s: float = 5.0, clock: Callable[[], float] = time.time) -> None:
        self.webhook = webhook
        self.store = store
        self.tries = max(1, tries)
        self.backoff_s = backoff_s
        self.clock = clock
        self._client = httpx.AsyncClient(timeout=timeout_s) if webhook else None
        self._tasks: set[asyncio.Task[None]] = set()  # webhook deliveries in flight, held until done
        self._taken: dict[str, None] = {}  # marks known taken, oldest first

    async def crossed(self, budget_index: int | str, member: str, period_start: int, kind: str, used_before: float,
                      used_after: float, limit: float, thresholds: Sequence[float], resets_at: float | None
                      ) -> None:
        """Alert for each threshold t <= used_after/limit (fractions; those above used_before/limit are the ones
        this charge crossed) not yet alerted in this period, which ends at `resets_at` (epoch seconds; None:
        never). Never raises."""
        if limit <= 0 or used_after <= used_before or not any(t <= used_after / limit for t in thresholds):
            return
        marks = {t: _mark(budget_index, member, kind, period_start, t) for t in thresholds}
        due = sorted(t for t, key in marks.items() if t <= used_after / limit and key not in self._taken)
        if not due:
            return
        ttl = self._ttl(resets_at)
        for threshold in due:
            first = await self._take(marks[threshold], ttl)
            if first is None:
                return
            if first:
                self._fire({
                    "event": "budget_alert", "budget": budget_index, "member": member, "kind": kind,
                    "period_start": _iso(period_start), "threshold": threshold, "used": used_after, "limit": limit,
                    "resets_at": "never" if resets_at is None else _iso(resets_at),
                })

    async def passed(self, budget_index: int | str, member: str, period_start: int, kind: str, used: float,
                     limit: float, thresholds: Sequence[float], resets_at: float | None) -> None:
        """Take the marks of the thresholds `used` has reached, firing nothing: a counter seeded after a restart
        (BudgetPolicy.seed) alerted for those before it, and an in-process store forgot their marks. Never
        raises."""
        if limit <= 0:
            return
        ttl = self._ttl(resets_at)
        for threshold in sorted(t for t in thresholds if t <= used / limit):
            if await self._take(_mark(budget_index, member, kind, period_start, threshold), ttl) is None:
                return

    def _ttl(self, resets_at: float | None) -> float | None:
        return _TOTAL_TTL_S if resets_at is None else max(resets_at - self.clock(), 0.0) + _SLACK_S

    async def _take(self, key: str, ttl: float | None) -> bool | None:
        """Reserve the mark `key`: True when this call took it first, False when it was taken, None when the
        store failed (logged)."""
        try:
            first = (await self.store.reserve([Reservation(key, 1.0, 1.0, ttl)])).ok
        except StoreUnavailable as exc:
            log.warning("budget alert skipped (the state store cannot be reached): %s", exc)
            return None
        except Exception:
            log.exception("budget alert skipped: deduplicating it failed")
            return None
        self._taken[key] = None
        if len(self._taken) > _REMEMBER:
            del self._taken[next(iter(self._taken))]
        return first

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Let the deliveries in flight finish (up to `timeout_s`, then cancel them), then close the client."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def _fire(self, alert: dict[str, Any]) -> None:
        body = json.dumps(alert)
        log.warning("%s", body)
        if self._client is not None and self.webhook is not None:
            task = asyncio.get_running_loop().create_task(self._deliver(self._client, self.webhook, body))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, client: httpx.AsyncClient, url: str, body: str) -> None:
        problem = ""
        for attempt in range(self.tries):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                response = await client.post(url, content=body, headers={"content-type": "application/json"})
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            except Exception:
                log.exception("budget alert webhook %s failed: %s", url, body)
                return
            if response.is_success:
                return
            problem = f"HTTP {response.status_code}"
            if response.status_code < 500 and response.status_code != 429:
                break  # the webhook refuses this alert: trying again would not help
        log.error("budget alert webhook %s failed after %d tries (%s): %s", url, attempt + 1, problem, body)


def _mark(budget_index: int | str, member: str, kind: str, period_start: int, threshold: float) -> str:
    """The state-store key whose reservation says this threshold has alerted in this period."""
    return f"alert:{budget_index}:{member}:{kind}:{period_start}:{threshold:g}"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")
