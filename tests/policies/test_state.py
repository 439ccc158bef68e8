"""The StateStore contract, run over LocalStore and RedisStore alike; Redis outages; LocalStore's own bounds."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Iterator

import pytest
from redis.asyncio import Redis

from policies.redis_state import RedisStore
from policies.state import LocalStore, RateCharge, Reservation, StateStore, StoreUnavailable, gcra
from tests.conftest import free_port
from tests.policies.conftest import eventually

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the stores' pools live in the fixtures' loop

REDIS_SERVER = "/usr/bin/redis-server"


async def test_get_set_delete(store: StateStore) -> None:
    assert await store.get("k") is None
    await store.set("k", b"v1")
    assert await store.get("k") == b"v1"
    await store.set("k", b"\x00binary\xff")
    assert await store.get("k") == b"\x00binary\xff"
    await store.delete("k")
    assert await store.get("k") is None
    await store.delete("never-set")  # deleting nothing is fine


async def test_append_keeps_a_bounded_log_read_from_a_position(store: StateStore) -> None:
    assert await store.append("log") == (0, [])
    for i in range(5):
        total, _ = await store.append("log", b"v%d" % i, ttl_s=60, keep=3)
        assert total == i + 1
    assert await store.append("log") == (5, [b"v2", b"v3", b"v4"])  # the oldest two were dropped
    assert await store.append("log", since=4) == (5, [b"v4"])
    assert await store.append("log", since=5) == (5, [])  # the cheap check: nothing new
    assert await store.append("log", since=1) == (5, [b"v2", b"v3", b"v4"])  # asked for dropped ones: what is kept
    assert await store.append("log", b"v5", ttl_s=60, keep=3, since=4) == (6, [b"v4", b"v5"])
    assert await store.append("log", b"\x00\xff", since=6) == (7, [b"\x00\xff"])  # no keep, no TTL: grows
    await store.delete("log")
    assert await store.append("log") == (0, [])
    await store.append("short", b"v", ttl_s=0.05)
    await eventually(lambda: _is_empty(store.append("short")))
    with pytest.raises(ValueError):
        await store.append("log", b"v", keep=0)


async def _is_empty(call: Awaitable[tuple[int, list[bytes]]]) -> bool:
    return await call == (0, [])


async def test_values_expire_after_their_ttl(store: StateStore) -> None:
    await store.set("short", b"v", ttl_s=0.05)
    await store.set("long", b"v", ttl_s=60)
    assert await store.get("short") == b"v"
    took = await eventually(lambda: _is_none(store.get("short")))
    assert took >= 0.03
    assert await store.get("long") == b"v"
    with pytest.raises(ValueError):
        await store.set("k", b"v", ttl_s=0)


async def _is_none(call: Awaitable[object]) -> bool:
    return await call is None


async def test_reserve_is_all_or_nothing_across_keys(store: StateStore) -> None:
    items = [Reservation("user", 1.0, 3.0, 60), Reservation("team", 2.0, 6.0, 3600), Reservation("org", 4.0, 9.0)]
    assert (await store.reserve(items)).ok
    assert (await store.reserve(items)).ok  # user 2, team 4, org 8
    refused = await store.reserve(items)  # org would reach 12 > 9: the third fails, nothing is added
    assert (refused.ok, refused.failed, refused.current, refused.limit) == (False, 2, 8.0, 9.0)
    assert [await store.counter(key) for key in ("user", "team", "org")] == [2.0, 4.0, 8.0]
    refused = await store.reserve([Reservation("user", 0.5, 10.0), Reservation("team", 1.5, 5.0)])
    assert (refused.ok, refused.failed, refused.current, refused.limit) == (False, 1, 4.0, 5.0)
    assert await store.counter("user") == 2.0
    assert (await store.reserve([Reservation("user", 1.0, 3.0)])).ok  # reaching the limit exactly is allowed
    assert await store.counter("absent") == 0.0


async def test_reserve_counts_a_key_named_twice_against_its_running_total(store: StateStore) -> None:
    refused = await store.reserve([Reservation("k", 2.0, 3.0), Reservation("k", 2.0, 3.0)])
    assert (refused.ok, refused.failed, refused.current) == (False, 1, 2.0)
    assert await store.counter("k") == 0.0


async def test_concurrent_reserves_never_exceed_the_limit(store: StateStore) -> None:
    results = await asyncio.gather(*(store.reserve([Reservation("budget", 0.25, 10.0, 60)]) for _ in range(200)))
    assert sum(result.ok for result in results) == 40
    assert await store.counter("budget") == 10.0


async def test_counters_reset_when_their_period_ends(store: StateStore) -> None:
    assert (await store.reserve([Reservation("day", 1.0, 1.0, 0.05), Reservation("month", 1.0, 5.0, 60)])).ok
    assert not (await store.reserve([Reservation("day", 1.0, 1.0, 0.05)])).ok
    await eventually(lambda: _counter_is(store, "day", 0.0))
    assert await store.counter("month") == 1.0  # keys of different periods expire independently
    await store.adjust([("day", -1.0)])  # settling after the reset must not leave a negative counter
    refused = await store.reserve([Reservation("day", 2.0, 1.0, 60)])
    assert (refused.ok, refused.current) == (False, 0.0)


async def _counter_is(store: StateStore, key: str, value: float) -> bool:
    return await store.counter(key) == value


async def test_adjust_adds_deltas_and_clamps_at_zero(store: StateStore) -> None:
    assert (await store.reserve([Reservation("a", 2.0, 10.0, 60), Reservation("b", 1.0, 10.0, 60)])).ok
    assert await store.adjust([("a", 0.5), ("b", -0.75)]) == [2.5, 0.25]  # the values afterwards
    assert (await store.counter("a"), await store.counter("b")) == (2.5, 0.25)
    assert await store.adjust([("a", -3.0), ("missing", 1.0), ("b", 0.0)]) == [0.0, None, 0.25]
    assert await store.counter("a") == 0.0
    assert await store.counter("missing") == 0.0  # skipped, not created without its period
    assert await store.adjust([]) == []


async def test_gcra_allows_a_burst_then_refuses_then_recovers(store: StateStore) -> None:
    rate, burst = 20.0, 5.0  # one unit per 50 ms
    results = [await store.rate("rl", rate, burst) for _ in range(5)]
    assert all(result.allowed for result in results)
    assert [result.remaining for result in results] == [4, 3, 2, 1, 0]
    assert 0.2 < results[-1].reset_s <= 0.25 + 1e-6
    refused = await store.rate("rl", rate, burst)
    assert not refused.allowed and refused.remaining == 0
    assert 0.0 < refused.retry_after_s <= 1 / rate + 1e-6
    start = time.monotonic()
    await eventually(lambda: _allowed(store, "rl", rate, burst), within_s=2.0)
    assert time.monotonic() - start >= refused.retry_after_s - 0.01
    assert (await store.rate("other", rate, burst)).remaining == 4  # buckets are per key


async def test_gcra_cost_larger_than_burst_is_never_allowed(store: StateStore) -> None:
    refused = await store.rate("big", 10.0, 2.0, cost=3.0)
    assert not refused.allowed and refused.retry_after_s == math.inf
    allowed = await store.rate("big", 10.0, 2.0, cost=2.0)
    assert allowed.allowed and allowed.remaining == 0
    with pytest.raises(ValueError):
        await store.rate("bad", 0.0, 1.0)


async def test_rate_many_decides_each_charge_in_order_in_one_call(store: StateStore) -> None:
    results = await store.rate_many([
        RateCharge("rpm", 10.0, 2.0),
        RateCharge("tpm", 100.0, 50.0, cost=60.0),  # refused: the others are still charged
        RateCharge("rpm", 10.0, 2.0),  # the same bucket twice: against the first charge
        RateCharge("tpm", 100.0, 50.0, cost=20.0),
    ])
    assert [(r.allowed, r.remaining) for r in results] == [(True, 1), (False, 50), (True, 0), (True, 30)]
    assert await store.rate_many([]) == []
    with pytest.raises(ValueError):
        await store.rate_many([RateCharge("ok", 1.0, 1.0), RateCharge("bad", 1.0, 0.0)])


async def test_rate_partial_charge_drains_what_the_bucket_holds(store: StateStore) -> None:
    assert (await store.rate("drain", 0.001, 100.0, cost=70.0)).remaining == 30
    drained, = await store.rate_many([RateCharge("drain", 0.001, 100.0, cost=50.0, partial=True)])
    assert (drained.allowed, drained.remaining) == (False, 30)  # refused whole, but took the 30 it had
    assert (await store.rate("drain", 0.001, 100.0, cost=1.0)).allowed is False
    empty, = await store.rate_many([RateCharge("drain", 0.001, 100.0, cost=5.0, partial=True)])
    assert (empty.allowed, empty.remaining) == (False, 0)


async def test_rate_remaining_never_exceeds_the_burst(store: StateStore) -> None:
    # 60M tokens a minute: the microsecond of slack is worth a unit here, and must not show up as headroom
    result = await store.rate("fast", 1e6, 1e6, cost=1.0)
    assert result.allowed and 1e6 - 2 <= result.remaining <= 1e6 - 1


async def _allowed(store: StateStore, key: str, rate: float, burst: float) -> bool:
    return (await store.rate(key, rate, burst)).allowed


async def test_publish_subscribe_delivers_in_order(store: StateStore) -> None:
    async with store.subscribe("revoked") as first, store.subscribe("revoked") as second:
        await store.publish("other", b"not for us")
        for i in range(20):
            await store.publish("revoked", f"key-{i}".encode())
        for subscription in (first, second):
            got = [await asyncio.wait_for(anext(subscription), 2) for _ in range(20)]
            assert got == [f"key-{i}".encode() for i in range(20)]
    await store.publish("revoked", b"nobody listens")  # closed subscriptions are gone
    with pytest.raises(StopAsyncIteration):
        await anext(first)


async def test_async_for_ends_when_the_subscription_closes(store: StateStore) -> None:
    subscription = store.subscribe("events")
    received: list[bytes] = []

    async def consume() -> None:
        async for message in subscription:
            received.append(message)
            if message == b"last":
                await subscription.aclose()

    task = asyncio.create_task(consume())
    await eventually(lambda: _published_and_seen(store, received))
    await store.publish("events", b"last")
    await asyncio.wait_for(task, 2)
    assert received[-1] == b"last"


async def _published_and_seen(store: StateStore, received: list[bytes]) -> bool:
    # subscribing lazily (on the first __anext__) races the first publish: publish until one arrives
    await store.publish("events", b"ping")
    return bool(received)


async def test_both_stores_implement_the_protocol() -> None:
    assert isinstance(LocalStore(), StateStore)
    assert isinstance(RedisStore("redis://127.0.0.1:1/0"), StateStore)


async def test_local_store_evicts_least_recently_used_values_by_bytes() -> None:
    store = LocalStore(max_bytes=100)
    await store.set("a", b"x" * 39)  # 40 bytes with its key
    await store.set("b", b"x" * 39)
    assert await store.get("a") is not None  # a is now the most recently used
    await store.set("c", b"x" * 39)
    assert await store.get("b") is None
    assert await store.get("a") is not None and await store.get("c") is not None
    assert store.used_bytes == 80
    await store.set("huge", b"x" * 200)  # larger than the whole store: not kept, evicts nothing
    assert await store.get("huge") is None and store.used_bytes == 80
    await store.set("a", b"")
    assert store.used_bytes == 41


async def test_local_store_gcra_on_a_fake_clock() -> None:
    now = [1000.0]
    store = LocalStore(clock=lambda: now[0])
    for remaining in (2, 1, 0):
        result = await store.rate("k", 1.0, 3.0)
        assert result.allowed and result.remaining == remaining
    refused = await store.rate("k", 1.0, 3.0)
    assert (refused.allowed, refused.retry_after_s, refused.reset_s) == (False, 1.0, 3.0)
    now[0] += 1.0
    assert (await store.rate("k", 1.0, 3.0)).allowed
    now[0] += 10.0  # long idle: the bucket is full again, never more than full
    assert (await store.rate("k", 1.0, 3.0)).remaining == 2
    await store.set("t", b"v", ttl_s=5)
    now[0] += 5.0
    assert await store.get("t") is None


class _RedisServer:
    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def wait_ready(self) -> None:
        async def pong() -> bool:
            client = Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.2, socket_timeout=0.2)
            try:
                return bool(await client.ping())
            except Exception:
                return False
            finally:
                await client.aclose()

        await eventually(pong, within_s=5.0, every_s=0.02)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped server must be able to die
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def redis_server() -> Iterator[_RedisServer]:
    if not os.path.exists(REDIS_SERVER):
        pytest.skip(f"{REDIS_SERVER} not found: cannot test a Redis outage")
    server = _RedisServer(free_port())
    yield server
    server.kill()


async def test_redis_outage_raises_quickly_and_recovers_without_a_new_store(
    redis_server: _RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    redis_server.start()
    store = RedisStore(f"redis://127.0.0.1:{redis_server.port}/0", timeout_s=0.5)
    try:
        await eventually(lambda: _works(store), within_s=5.0, every_s=0.02)
        assert (await store.reserve([Reservation("b", 1.0, 10.0, 60)])).ok
        assert (await store.rate("r", 100.0, 10.0)).allowed
        caplog.set_level(logging.INFO, logger="pointsman.state")
        caplog.clear()
        redis_server.kill()
        for call in (
            lambda: store.get("k"),
            lambda: store.set("k", b"v"),
            lambda: store.reserve([Reservation("b", 1.0, 10.0, 60)]),
            lambda: store.adjust([("b", -1.0)]),
            lambda: store.rate("r", 100.0, 10.0),
            lambda: store.publish("c", b"m"),
        ):
            start = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call()
            assert time.monotonic() - start < 1.0
        redis_server.start()  # same port, empty: the scripts must be loaded again (NOSCRIPT fallback)
        await eventually(lambda: _works(store), within_s=5.0, every_s=0.02)
        assert (await store.reserve([Reservation("b", 1.0, 10.0, 60)])).ok
        await store.adjust([("b", 0.5)])
        assert await store.counter("b") == 1.5
        assert (await store.rate("r", 100.0, 10.0)).allowed
        messages = [r.getMessage() for r in caplog.records if r.name == "pointsman.state"]
        assert sum("down" in m for m in messages) == 1 and sum("back" in m for m in messages) == 1, messages
    finally:
        await store.aclose()


async def _works(store: RedisStore) -> bool:
    try:
        await store.set("probe", b"1")
        return await store.get("probe") == b"1"
    except StoreUnavailable:
        return False


async def test_a_redis_restart_is_transparent_and_a_hung_redis_times_out(redis_server: _RedisServer) -> None:
    redis_server.start()
    await redis_server.wait_ready()
    store = RedisStore(f"redis://127.0.0.1:{redis_server.port}/0", timeout_s=0.3)
    try:
        await asyncio.gather(*(store.set(f"k{i}", b"v") for i in range(8)))  # eight pooled connections
        redis_server.kill()
        redis_server.start()
        await redis_server.wait_ready()
        # every pooled socket is stale now: each call retries once on a fresh connection, nobody sees an error
        assert await asyncio.gather(*(store.get(f"k{i}") for i in range(8))) == [None] * 8
        assert (await store.rate("r", 100.0, 10.0)).allowed
        redis_server.signal(signal.SIGSTOP)  # accepts connections, answers nothing
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.reserve([Reservation("b", 1.0, 10.0, 60)])
        assert time.monotonic() - start < 1.0
        redis_server.signal(signal.SIGCONT)
        await eventually(lambda: _works(store), within_s=5.0, every_s=0.02)
    finally:
        await store.aclose()


async def test_remaining_units_match_the_clamped_floor_they_stand_for() -> None:
    """gcra counts the units left with branches instead of min/max/floor: the same whole units for every fill,
    fraction and clamp, allowed or refused."""
    now = 1000.0
    for rate, burst in ((1666.6, 100000.0), (1 / 60, 1), (20.0, 5.5), (20.0, 4), (1e6, 3.0)):
        for held_s in (-5.0, 0.0, 1e-9, 0.0006, 0.2, 0.5, 3.3, 59.99, 60.0, 1e9):  # how far the TAT is past now
            for cost in (0.0, 0.5, 1.0, 3.0, burst):
                tat = now + held_s
                _, result = gcra(tat, now, rate, burst, cost)
                start = max(tat, now)
                seconds = (now - (start + cost / rate - burst / rate) if result.allowed
                           else burst / rate - (start - now))
                expected = min(math.floor(burst), max(0, math.floor(seconds * rate + 1e-6)))
                assert result.remaining == expected, (rate, burst, held_s, cost, result)
                assert type(result.remaining) is int


async def test_a_charge_costing_another_amount_is_that_charge_unchecked() -> None:
    one = RateCharge("rl:0:k:tpm", 1000 / 60, 1000)
    assert one.costing(37) == RateCharge("rl:0:k:tpm", 1000 / 60, 1000, 37)
    assert one.costing(5, partial=True) == RateCharge("rl:0:k:tpm", 1000 / 60, 1000, 5, True)
    assert one.cost == 1.0 and not one.partial  # the template itself is untouched
    with pytest.raises(ValueError):  # the checked constructor still refuses what costing never gets
        RateCharge("rl:0:k:tpm", 1000 / 60, 1000, -1)
