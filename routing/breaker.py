"""A per-deployment circuit breaker: closed, open after failures, half_open after a cooldown, one probe."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "BreakerState", "CircuitBreaker"]

BreakerState = Literal["closed", "open", "half_open"]
CLOSED: BreakerState = "closed"
OPEN: BreakerState = "open"
HALF_OPEN: BreakerState = "half_open"

_BUCKETS = 30  # the error-rate window is kept as this many counters, not one entry per request


class CircuitBreaker:
    """Trips on `failures` consecutive failures, or when the last `window_s` saw at least `min_requests`
    requests with a failure ratio >= `error_rate`.

    Open: `allow()` is False for `cooldown_s`. Then half-open: `allow()` lets exactly one probe through at a
    time; its success closes the breaker (counts reset), its failure re-opens it for another cooldown. Results
    arriving while open, or half-open with no probe out, are from requests sent before the trip: ignored.
    A probe that ends with no verdict (cancelled: its client left) hands its slot back with `release`, so the
    next request probes; one whose result never comes back at all is given up after `probe_timeout_s`, so the
    breaker cannot stay shut forever.

    `hold(s)` (an upstream's 429 with a Retry-After) also refuses requests for `s` seconds, whatever the state;
    it is no verdict: the state, counts and results of requests already sent are untouched.
    """

    __slots__ = (
        "_buckets",
        "_clock",
        "_consecutive",
        "_held_until",
        "_opened_at",
        "_probe_since",
        "_probes",
        "_state",
        "_width",
        "cooldown_s",
        "error_rate",
        "failures",
        "min_requests",
        "opened_count",
        "probe_timeout_s",
        "window_s",
    )

    def __init__(
        self,
        failures: int = 5,
        cooldown_s: float = 10.0,
        error_rate: float = 0.5,
        window_s: float = 30.0,
        min_requests: int = 10,
        clock: Callable[[], float] = time.monotonic,
        *,
        probe_timeout_s: float = 60.0,
    ) -> None:
        if failures < 1 or min_requests < 1 or cooldown_s < 0 or window_s <= 0 or not 0 < error_rate <= 1:
            raise ValueError(
                "breaker: failures, min_requests >= 1; cooldown_s >= 0; window_s > 0; 0 < error_rate <= 1"
            )
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.error_rate = error_rate
        self.window_s = window_s
        self.min_requests = min_requests
        self.probe_timeout_s = probe_timeout_s
        self.opened_count = 0
        self._clock = clock
        self._state: BreakerState = CLOSED  # stored; "open" reads as half_open once the cooldown has passed
        self._consecutive = 0
        self._opened_at = 0.0
        self._probe_since: float | None = None
        self._held_until = -math.inf  # refuses requests until this time (an upstream's Retry-After)
        self._probes = 0  # probes let through so far: the id of the latest, for `release`
        self._width = window_s / _BUCKETS
        self._buckets: deque[list[int]] = deque()  # [bucket index, requests, failures], oldest first

    # -- state ---------------------------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        return self._state_at(self._clock())

    def _state_at(self, now: float) -> BreakerState:
        if self._state == OPEN and now - self._opened_at >= self.cooldown_s:
            return HALF_OPEN
        return self._state

    def allow(self) -> bool:
        """May a request go to this deployment now? In half-open, True claims the single probe slot."""
        now = self._clock()
        if now < self._held_until:
            return False
        if self._state == CLOSED:  # the usual state, and the one time never changes: no _state_at call
            return True
        state = self._state_at(now)
        if state == OPEN:
            return False
        if self._probe_out(now):
            return False
        self._probe_since = now
        self._probes += 1
        return True

    def _probe_out(self, now: float) -> bool:
        return self._probe_since is not None and now - self._probe_since < self.probe_timeout_s

    def probe(self) -> int | None:
        """The id of the probe out now (to hand to `release`), None when none is."""
        if self._state == CLOSED:
            return None
        now = self._clock()
        return self._probes if self._state_at(now) == HALF_OPEN and self._probe_out(now) else None

    def release(self, probe: int | None) -> None:
        """Probe `probe` ended with no verdict (cancelled): free its slot, so the next request probes. Neither
        a success nor a failure; a later probe's slot, or one given up already, is left alone."""
        if probe is not None and probe == self._probes and self.probe() is not None:
            self._probe_since = None

    def retry_in_s(self) -> float | None:
        """None when `allow()` would let a request through now; else how soon it may: the rest of the cooldown
        when open, 0 while a probe is out (its answer may come any moment), at least the rest of a hold. Reading
        it changes nothing."""
        now = self._clock()
        state = self._state_at(now)
        if state == OPEN:
            wait: float | None = max(0.0, self._opened_at + self.cooldown_s - now)
        else:
            wait = 0.0 if state == HALF_OPEN and self._probe_out(now) else None
        if now < self._held_until:
            return max(wait or 0.0, self._held_until - now)
        return wait

    def hold(self, seconds: float) -> None:
        """Refuse requests for the next `seconds` (an upstream's 429 asked to wait); a longer hold already on
        stays."""
        if seconds > 0:
            self._held_until = max(self._held_until, self._clock() + seconds)

    def held_s(self) -> float | None:
        """The rest of a hold, None when none is on."""
        rest = self._held_until - self._clock()
        return rest if rest > 0 else None

    def record_success(self) -> None:
        now = self._clock()
        state = self._state if self._state == CLOSED else self._state_at(now)
        if state == CLOSED:
            self._consecutive = 0
            self._count(now, failed=False)
        elif state == HALF_OPEN and self._probe_since is not None:
            self._close()

    def record_failure(self) -> None:
        now = self._clock()
        state = self._state_at(now)
        if state == CLOSED:
            self._consecutive += 1
            self._count(now, failed=True)
            requests, failed = self._totals()  # summed only here: a success never needs them
            if self._consecutive >= self.failures or (
                requests >= self.min_requests and failed >= self.error_rate * requests
            ):
                self._open(now)
        elif state == HALF_OPEN and self._probe_since is not None:
            self._open(now)

    # -- internals -----------------------------------------------------------------------------------------

    def _open(self, now: float) -> None:
        self._state = OPEN
        self._opened_at = now
        self._probe_since = None
        self.opened_count += 1

    def _close(self) -> None:
        self._state = CLOSED
        self._probe_since = None
        self._consecutive = 0
        self._buckets.clear()

    def _prune(self, now: float) -> int:
        current = math.floor(now / self._width)
        while self._buckets and self._buckets[0][0] <= current - _BUCKETS:
            self._buckets.popleft()
        return current

    def _count(self, now: float, *, failed: bool) -> None:
        """Add one result to the window."""
        current = self._prune(now)
        if not self._buckets or self._buckets[-1][0] != current:
            self._buckets.append([current, 0, 0])
        bucket = self._buckets[-1]
        bucket[1] += 1
        bucket[2] += int(failed)

    def _totals(self) -> tuple[int, int]:
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)

    def snapshot(self) -> dict[str, Any]:
        """The breaker's state for /v1/route explanations; reading it changes nothing."""
        now = self._clock()
        state = self._state_at(now)
        current = math.floor(now / self._width)
        live = [b for b in self._buckets if b[0] > current - _BUCKETS]
        requests, failed = sum(b[1] for b in live), sum(b[2] for b in live)
        return {
            "state": state,
            "consecutive_failures": self._consecutive,
            "window_requests": requests,
            "window_failures": failed,
            "window_error_rate": failed / requests if requests else None,
            "retry_in_s": max(0.0, self._opened_at + self.cooldown_s - now) if state == OPEN else None,
            "probe_in_flight": state == HALF_OPEN and self._probe_out(now),
            # an upstream 429's Retry-After: no request goes here until it has passed
            "rate_limited_for_s": self._held_until - now if now < self._held_until else None,
            "opened_count": self.opened_count,
            "failures": self.failures,
            "cooldown_s": self.cooldown_s,
            "error_rate": self.error_rate,
            "window_s": self.window_s,
            "min_requests": self.min_requests,
        }
