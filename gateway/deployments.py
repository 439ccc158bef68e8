"""A model's deployments at run time: live figures, a circuit breaker each, the balancing strategy, and the
lease that books one attempt's outcome into all of them in one place."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator

from backends.base import Backend
from config.schema import Config, ModelConfig
from policies.context import AttemptRecord
from protocol.errors import UpstreamError
from routing.balancer import make_strategy
from routing.breaker import CircuitBreaker
from routing.live import DeploymentState, ModelLive
from routing.retry_after import retry_after_s

__all__ = ["DeploymentPool", "Lease"]


class Lease:
    """One attempt on one deployment, from `pool.lease(index)` to exactly one of `ok(...)` or `fail(exc)`.

    The only place that writes in-flight counts, EWMA figures and breaker results, for plain requests, streams
    and stream continuations alike. A failure counts against the breaker only when the upstream is to blame: a
    retryable UpstreamError (connect, timeout, 5xx, 429). A 4xx means the upstream answered (a breaker success);
    a cancellation (the client left, the gateway stops) is neither, and hands back a half-open breaker's probe slot
    if this attempt held it, so that the next request probes instead of waiting for the probe's timeout.
    """

    __slots__ = ("index", "pool", "probe", "record", "started")

    def __init__(self, pool: DeploymentPool, index: int, record: AttemptRecord) -> None:
        self.pool, self.index, self.record = pool, index, record
        self.started = record.started
        # leased right after the breaker's allow(): a probe out now is this attempt's
        self.probe = pool.breakers[index].probe()

    @property
    def key(self) -> str:
        return self.pool.states[self.index].key

    def ok(self, *, ttft_s: float | None = None, completion_tokens: int | None = None) -> None:
        state = self.pool.states[self.index]
        state.end(self.started, ok=True, ttft_s=ttft_s, completion_tokens=completion_tokens)
        self.pool.breakers[self.index].record_success()
        self.record.ok, self.record.ended, self.record.ttft_s = True, state.now(), ttft_s

    def fail(self, exc: BaseException, *, ttft_s: float | None = None) -> None:
        """`ttft_s`: a stream that broke after its first token keeps the time to it (the client's, see
        RequestContext.ttft_s)."""
        state = self.pool.states[self.index]
        state.end(self.started, ok=False)
        if isinstance(exc, UpstreamError):
            if exc.retryable and exc.status != 429:
                self.pool.breakers[self.index].record_failure()
            else:  # it answered: the request was at fault, or it is rate limited (a hold keeps it out, not the breaker)
                self.pool.breakers[self.index].record_success()
            self.record.error = exc.code or type(exc).__name__
        else:
            self.pool.breakers[self.index].release(self.probe)  # no verdict on the upstream
            self.record.error = type(exc).__name__ if isinstance(exc, Exception) else "cancelled"
        self.record.ok, self.record.ended, self.record.ttft_s = False, state.now(), ttft_s


class DeploymentPool:
    """A model's deployments at run time: live figures, one breaker each, the balancing strategy."""

    def __init__(self, model: ModelConfig, backend: Backend, config: Config, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        keys = getattr(backend, "deployments", None) or [(model.id, 1.0)]
        self.states = [DeploymentState(key, weight, clock=clock) for key, weight in keys]
        b = config.routing.circuit_breaker
        self.breakers = [
            CircuitBreaker(failures=b.failures, cooldown_s=b.cooldown_s, error_rate=b.error_rate,
                           window_s=b.window_s, min_requests=b.min_requests, clock=clock)
            for _ in self.states
        ]
        self.live = ModelLive(self.states, self.breakers)
        self.healthy = [True] * len(self.states)
        self.strategy = make_strategy(model.load_balancing or config.routing.load_balancing)
        self.max_attempts = config.routing.retries + 1
        self.model_id = model.id

    @property
    def in_flight(self) -> int:
        """Attempts waiting on any of the model's deployments now."""
        return sum(state.in_flight for state in self.states)

    def lease(self, index: int) -> Lease:
        """Count an attempt in on deployment `index`; the lease books its outcome."""
        state = self.states[index]
        return Lease(self, index, AttemptRecord(self.model_id, state.key, state.begin()))

    def describe(self) -> list[dict]:
        return [
            {"deployment": state.key, "healthy": healthy, "in_flight": state.in_flight,
             "ewma_latency_s": state.ewma_latency_s, "ewma_ttft_s": state.ewma_ttft_s,
             "ewma_tokens_per_s": state.ewma_tokens_per_s, "load": round(state.load(), 4),
             "breaker": breaker.snapshot()}
            for state, breaker, healthy in zip(self.states, self.breakers, self.healthy, strict=True)
        ]

    def hold(self, index: int, exc: UpstreamError, cap_s: float) -> None:
        """An upstream's 429: keep deployment `index` out of routing for the Retry-After it sent, at most `cap_s`,
        so the other deployments serve meanwhile. A model's only deployment is not held (LiteLLM's choice too):
        its own 429 and Retry-After reach the client, and the next request may fit a limit this one did not."""
        wait = retry_after_s(exc.headers) if len(self.breakers) > 1 and cap_s > 0 else None
        if wait is not None:
            self.breakers[index].hold(min(wait, cap_s))

    def available(self) -> bool:
        """Whether some deployment can take a request now: healthy, its breaker not open, and not held out by
        an upstream's 429 (automatic routing scores only such models; /v1/models shows it as `status`)."""
        return any(h and b.state != "open" and b.held_s() is None
                   for h, b in zip(self.healthy, self.breakers, strict=True))

    def targets(self, rng: random.Random) -> list[int]:
        """Every deployment index, best first: the strategy's order over those whose breakers let requests through
        now (so those share an open one's turns: a rotation never hands its whole share to the next in line), then
        the refusing ones; healthy ones before unhealthy."""
        n = len(self.states)
        if n == 1:  # most models: nothing to order
            return [0]
        taking = [i for i, breaker in enumerate(self.breakers) if breaker.retry_in_s() is None]
        if len(taking) == n:
            order = self.strategy.order(self.states, rng)
        elif not taking:
            return list(range(n))  # every breaker refuses: no turn to hand out
        else:
            order = [taking[k] for k in self.strategy.order([self.states[i] for i in taking], rng)]
            order += [i for i in range(n) if i not in taking]
        if False in self.healthy:  # stable: keeps the strategy's order within each group
            order.sort(key=lambda i: not self.healthy[i])
        return order

    def attempts(self, rng: random.Random) -> Iterator[int]:
        """The deployments one request tries, at most `retries + 1`, skipping those whose breaker refuses."""
        tried = 0
        for index in self.targets(rng):
            if tried >= self.max_attempts:
                return
            if self.breakers[index].allow():
                tried += 1
                yield index

