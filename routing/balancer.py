"""Load-balancing strategies: each orders all of a model's deployments, first = chosen, rest = retries."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import ClassVar, Protocol

from routing.live import DeploymentState

__all__ = [
    "STRATEGIES",
    "LatencyEWMA",
    "LeastOutstanding",
    "LoadSignal",
    "PowerOfTwo",
    "RoundRobin",
    "Strategy",
    "Weighted",
    "make_strategy",
]


class Strategy(Protocol):
    """`order` never drops an index: the caller skips open breakers, so every candidate stays a retry."""

    name: ClassVar[str]

    def order(self, states: Sequence[DeploymentState], rng: random.Random) -> list[int]: ...


def _least_outstanding(states: Sequence[DeploymentState], indices: Sequence[int]) -> list[int]:
    return sorted(indices, key=lambda i: (states[i].in_flight, -states[i].weight, i))


class LeastOutstanding:
    """Fewest requests in flight; ties go to the heavier deployment, then the earlier one (deterministic)."""

    name: ClassVar[str] = "least_outstanding"

    def order(self, states: Sequence[DeploymentState], rng: random.Random) -> list[int]:
        return _least_outstanding(states, range(len(states)))


class RoundRobin:
    """Rotation by a per-instance counter, so each model's rotation is independent."""

    name: ClassVar[str] = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def order(self, states: Sequence[DeploymentState], rng: random.Random) -> list[int]:
        n = len(states)
        if n == 0:
            return []
        start = self._next % n
        self._next += 1
        return [(start + k) % n for k in range(n)]


class Weighted:
    """Smooth weighted round robin (nginx's): deterministic, exact over a period, never bursty.

    Each pick adds every candidate's weight to its running score, takes the highest, and subtracts the total
    from the winner. Scores are kept per deployment key, so a candidate set thinned by a breaker keeps the
    others' positions.
    """

    name: ClassVar[str] = "weighted"

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def order(self, states: Sequence[DeploymentState], rng: random.Random) -> list[int]:
        if not states:
            return []
        current = [self._current.get(s.key, 0.0) + s.weight for s in states]
        chosen = max(range(len(states)), key=lambda i: (current[i], -i))
        current[chosen] -= sum(s.weight for s in states)
        for state, score in zip(states, current, strict=True):
            self._current[state.key] = score
        # retries in the order the rotation would reach them next
        rest = sorted((i for i in range(len(states)) if i != chosen), key=lambda i: (-current[i], i))
        return [chosen, *rest]


class LatencyEWMA:
    """Lowest latency EWMA x (1 + in_flight): fast deployments win, but not so hard that they get herded.

    A deployment with no latency yet counts as the best one observed, so it gets tried, and once it has a
    request in flight it pays the same in-flight penalty as the rest (a flat 0 would pull every request to it
    until its first one finished). So does one with a single sample: that one likely paid for connection
    setup, and an outlier must not starve the deployment of the second sample that replaces it.
    """

    name: ClassVar[str] = "latency_ewma"

    def order(self, states: Sequence[DeploymentState], rng: random.Random) -> list[int]:
        latencies = [None if s.samples == 1 else s.ewma_latency_s for s in states]
        known = [latency for latency in latencies if latency is not None]
        best = min(known) if known else 1.0  # with nothing known this reduces to least outstanding

        def key(i: int) -> tuple[float, bool, float, int]:
            s, latency = states[i], latencies[i]
            return ((best if latency is None else latency) * (1 + s.in_flight), latency is not None, -s.weight, i)

        return sorted(range(len(states)), key=key)


class PowerOfTwo:
    """Two random candidates, the less loaded wins (a tie: the heavier, then either, at random); near
    least-outstanding quality without every router chasing the same minimum. The retries follow least
    outstanding."""

    name: ClassVar[str] = "power_of_two"

    def order(self, states: Sequence[DeploymentState], rng: random.Random) -> list[int]:
        n = len(states)
        if n < 2:
            return list(range(n))
        a, b = rng.sample(range(n), 2)  # in random order: min keeps `a` on a tie, never the lower index
        chosen = min(a, b, key=lambda i: (states[i].in_flight, -states[i].weight))
        return [chosen, *_least_outstanding(states, [i for i in range(n) if i != chosen])]


class LoadSignal:
    """vLLM's own load: waiting*1 + running*0.1 + kv_cache_usage*2 + in_flight*0.5, lowest first.

    A queued request costs most (nothing of it runs yet), a nearly full KV cache means preemptions soon,
    running requests share the batch cheaply. Signals not polled (yet) add nothing; in-flight still counts.
    """

    name: ClassVar[str] = "load_signal"

    @staticmethod
    def score(s: DeploymentState) -> float:
        total = s.in_flight * 0.5
        if s.waiting is not None and math.isfinite(s.waiting):
            total += s.waiting * 1.0
        if s.running is not None and math.isfinite(s.running):
            total += s.running * 0.1
        if s.kv_cache_usage is not None:
            total += s.kv_cache_usage * 2.0
        return total

    def order(self, states: Sequence[DeploymentState], rng: random.Random) -> list[int]:
        scores = [self.score(s) for s in states]
        return sorted(
            range(len(states)), key=lambda i: (scores[i], states[i].in_flight, -states[i].weight, i)
        )


STRATEGIES: dict[str, type] = {
    LeastOutstanding.name: LeastOutstanding,
    RoundRobin.name: RoundRobin,
    Weighted.name: Weighted,
    LatencyEWMA.name: LatencyEWMA,
    PowerOfTwo.name: PowerOfTwo,
    LoadSignal.name: LoadSignal,
}


def make_strategy(name: str) -> Strategy:
    """A fresh strategy (stateful ones keep their rotation per instance: make one per model)."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ValueError(f"unknown load-balancing strategy {name!r}; valid: {', '.join(sorted(STRATEGIES))}")
    return cls()
