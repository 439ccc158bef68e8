"""The load-balancing strategies: each one's order on crafted states, rotations, distributions, fairness."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from routing.balancer import (
    STRATEGIES,
    LatencyEWMA,
    LeastOutstanding,
    LoadSignal,
    PowerOfTwo,
    RoundRobin,
    Weighted,
    make_strategy,
)
from routing.live import DeploymentState


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def states(*in_flight: int, weights: tuple[float, ...] | None = None) -> list[DeploymentState]:
    out = []
    for i, n in enumerate(in_flight):
        s = DeploymentState(f"d{i}", weights[i] if weights else 1.0)
        s.in_flight = n
        out.append(s)
    return out


RNG = random.Random(0)


def test_registry_names_and_factory() -> None:
    assert set(STRATEGIES) == {
        "least_outstanding",
        "round_robin",
        "weighted",
        "latency_ewma",
        "power_of_two",
        "load_signal",
    }
    for name, cls in STRATEGIES.items():
        strategy = make_strategy(name)
        assert isinstance(strategy, cls) and strategy.name == name
    assert make_strategy("round_robin") is not make_strategy("round_robin")  # stateful: one per model
    with pytest.raises(ValueError, match="valid: latency_ewma, least_outstanding, load_signal"):
        make_strategy("random")


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_orders_all_indices(name: str) -> None:
    strategy = make_strategy(name)
    rng = random.Random(1)
    for n in range(0, 6):
        for _ in range(5):
            assert sorted(strategy.order(states(*([0] * n)), rng)) == list(range(n))


def test_least_outstanding_order_and_ties() -> None:
    s = states(3, 1, 1, 0, 1, weights=(1.0, 1.0, 2.0, 1.0, 2.0))
    # fewest first; among the 1s the heavier (weight 2) first, then by index
    assert LeastOutstanding().order(s, RNG) == [3, 2, 4, 1, 0]


def _simulate(pool: list[DeploymentState], picks_total: int, concurrency: int, finish) -> Counter[int]:
    """Keep `concurrency` requests out; each step `finish` chooses which outstanding one completes, then the
    freed slot is refilled by the strategy. Returns the picks per deployment index."""
    strategy = LeastOutstanding()
    picks: Counter[int] = Counter()
    outstanding: list[tuple[int, float]] = []
    rng = random.Random(42)
    while sum(picks.values()) < picks_total:
        if len(outstanding) >= concurrency:
            i, started = outstanding.pop(finish(outstanding))
            pool[i].end(started, ok=True)
        i = strategy.order(pool, rng)[0]
        picks[i] += 1
        outstanding.append((i, pool[i].begin()))
        loads = [s.in_flight for s in pool]
        assert max(loads) - min(loads) <= 1  # the in-flight spread never exceeds one request
    return picks


def test_least_outstanding_fairness_over_1000_picks() -> None:
    # completions in arrival order: a perfect rotation
    assert _simulate(states(0, 0, 0, 0), 1000, 8, lambda out: 0) == {0: 250, 1: 250, 2: 250, 3: 250}
    # completions in a seeded random order: picks follow the completions, still an even spread
    rng = random.Random(7)
    picks = _simulate(states(0, 0, 0, 0), 1000, 8, lambda out: rng.randrange(len(out)))
    assert sum(picks.values()) == 1000 and all(200 <= n <= 300 for n in picks.values()), picks


def test_least_outstanding_sends_more_to_the_faster_deployment() -> None:
    # deployment 0 finishes its requests three times as often as deployment 1
    rng = random.Random(11)

    def finish(out: list[tuple[int, float]]) -> int:
        fast = [k for k, (i, _) in enumerate(out) if i == 0]
        slow = [k for k, (i, _) in enumerate(out) if i == 1]
        pool_ = fast if fast and (not slow or rng.random() < 0.75) else slow
        return rng.choice(pool_)

    picks = _simulate(states(0, 0), 1000, 6, finish)
    assert picks[0] > 2 * picks[1], picks


def test_round_robin_rotates() -> None:
    rr = RoundRobin()
    s = states(0, 0, 0)
    assert [rr.order(s, RNG) for _ in range(4)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]
    assert RoundRobin().order(s, RNG) == [0, 1, 2]  # a new instance has its own counter
    assert rr.order([], RNG) == []


def test_round_robin_even_over_a_thinned_set() -> None:
    rr = RoundRobin()
    counts = Counter(rr.order(states(0, 0), RNG)[0] for _ in range(100))
    assert counts == {0: 50, 1: 50}


def test_weighted_distribution_is_exact_over_300_picks() -> None:
    w = Weighted()
    s = states(0, 0, 0, weights=(1.0, 2.0, 3.0))
    firsts = [w.order(s, RNG)[0] for _ in range(300)]
    assert Counter(firsts) == {0: 50, 1: 100, 2: 150}
    # smooth, not bursty: one period is c b a c b c, repeated exactly
    assert firsts == [2, 1, 0, 2, 1, 2] * 50


def test_weighted_nginx_sequence_and_retry_order() -> None:
    # nginx's documented example: weights a=5, b=1, c=1 -> a a b a c a a
    w = Weighted()
    s = [DeploymentState(k, wt) for k, wt in (("a", 5.0), ("b", 1.0), ("c", 1.0))]
    orders = [w.order(s, RNG) for _ in range(7)]
    assert ["abc"[o[0]] for o in orders] == list("aabacaa")
    assert all(sorted(o) == [0, 1, 2] for o in orders)
    # after 7 picks (one full period) every running score is back to 0: ties break by index
    assert w.order(s, RNG) == [0, 1, 2]


def test_weighted_fractional_weights() -> None:
    w = Weighted()
    s = states(0, 0, weights=(0.5, 1.5))
    assert Counter(w.order(s, RNG)[0] for _ in range(300)) == {0: 75, 1: 225}


def test_latency_ewma_prefers_the_fast_one() -> None:
    fast, slow = states(0, 0)
    fast.ewma_latency_s, slow.ewma_latency_s = 0.2, 1.0
    assert LatencyEWMA().order([slow, fast], RNG) == [1, 0]
    # 0.2 * (1 + 5) = 1.2 > 1.0 * 1: in-flight requests stop the herd
    fast.in_flight = 5
    assert LatencyEWMA().order([slow, fast], RNG) == [0, 1]


def test_latency_ewma_tries_unknown_deployments() -> None:
    fast, slow, new = states(0, 0, 0)
    fast.ewma_latency_s, slow.ewma_latency_s = 0.2, 1.0
    assert LatencyEWMA().order([fast, slow, new], RNG) == [2, 0, 1]  # unknown = best known, tried first
    new.in_flight = 1  # its first request is out: it pays the in-flight penalty like any other
    assert LatencyEWMA().order([fast, slow, new], RNG) == [0, 2, 1]
    assert LatencyEWMA().order(states(2, 0, 1), RNG) == [1, 2, 0]  # nothing known: least outstanding


def test_latency_ewma_does_not_starve_a_deployment_on_its_first_sample() -> None:
    """One slow first request (connection setup) must not keep a deployment out: it counts as unknown until a
    second sample replaces that one."""
    clock = FakeClock()
    warm, cold = DeploymentState("warm", clock=clock), DeploymentState("cold", clock=clock)
    for state, seconds in ((warm, 0.2), (warm, 0.2), (cold, 3.0)):
        started = state.begin()
        clock.now += seconds
        state.end(started, ok=True)
    assert LatencyEWMA().order([warm, cold], RNG) == [1, 0]  # cold's one sample is provisional: tried again
    started = cold.begin()
    clock.now += 0.1
    cold.end(started, ok=True)
    assert cold.ewma_latency_s == pytest.approx(0.1)
    assert LatencyEWMA().order([warm, cold], RNG) == [1, 0]  # now known, and faster
    warm.ewma_latency_s = 0.05
    assert LatencyEWMA().order([warm, cold], RNG) == [0, 1]


def test_latency_ewma_settles_on_the_fast_deployment_in_simulation() -> None:
    clock = FakeClock()
    pool = [DeploymentState("fast", clock=clock), DeploymentState("slow", clock=clock)]
    service = {"fast": 0.1, "slow": 1.0}
    strategy = LatencyEWMA()
    picks: Counter[str] = Counter()
    for _ in range(200):  # one request at a time: nothing in flight, so pure latency decides
        s = pool[strategy.order(pool, RNG)[0]]
        started = s.begin()
        clock.now += service[s.key]
        s.end(started, ok=True)
        picks[s.key] += 1
    assert picks["slow"] <= 2 and picks["fast"] >= 198


def test_power_of_two_with_a_seeded_rng() -> None:
    s = states(5, 0, 3, 1, 9)
    rng = random.Random(7)
    a, b = random.Random(7).sample(range(5), 2)
    expected_first = min(a, b, key=lambda i: (s[i].in_flight, i))
    order = PowerOfTwo().order(s, rng)
    assert order[0] == expected_first
    rest = [i for i in range(5) if i != expected_first]
    assert order[1:] == sorted(rest, key=lambda i: (s[i].in_flight, i))
    # the same seed gives the same order
    assert PowerOfTwo().order(s, random.Random(7)) == order


def test_power_of_two_never_picks_the_most_loaded() -> None:
    s = states(0, 1, 2, 3, 100)
    rng = random.Random(3)
    firsts = Counter(PowerOfTwo().order(s, rng)[0] for _ in range(2000))
    assert 4 not in firsts  # it loses every pair it is drawn in
    assert firsts[0] > firsts[1] > firsts[2] > firsts[3] > 0  # but it is not simply least outstanding
    assert PowerOfTwo().order(states(4), rng) == [0] and PowerOfTwo().order([], rng) == []


def test_power_of_two_breaks_ties_at_random() -> None:
    """Idle, equal deployments: each is chosen about as often, the last one included (not by index)."""
    p2, rng = PowerOfTwo(), random.Random(11)
    firsts = Counter(p2.order(states(0, 0, 0), rng)[0] for _ in range(3000))
    assert all(900 < firsts[i] < 1100 for i in range(3)), firsts
    heavier = states(0, 0, weights=(1.0, 2.0))  # a tie on load still goes to the heavier one
    assert {p2.order(heavier, rng)[0] for _ in range(50)} == {1}


def test_load_signal_scores() -> None:
    a, b, c, d = states(0, 0, 0, 4)
    a.apply_signals(running=10.0, waiting=0.0, kv_cache_usage=0.5, now=0.0)  # 1 + 1 = 2
    b.apply_signals(running=2.0, waiting=2.0, kv_cache_usage=0.1, now=0.0)  # 2 + 0.2 + 0.2 = 2.4
    c.apply_signals(running=0.0, waiting=0.0, kv_cache_usage=0.95, now=0.0)  # 1.9
    # d: no signals, 4 in flight -> 2.0; ties with a on score, a has fewer in flight
    assert [LoadSignal.score(s) for s in (a, b, c, d)] == pytest.approx([2.0, 2.4, 1.9, 2.0])
    assert LoadSignal().order([a, b, c, d], RNG) == [2, 0, 3, 1]


def test_load_signal_partial_signals_and_in_flight_fallback() -> None:
    a, b = states(1, 0)
    a.apply_signals(running=None, waiting=3.0, kv_cache_usage=None, now=0.0)  # 3 + 0.5
    assert LoadSignal.score(a) == 3.5
    assert LoadSignal().order([a, b], RNG) == [1, 0]
    assert LoadSignal().order(states(3, 1, 2), RNG) == [1, 2, 0]  # no signals anywhere: least outstanding


def test_config_names_every_strategy():
    from config.schema import STRATEGY_NAMES

    assert tuple(STRATEGIES) == STRATEGY_NAMES
