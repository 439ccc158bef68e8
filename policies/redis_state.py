"""RedisStore: the StateStore on Redis, one round trip per operation (each read-modify-write is one Lua script)."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Sequence
from typing import TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from policies.redis_pipeline import AutoPipeline
from policies.state import (
    RESERVED,
    SLACK_S,
    RateCharge,
    RateResult,
    Reservation,
    ReserveResult,
    StoreUnavailable,
    Subscription,
    check_keep,
    check_ttl,
)

__all__ = ["RedisStore"]

log = logging.getLogger("pointsman.state")
T = TypeVar("T")
_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)  # OSError covers the builtin TimeoutError too

# KEYS: the counters; ARGV: amount, limit, ttl_ms per key (0: no expiry). Every item is checked before any is
# written (a key named twice against its running total), so the reservation is all or nothing; a counter gets
# its expiry when it has none (new), so items of different periods reset independently.
_RESERVE = """
local pending = {}
for i, key in ipairs(KEYS) do
  local current = pending[key] or tonumber(redis.call('GET', key) or '0')
  local amount, limit = tonumber(ARGV[3 * i - 2]), tonumber(ARGV[3 * i - 1])
  if current + amount > limit then
    return {i, string.format('%.17g', current)}
  end
  pending[key] = current + amount
end
for i, key in ipairs(KEYS) do
  redis.call('INCRBYFLOAT', key, ARGV[3 * i - 2])
  local ttl = tonumber(ARGV[3 * i])
  if ttl > 0 and redis.call('PTTL', key) == -1 then
    redis.call('PEXPIRE', key, ttl)
  end
end
return {0}
"""

# KEYS: the counters; ARGV: the deltas. A counter gone with its period is skipped, never resurrected (a settle
# landing after the reset belongs to the old period): its value comes back nil; one that would go below zero is
# clamped, expiry kept. Returns each counter's value afterwards.
_ADJUST = """
local values = {}
for i, key in ipairs(KEYS) do
  values[i] = false
  if redis.call('EXISTS', key) == 1 then
    local value = tonumber(redis.call('INCRBYFLOAT', key, ARGV[i]))
    if value < 0 then
      redis.call('SET', key, '0', 'KEEPTTL')
      value = 0
    end
    values[i] = string.format('%.17g', value)
  end
end
return values
"""

# policies.state.gcra, line for line, once per bucket, on the server's clock (TIME) so that every replica agrees.
# Times are seconds since 2023-11-14 so that doubles keep sub-microsecond precision; floats travel as strings
# (Redis truncates Lua numbers to integers). KEYS: the buckets' TATs; ARGV[1]: slack_s, then per bucket rate_per_s,
# burst, cost, partial (1/0). Returns {allowed, remaining, retry_after ('-1': never), reset} per bucket.
_RATE = """
local t = redis.call('TIME')
local now = (tonumber(t[1]) - 1700000000) + tonumber(t[2]) / 1000000
local slack = tonumber(ARGV[1])
local results = {}
for i, key in ipairs(KEYS) do
  local at = 4 * i - 2
  local rate, burst, cost = tonumber(ARGV[at]), tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local increment, offset = cost / rate, burst / rate
  local new_tat = tat + increment
  local diff = now - (new_tat - offset)
  if diff < -slack then
    local retry = -diff
    if increment > offset + slack then retry = -1 end
    local remaining = math.min(math.floor(burst), math.max(0, math.floor((offset - (tat - now)) * rate + 1e-6)))
    local reset = tat - now
    if ARGV[at + 3] == '1' and remaining > 0 then
      local drained = tat + remaining / rate
      redis.call('SET', key, string.format('%.17g', drained), 'PX', math.max(1, math.ceil((drained - now) * 1000)))
      reset = drained - now
    end
    results[i] = {0, remaining, string.format('%.17g', retry), string.format('%.17g', reset)}
  else
    redis.call('SET', key, string.format('%.17g', new_tat), 'PX', math.max(1, math.ceil((new_tat - now) * 1000)))
    local remaining = math.min(math.floor(burst), math.max(0, math.floor(diff * rate + 1e-6)))
    results[i] = {1, remaining, '0', string.format('%.17g', new_tat - now)}
  end
end
return results
"""

# KEYS[1]: the log (a list), KEYS[2]: its total (how many were ever appended); ARGV: append? (1/0), value,
# keep (0: all), ttl_ms (0: none), since. Both keys share one TTL. Values come back as one nested array (a
# Lua unpack of 10,000 values would overflow its stack).
_APPEND = """
local total = tonumber(redis.call('GET', KEYS[2]) or '0')
if ARGV[1] == '1' then
  redis.call('RPUSH', KEYS[1], ARGV[2])
  total = redis.call('INCR', KEYS[2])
  local keep = tonumber(ARGV[3])
  if keep > 0 then redis.call('LTRIM', KEYS[1], -keep, -1) end
  local ttl = tonumber(ARGV[4])
  for _, key in ipairs(KEYS) do
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) else redis.call('PERSIST', key) end
  end
end
local length = redis.call('LLEN', KEYS[1])
local from = math.max(tonumber(ARGV[5]) - (total - length), 0)
if from >= length then return {total, {}} end
return {total, redis.call('LRANGE', KEYS[1], from, -1)}
"""
_TOTAL = "#total"  # the suffix of a log's total counter


def _ms(ttl_s: float) -> int:
    """A TTL in whole milliseconds, at least 1 (PX 0 is an error; rounding up never expires a key early)."""
    return max(1, math.ceil(ttl_s * 1000))


class RedisStore:
    """The StateStore on Redis (redis-py asyncio, every key and channel under `prefix`).

    Each operation is one command or one Lua script (EVALSHA), sent through an AutoPipeline: the operations of
    every request issued in the same event-loop turn share one write and one round trip, on at most
    `connections` dedicated connections. A batch that takes longer than `timeout_s` (connecting included) raises
    StoreUnavailable and is never retried (a script may have run). Pub/sub subscriptions hold a connection
    each from a pool of at most `max_connections`, waited for up to `timeout_s`. Connections are remade on the
    next call once Redis is back; the outage is logged once when it starts and once when it ends.
    """

    __slots__ = ("_adjust", "_append", "_down", "_pipe", "_rate", "_redis", "_reserve", "_where", "prefix")

    def __init__(
        self, url: str, *, prefix: str = "pointsman:", timeout_s: float = 0.5, max_connections: int = 64,
        connections: int = 4,
    ) -> None:
        self.prefix = prefix
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,  # waiting for a free connection counts against the same bound
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # one immediate retry on a broken connection: after a Redis restart every pooled socket is stale and
            # fails before its command reaches any server. Timeouts are never retried: the command may have run.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._redis = Redis.from_pool(pool)  # pub/sub only: every other command goes through the pipeline
        self._pipe = AutoPipeline(pool, connections=connections, timeout_s=timeout_s)
        kwargs = pool.connection_kwargs
        self._where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"
        self._down = False
        self._reserve = self._pipe.script(_RESERVE)
        self._adjust = self._pipe.script(_ADJUST)
        self._rate = self._pipe.script(_RATE)
        self._append = self._pipe.script(_APPEND)

    async def get(self, key: str) -> bytes | None:
        return await self._call(self._pipe.call("GET", self.prefix + key))

    async def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        check_ttl(ttl_s)
        expiry = () if ttl_s is None else ("PX", _ms(ttl_s))
        await self._call(self._pipe.call("SET", self.prefix + key, value, *expiry))

    async def delete(self, key: str) -> None:
        await self._call(self._pipe.call("DEL", self.prefix + key, self.prefix + key + _TOTAL))

    async def append(
        self, key: str, value: bytes | None = None, ttl_s: float | None = None, *, keep: int | None = None,
        since: int = 0,
    ) -> tuple[int, list[bytes]]:
        """A bounded log (see StateStore): a list and its total counter (`KEY#total`), one Lua script."""
        check_ttl(ttl_s)
        check_keep(keep)
        ttl_ms = 0 if ttl_s is None else _ms(ttl_s)
        args = [int(value is not None), b"" if value is None else value, keep or 0, ttl_ms, since]
        keys = [self.prefix + key, self.prefix + key + _TOTAL]
        total, values = await self._call(self._pipe.evalsha(self._append, keys, args))
        return int(total), list(values)

    async def reserve(self, items: Sequence[Reservation]) -> ReserveResult:
        if not items:
            return RESERVED
        args: list[str | int] = []
        for item in items:
            check_ttl(item.ttl_s)
            ttl_ms = 0 if item.ttl_s is None else _ms(item.ttl_s)
            args += [repr(float(item.amount)), repr(float(item.limit)), ttl_ms]
        keys = [self.prefix + item.key for item in items]
        failed, *current = await self._call(self._pipe.evalsha(self._reserve, keys, args))
        if not failed:
            return RESERVED
        item = items[failed - 1]
        return ReserveResult(False, failed - 1, float(current[0]), float(item.limit))

    async def adjust(self, items: Sequence[tuple[str, float]]) -> list[float | None]:
        """Add deltas; an expired counter is skipped and a negative result is clamped at zero (see StateStore)."""
        if not items:
            return []
        keys = [self.prefix + key for key, _ in items]
        values = await self._call(self._pipe.evalsha(self._adjust, keys, [repr(float(delta)) for _, delta in items]))
        return [None if value is None else float(value) for value in values]

    async def counter(self, key: str) -> float:
        value = await self._call(self._pipe.call("GET", self.prefix + key))
        return 0.0 if value is None else float(value)

    async def rate(self, key: str, rate_per_s: float, burst: float, cost: float = 1.0) -> RateResult:
        return (await self.rate_many([RateCharge(key, rate_per_s, burst, cost)]))[0]

    async def rate_many(self, charges: Sequence[RateCharge]) -> list[RateResult]:
        if not charges:
            return []
        args: list[str | int] = [repr(SLACK_S)]
        for charge in charges:
            args += [repr(float(charge.rate_per_s)), repr(float(charge.burst)), repr(float(charge.cost)),
                     int(charge.partial)]
        keys = [self.prefix + charge.key for charge in charges]
        replies = await self._call(self._pipe.evalsha(self._rate, keys, args))
        return [RateResult(bool(allowed), int(remaining), math.inf if retry == b"-1" else float(retry), float(reset))
                for allowed, remaining, retry, reset in replies]

    async def publish(self, channel: str, message: bytes) -> None:
        await self._call(self._pipe.call("PUBLISH", self.prefix + channel, message))

    def subscribe(self, channel: str) -> Subscription:
        return _RedisSubscription(self, self.prefix + channel)

    async def aclose(self) -> None:
        await self._pipe.aclose()
        await self._redis.aclose()

    async def _call(self, call: Awaitable[T]) -> T:
        """Await one Redis call, turning connection failures into StoreUnavailable and logging up/down edges."""
        try:
            result = await call
        except _DOWN as exc:
            if not self._down:
                self._down = True
                log.warning("state store down: Redis at %s unreachable (%s)", self._where, exc)
            raise StoreUnavailable(f"Redis at {self._where} unreachable: {exc}") from exc
        if self._down:
            self._down = False
            log.warning("state store back: Redis at %s reachable again", self._where)
        return result


class _RedisSubscription(Subscription):
    """A PubSub on its own pooled connection. After an outage the next `__anext__` reconnects and subscribes
    again (redis-py does both); messages published while it was down are lost, as Redis pub/sub always is."""

    __slots__ = ("_channel", "_closed", "_pubsub", "_store")

    def __init__(self, store: RedisStore, channel: str) -> None:
        self._store, self._channel = store, channel
        self._pubsub: PubSub | None = None
        self._closed = False

    async def __aenter__(self) -> Subscription:
        await self._open()
        return self

    async def __anext__(self) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        pubsub = await self._open()
        while True:
            message = await self._store._call(pubsub.get_message(ignore_subscribe_messages=True, timeout=None))
            if self._closed:
                raise StopAsyncIteration
            if message is not None and message["type"] == "message":
                return message["data"]

    async def aclose(self) -> None:
        self._closed = True
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            await _quietly_close(pubsub)

    async def _open(self) -> PubSub:
        if self._pubsub is None:
            pubsub = self._store._redis.pubsub()
            try:
                await self._store._call(pubsub.subscribe(self._channel))
            except BaseException:
                await _quietly_close(pubsub)
                raise
            self._pubsub = pubsub
        return self._pubsub


async def _quietly_close(pubsub: PubSub) -> None:
    try:
        await pubsub.aclose()
    except _DOWN:
        pass  # the connection is dropped either way
