"""Hot state for policies (cache entries, budget counters, rate limits, pub/sub): StateStore and LocalStore."""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["DEFAULT_MAX_BYTES", "RESERVED", "SLACK_S", "LocalStore", "RateCharge", "RateResult", "Reservation",
           "ReserveResult", "StateStore", "StoreUnavailable", "Subscription", "check_keep", "check_rate", "check_ttl",
           "gcra"]

DEFAULT_MAX_BYTES = 64 * 2**20
# GCRA compares float times: a microsecond of slack keeps rounding from refusing the last unit of a burst
# (RedisStore's times are seconds since 2023-11, where a double still resolves well below 1 us).
SLACK_S = 1e-6
_SWEEP_EVERY = 4096  # LocalStore drops expired counters and full buckets once per this many writing operations


class StoreUnavailable(Exception):
    """The store cannot be reached (Redis down or too slow): the caller decides whether to fail open or closed."""


@dataclass(slots=True)  # not frozen: built on every request, and frozen ones cost 4x to build
class Reservation:
    """Add `amount` to counter `key` if it stays <= `limit`; a new counter expires after `ttl_s` (its period)."""

    key: str
    amount: float
    limit: float
    ttl_s: float | None = None


@dataclass(slots=True)
class ReserveResult:
    """ok, or the index of the first item that did not fit, with that counter's value and limit."""

    ok: bool
    failed: int | None = None
    current: float = 0.0
    limit: float = 0.0


RESERVED = ReserveResult(ok=True)


@dataclass(slots=True)
class RateResult:
    """One GCRA decision. `retry_after_s` is 0 when allowed and inf when `cost` exceeds the burst (never allowed);
    `remaining` is whole units left in the burst; `reset_s` is the time until the bucket is full again."""

    allowed: bool
    remaining: int
    retry_after_s: float
    reset_s: float


@dataclass(slots=True)
class RateCharge:
    """Charge `cost` to GCRA bucket `key` (refill `rate_per_s`, capacity `burst`). With `partial`, a bucket that
    cannot take the whole cost takes what it still holds instead (the result then says refused, with the
    `remaining` it had): how usage beyond an estimate drains a bucket without running it into debt. Raises
    ValueError unless rate_per_s > 0, burst > 0 and cost >= 0, all finite."""

    key: str
    rate_per_s: float
    burst: float
    cost: float = 1.0
    partial: bool = False

    def __post_init__(self) -> None:  # valid by construction: a store decides it without checking again
        check_rate(self.rate_per_s, self.burst, self.cost)

    def costing(self, cost: float, partial: bool = False) -> RateCharge:
        """This charge's bucket charged `cost` instead (a count or an estimate of tokens, finite, which the caller
        guarantees): its rate and burst were checked when this one was built, so the new one is not checked
        again. A rate limit's per-request charges: 0.3 us where the checked constructor costs 0.75 here. A
        negative `cost` is a refund, always allowed: it moves the TAT back, and `gcra` (RedisStore's script too)
        takes a TAT before now as a full bucket, so a refund never fills one past its burst."""
        charge = _new_charge(RateCharge)
        charge.key, charge.rate_per_s, charge.burst, charge.cost, charge.partial = (
            self.key, self.rate_per_s, self.burst, cost, partial)
        return charge


_new_charge = object.__new__


class Subscription(AsyncIterator[bytes]):
    """Messages of one channel, in publish order. Subscribed once entered (`async with`) or on the first
    `__anext__`; `aclose()` unsubscribes and ends the iteration."""

    __slots__ = ()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        raise NotImplementedError


@runtime_checkable
class StateStore(Protocol):
    """Hot state shared by the policies. Keys are str, values bytes, times seconds. Each operation is atomic;
    on Redis each is one round trip. Every operation raises StoreUnavailable when the store is unreachable.
    A key holds either a value (`set`), a counter (`reserve`/`adjust`) or a rate bucket (`rate`): never mix."""

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def append(
        self, key: str, value: bytes | None = None, ttl_s: float | None = None, *, keep: int | None = None,
        since: int = 0,
    ) -> tuple[int, list[bytes]]:
        """A bounded log shared by replicas. With `value`: append it, keep only the last `keep` values and (re)set
        the log's TTL. Returns how many values were ever appended while the log lived (its total) and the kept
        values at positions >= `since` (0-based, oldest first). `append(key, since=total)` is the cheap check
        for news: one round trip, nothing read when nothing changed. A log is deleted by `delete(key)`."""
        ...

    async def reserve(self, items: Sequence[Reservation]) -> ReserveResult:
        """All or nothing: add every amount if each counter stays within its limit, else add none."""
        ...

    async def adjust(self, items: Sequence[tuple[str, float]]) -> list[float | None]:
        """Add deltas (negative allowed; 0 reads). A counter that has expired is skipped, not resurrected (its
        period ended with it); an existing counter that would go below zero is clamped at zero. Returns each
        counter's value afterwards, None for one skipped."""
        ...

    async def counter(self, key: str) -> float: ...

    async def rate(self, key: str, rate_per_s: float, burst: float, cost: float = 1.0) -> RateResult:
        """One GCRA charge: `rate_many` with one RateCharge."""
        ...

    async def rate_many(self, charges: Sequence[RateCharge]) -> list[RateResult]:
        """Each charge decided on its own, in order (not all or nothing), in one atomic step."""
        ...

    async def publish(self, channel: str, message: bytes) -> None: ...

    def subscribe(self, channel: str) -> Subscription: ...

    async def aclose(self) -> None: ...


def check_rate(rate_per_s: float, burst: float, cost: float) -> None:
    if not (rate_per_s > 0 and burst > 0 and cost >= 0 and math.isfinite(rate_per_s + burst + cost)):
        raise ValueError(f"rate needs rate_per_s > 0, burst > 0, cost >= 0; got {rate_per_s}, {burst}, {cost}")


def check_ttl(ttl_s: float | None) -> None:
    if ttl_s is not None and not ttl_s > 0:
        raise ValueError(f"ttl_s must be > 0 or None, got {ttl_s}")


def check_keep(keep: int | None) -> None:
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 or None, got {keep}")


def gcra(
    tat: float | None, now: float, rate_per_s: float, burst: float, cost: float, partial: bool = False
) -> tuple[float | None, RateResult]:
    """One GCRA step: (the theoretical arrival time to store, None when nothing is charged; the decision).

    TAT is when the bucket would be full again; a request of `cost` is allowed while TAT + cost/rate stays
    within burst/rate of now. `partial`: a refused charge takes the whole units left instead (see RateCharge).
    RedisStore's Lua script is this function, line for line."""
    if tat is None or tat < now:
        tat = now
    increment, offset = cost / rate_per_s, burst / rate_per_s
    new_tat = tat + increment
    diff = now - (new_tat - offset)
    allowed = diff >= -SLACK_S
    # the whole units left (after the charge when allowed, before it when not): a millionth of a unit absorbs
    # float rounding (0.2 s * 20/s = 3.9999999), clamped to [0, burst]; branches, not min/max/floor, and inline:
    # three charges a request
    units = (diff if allowed else offset - (tat - now)) * rate_per_s + 1e-6
    remaining = 0 if units < 1.0 else int(units) if units < burst else math.floor(burst)
    if allowed:
        return new_tat, RateResult(True, remaining, 0.0, new_tat - now)
    retry = math.inf if increment > offset + SLACK_S else -diff
    if partial and remaining > 0:  # the units left, so it fits (to the millionth of a unit)
        drained = tat + remaining / rate_per_s
        return drained, RateResult(False, remaining, retry, drained - now)
    return None, RateResult(False, remaining, retry, tat - now)


class _LocalSubscription(Subscription):
    __slots__ = ("_channel", "_closed", "_queue", "_subscribers")

    def __init__(self, subscribers: dict[str, set[_LocalSubscription]], channel: str) -> None:
        # registered at once: nothing published after subscribe() returns is missed
        self._subscribers, self._channel, self._closed = subscribers, channel, False
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        subscribers.setdefault(channel, set()).add(self)

    def deliver(self, message: bytes) -> None:
        self._queue.put_nowait(message)

    async def __anext__(self) -> bytes:
        message = None if self._closed else await self._queue.get()
        if message is None:
            raise StopAsyncIteration
        return message

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        subscribers = self._subscribers.get(self._channel)
        if subscribers is not None:
            subscribers.discard(self)
            if not subscribers:
                del self._subscribers[self._channel]
        self._queue.put_nowait(None)  # wakes a reader waiting in __anext__


class LocalStore:
    """The StateStore in process, for one worker: plain dicts, no awaits inside a read-modify-write, so each
    operation is atomic on its event loop.

    Values from `set` are bounded by `max_bytes` (key and value lengths), least recently used evicted first;
    a value larger than the whole bound is not kept. Expiry is checked on read against `clock` (monotonic);
    expired counters and full rate buckets are also swept every few thousand writes so they cannot pile up.
    Subscribers get every message published after they subscribed, in order, in unbounded queues."""

    __slots__ = ("_bytes", "_clock", "_counters", "_logs", "_rates", "_subscribers", "_values", "_writes",
                 "max_bytes")

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self._clock = clock
        self._values: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # key -> (value, expires at or inf)
        self._bytes = 0
        self._counters: dict[str, tuple[float, float]] = {}  # key -> (value, expires at or inf)
        self._rates: dict[str, float] = {}  # key -> TAT; a bucket whose TAT has passed is full: dropped
        self._subscribers: dict[str, set[_LocalSubscription]] = {}
        self._logs: dict[str, tuple[list[bytes], int, float]] = {}  # key -> (kept values, total, expires at or inf)
        self._writes = 0

    @property
    def used_bytes(self) -> int:
        return self._bytes

    async def get(self, key: str) -> bytes | None:
        entry = self._values.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            self._drop_value(key)
            return None
        self._values.move_to_end(key)
        return entry[0]

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        check_ttl(ttl_s)
        self._drop_value(key)
        size = len(key) + len(value)
        if size > self.max_bytes:
            return
        self._values[key] = (value, math.inf if ttl_s is None else self._clock() + ttl_s)
        self._bytes += size
        while self._bytes > self.max_bytes:
            old, (old_value, _) = self._values.popitem(last=False)
            self._bytes -= len(old) + len(old_value)

    async def delete(self, key: str) -> None:
        self._drop_value(key)
        self._counters.pop(key, None)
        self._rates.pop(key, None)
        self._logs.pop(key, None)

    async def append(
        self, key: str, value: bytes | None = None, ttl_s: float | None = None, *, keep: int | None = None,
        since: int = 0,
    ) -> tuple[int, list[bytes]]:
        """A bounded log (see StateStore); logs are not counted in `max_bytes`, `keep` bounds each one."""
        check_ttl(ttl_s)
        check_keep(keep)
        now = self._clock()
        log = self._logs.get(key)
        if log is not None and log[2] <= now:
            del self._logs[key]
            log = None
        values, total, expires = log if log is not None else ([], 0, math.inf)
        if value is not None:
            values.append(value)
            total += 1
            if keep is not None and len(values) > keep:
                del values[: len(values) - keep]
            self._logs[key] = (values, total, math.inf if ttl_s is None else now + ttl_s)
            self._wrote(now)
        first = total - len(values)
        return total, values[max(since - first, 0):]

    async def reserve(self, items: Sequence[Reservation]) -> ReserveResult:
        now = self._clock()
        counters = self._counters
        pending: dict[str, float] = {}  # a key named twice is checked against its running total
        for i, item in enumerate(items):  # every TTL checked, every sum tried, before anything is written
            key, ttl_s = item.key, item.ttl_s
            if ttl_s is not None and not ttl_s > 0:
                check_ttl(ttl_s)  # raises
            if key in pending:
                current = pending[key]
            else:
                entry = counters.get(key)
                current = 0.0 if entry is None else entry[0]
                if entry is not None and entry[1] <= now:  # expired: its period is over
                    del counters[key]
                    current = 0.0
            total = current + item.amount
            if total > item.limit:
                return ReserveResult(False, i, current, float(item.limit))
            pending[key] = total
        for item in items:
            value = pending.pop(item.key, None)
            if value is None:
                continue
            old = counters.get(item.key)  # expired ones were dropped above; a new one gets the item's TTL
            if old is not None and old[1] != math.inf:
                counters[item.key] = (value, old[1])
            else:
                counters[item.key] = (value, math.inf if item.ttl_s is None else now + item.ttl_s)
        self._wrote(now)
        return RESERVED

    async def adjust(self, items: Sequence[tuple[str, float]]) -> list[float | None]:
        """Add deltas; an expired counter is skipped and a negative result is clamped at zero (see StateStore)."""
        now = self._clock()
        values: list[float | None] = []
        for key, delta in items:
            entry = self._counters.get(key)
            if entry is None or entry[1] <= now:
                self._counters.pop(key, None)
                values.append(None)
                continue
            value, expires = entry
            value = max(0.0, value + delta)
            self._counters[key] = (value, expires)
            values.append(value)
        return values

    async def counter(self, key: str) -> float:
        return self._counter(key, self._clock())

    async def rate(self, key: str, rate_per_s: float, burst: float, cost: float = 1.0) -> RateResult:
        return (await self.rate_many([RateCharge(key, rate_per_s, burst, cost)]))[0]

    async def rate_many(self, charges: Sequence[RateCharge]) -> list[RateResult]:
        now = self._clock()
        rates = self._rates
        results: list[RateResult] = []
        for charge in charges:
            new_tat, result = gcra(rates.get(charge.key), now, charge.rate_per_s, charge.burst, charge.cost,
                                   charge.partial)
            if new_tat is not None:
                rates[charge.key] = new_tat
            results.append(result)
        self._wrote(now)
        return results

    async def publish(self, channel: str, message: bytes) -> None:
        for subscription in tuple(self._subscribers.get(channel, ())):
            subscription.deliver(message)

    def subscribe(self, channel: str) -> Subscription:
        return _LocalSubscription(self._subscribers, channel)

    async def aclose(self) -> None:
        for subscriptions in tuple(self._subscribers.values()):
            for subscription in tuple(subscriptions):
                await subscription.aclose()
        self._values.clear()
        self._counters.clear()
        self._rates.clear()
        self._logs.clear()
        self._bytes = 0

    def _counter(self, key: str, now: float) -> float:
        entry = self._counters.get(key)
        if entry is None:
            return 0.0
        if entry[1] <= now:
            del self._counters[key]
            return 0.0
        return entry[0]

    def _drop_value(self, key: str) -> None:
        entry = self._values.pop(key, None)
        if entry is not None:
            self._bytes -= len(key) + len(entry[0])

    def _wrote(self, now: float) -> None:
        self._writes += 1
        if self._writes % _SWEEP_EVERY == 0:
            self._counters = {k: entry for k, entry in self._counters.items() if entry[1] > now}
            self._rates = {k: tat for k, tat in self._rates.items() if tat > now}
            self._logs = {k: log for k, log in self._logs.items() if log[2] > now}
