"""A revocation announced while Redis stalls is retried in the background: the other replica stops accepting the
key soon after Redis answers again, not when its cache entry ends (cache_ttl_s)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from config.schema import AuthConfig
from gateway.auth import Authenticator
from policies.api_keys import KeySpec, KeyStore
from policies.database import migrate, open_engine
from policies.redis_state import RedisStore
from protocol.errors import AuthenticationError
from tests.conftest import free_port
from tests.policies.conftest import eventually
from tests.services import RedisServer

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _refused(auth: Authenticator, bearer: str) -> bool:
    try:
        await auth.principal(bearer)
    except AuthenticationError:
        return True
    return False


async def test_revocation_during_a_redis_stall_reaches_the_other_replica(tmp_path) -> None:
    redis = RedisServer(free_port(), tmp_path / "redis.log")
    redis.start()
    engine = open_engine(f"sqlite+aiosqlite:///{tmp_path}/keys.db")
    await migrate(engine)
    keys = KeyStore(engine)
    config = AuthConfig(api_keys=["static"], cache_ttl_s=30)
    first, second = RedisStore(redis.url), RedisStore(redis.url)
    a, b = Authenticator(config, keys, first), Authenticator(config, keys, second)
    stopped = False
    try:
        b.start()
        await eventually(lambda: b._generation > 0)  # b has subscribed (which forgets everything once)
        described, secret = await keys.create(KeySpec(), None)
        bearer = f"Bearer {secret}"
        assert not await _refused(b, bearer)  # cached on b for 30 s
        await keys.revoke(described["id"])
        heard = b._generation

        os.kill(redis.proc.pid, signal.SIGSTOP)  # Redis stalls: the announcement's first try fails
        stopped = True
        started = time.monotonic()
        await a.revoked(described["id"])
        assert time.monotonic() - started < 2.0  # the DELETE is not held up by the retries
        os.kill(redis.proc.pid, signal.SIGCONT)
        stopped = False

        assert await _refused(a, bearer)
        await eventually(lambda: b._generation > heard, within_s=10.0)  # heard, long before cache_ttl_s
        assert await _refused(b, bearer)
    finally:
        if stopped:
            os.kill(redis.proc.pid, signal.SIGCONT)
        await a.aclose()
        await b.aclose()
        await first.aclose()
        await second.aclose()
        await engine.dispose()
        redis.kill()
