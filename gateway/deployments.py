"""A model's deployments at run time: live figures, a circuit breaker each, and the balancing strategy."""

from __future__ import annotations

import random
from collections.abc import Iterator

from backends.base import Backend
from config.schema import Config, ModelConfig
from routing.balancer import make_strategy
from routing.breaker import CircuitBreaker
from routing.live import DeploymentState, ModelLive

__all__ = ["DeploymentPool"]


class DeploymentPool:
    """A model's deployments at run time: live figures, one breaker each, the balancing strategy."""

    def __init__(self, model: ModelConfig, backend: Backend, config: Config) -> None:
        keys = getattr(backend, "deployments", None) or [(model.id, 1.0)]
        self.states = [DeploymentState(key, weight) for key, weight in keys]
        self.live = ModelLive(self.states)
        b = config.routing.circuit_breaker
        self.breakers = [
            CircuitBreaker(failures=b.failures, cooldown_s=b.cooldown_s, error_rate=b.error_rate,
                           window_s=b.window_s, min_requests=b.min_requests)
            for _ in self.states
        ]
        self.healthy = [True] * len(self.states)
        self.strategy = make_strategy(model.load_balancing or config.routing.load_balancing)
        self.max_attempts = config.routing.retries + 1

    def describe(self) -> list[dict]:
        return [
            {"deployment": state.key, "healthy": healthy, "in_flight": state.in_flight,
             "ewma_latency_s": state.ewma_latency_s, "ewma_ttft_s": state.ewma_ttft_s,
             "ewma_tokens_per_s": state.ewma_tokens_per_s, "load": round(state.load(), 4),
             "breaker": breaker.snapshot()}
            for state, breaker, healthy in zip(self.states, self.breakers, self.healthy, strict=True)
        ]

    def available(self) -> bool:
        return any(h and b.state != "open" for h, b in zip(self.healthy, self.breakers, strict=True))

    def targets(self, rng: random.Random) -> list[int]:
        """Every deployment index, best first: the strategy's order, healthy ones before unhealthy."""
        order = self.strategy.order(self.states, rng)
        order.sort(key=lambda i: not self.healthy[i])  # stable: keeps the strategy's order within each group
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

