"""Live per-deployment state the router scores on: in-flight counts, latency EWMAs and vLLM load signals."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from routing.breaker import CircuitBreaker

__all__ = ["ALPHA", "SOFT_IN_FLIGHT", "SOFT_QUEUE", "DeploymentState", "ModelLive"]

Clock = Callable[[], float]

# EWMA weight of the newest sample: quick to follow a slowdown, smooth enough to shrug off one outlier
ALPHA = 0.3
# requests in flight (or running in vLLM) per deployment at which that pressure reads 0.5
SOFT_IN_FLIGHT = 16.0
# requests waiting in vLLM's queue at which queue pressure reads 0.5: any queue means a full batch
SOFT_QUEUE = 4.0


def _ewma(old: float | None, sample: float, seeded: bool) -> float:
    return old + ALPHA * (sample - old) if seeded and old is not None else sample


def _saturate(x: float, half: float) -> float:
    """0 at 0, 0.5 at `half`, approaching 1: a pressure with no cliff and no arbitrary cap."""
    return x / (x + half) if x > 0 else 0.0


class DeploymentState:
    """One deployment as the router sees it now. Mutated only from the event loop, so no locks."""

    __slots__ = (
        "_clock",
        "ewma_latency_s",
        "ewma_tokens_per_s",
        "ewma_ttft_s",
        "in_flight",
        "key",
        "kv_cache_usage",
        "running",
        "samples",
        "signals_at",
        "waiting",
        "weight",
    )

    def __init__(self, key: str, weight: float = 1.0, *, clock: Clock = time.monotonic) -> None:
        self.key = key
        self.weight = weight
        self.in_flight = 0
        self.ewma_latency_s: float | None = None  # full request, start to last byte
        self.ewma_ttft_s: float | None = None
        self.ewma_tokens_per_s: float | None = None  # decode speed: tokens over the time after the first one
        self.samples = 0  # successes fed to the EWMAs
        # vLLM's own view, polled from /metrics; None until a poll succeeds
        self.running: float | None = None
        self.waiting: float | None = None
        self.kv_cache_usage: float | None = None  # 0..1
        self.signals_at: float | None = None
        self._clock = clock

    def now(self) -> float:
        return self._clock()

    def begin(self) -> float:
        """Count a request in; returns its start time, to hand back to `end`."""
        self.in_flight += 1
        return self._clock()

    def end(
        self, started: float, ok: bool, ttft_s: float | None = None, completion_tokens: int | None = None
    ) -> None:
        """Count a request out. Only successes feed the EWMAs: a fast 500 or a timeout says nothing about
        speed (the circuit breaker tracks failures). The first success often paid for connection setup (TCP,
        TLS, a cold upstream), so it only stands in until the second replaces it; blending starts at the third."""
        self.in_flight = max(0, self.in_flight - 1)
        if not ok:
            return
        elapsed = max(0.0, self._clock() - started)
        self.samples += 1
        seeded = self.samples > 2
        self.ewma_latency_s = _ewma(self.ewma_latency_s, elapsed, seeded)
        if ttft_s is not None:
            self.ewma_ttft_s = _ewma(self.ewma_ttft_s, max(0.0, ttft_s), seeded)
        if completion_tokens:
            # without a TTFT (non-streaming) the whole request is the best decode-time estimate we have
            decode_s = elapsed - ttft_s if ttft_s is not None and elapsed > ttft_s else elapsed
            if decode_s > 0:
                self.ewma_tokens_per_s = _ewma(self.ewma_tokens_per_s, completion_tokens / decode_s, seeded)

    def apply_signals(
        self, running: float | None, waiting: float | None, kv_cache_usage: float | None, now: float
    ) -> None:
        self.running = running
        self.waiting = waiting
        self.kv_cache_usage = None if kv_cache_usage is None else min(1.0, max(0.0, kv_cache_usage))
        self.signals_at = now

    def clear_signals(self) -> None:
        """Forget vLLM's view (a failed poll): stale numbers would steer traffic on yesterday's load."""
        self.running = self.waiting = self.kv_cache_usage = self.signals_at = None

    @property
    def has_signals(self) -> bool:
        return self.running is not None or self.waiting is not None or self.kv_cache_usage is not None

    def load(self) -> float:
        """This deployment's load in [0, 1].

        The gateway's own in-flight count is always known; vLLM's signals, when polled, also see other
        clients: engine = 1 - (1 - max(running pressure, kv usage)) * (1 - queue pressure), so a queue pushes
        toward 1 even with KV cache to spare. The result is the larger of the two views (in-flight is a lower
        bound on what vLLM runs for us, so the max never double-counts).
        """
        local = _saturate(self.in_flight, SOFT_IN_FLIGHT)
        if not self.has_signals:
            return local
        busy = max(_saturate(self.running or 0.0, SOFT_IN_FLIGHT), self.kv_cache_usage or 0.0)
        engine = 1.0 - (1.0 - busy) * (1.0 - _saturate(self.waiting or 0.0, SOFT_QUEUE))
        return max(local, engine)

    def __repr__(self) -> str:
        return f"DeploymentState({self.key!r}, weight={self.weight}, in_flight={self.in_flight})"


def _weighted_mean(pairs: Iterable[tuple[float, float | None]]) -> float | None:
    total = weights = 0.0
    for weight, value in pairs:
        if value is not None:
            total += weight * value
            weights += weight
    return total / weights if weights > 0 else None


class ModelLive:
    """A model's deployments together, with the aggregates the auto-router's scorer reads, and their breakers
    (one per deployment, in the same order; none given: nothing known about them)."""

    __slots__ = ("breakers", "states")

    def __init__(self, states: Sequence[DeploymentState], breakers: Sequence[CircuitBreaker] = ()) -> None:
        self.states = list(states)
        self.breakers = list(breakers)

    def retry_in_s(self) -> float | None:
        """None when a deployment's breaker lets requests through now (or none is known); else how soon the
        first of them may (see CircuitBreaker.retry_in_s)."""
        soonest: float | None = None
        for breaker in self.breakers:
            wait = breaker.retry_in_s()
            if wait is None:
                return None
            soonest = wait if soonest is None else min(soonest, wait)
        return soonest

    def rate_limited(self) -> bool:
        """Whether every deployment is held out by an upstream's 429 (see CircuitBreaker.hold)."""
        return bool(self.breakers) and all(breaker.held_s() is not None for breaker in self.breakers)

    @property
    def ttft_s(self) -> float | None:
        return _weighted_mean((s.weight, s.ewma_ttft_s) for s in self.states)

    @property
    def latency_s(self) -> float | None:
        return _weighted_mean((s.weight, s.ewma_latency_s) for s in self.states)

    @property
    def load(self) -> float:
        """Weight-weighted mean of the deployments' loads (see DeploymentState.load): the balancer spreads
        traffic by weight, so a heavy deployment's load counts for more. 0 with no deployments."""
        return _weighted_mean((s.weight, s.load()) for s in self.states) or 0.0
