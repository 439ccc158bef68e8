"""The Authenticator on a real SQLite key table and an in-process state store: caching, expiry, revocation (its
own and another replica's), and a lookup racing a revocation."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from config.schema import AuthConfig
from gateway.auth import Authenticator
from policies.api_keys import KeyRateLimit, KeySpec, KeyStore
from policies.database import migrate, open_engine
from policies.state import LocalStore
from protocol.errors import AuthenticationError

pytestmark = pytest.mark.asyncio(loop_scope="session")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingStore(KeyStore):
    """The real store, counting the lookups that reached the database."""

    def __init__(self, engine) -> None:  # noqa: ANN001
        super().__init__(engine)
        self.lookups = 0

    async def find(self, key_digest: str):  # noqa: ANN201
        self.lookups += 1
        return await super().find(key_digest)


@pytest.fixture
async def keys(tmp_path):
    engine = open_engine(f"sqlite+aiosqlite:///{tmp_path}/keys.db")
    await migrate(engine)
    yield CountingStore(engine)
    await engine.dispose()


def _bearer(secret: str) -> str:
    return f"Bearer {secret}"


async def test_a_key_is_looked_up_once_then_served_from_the_cache(keys):
    clock = Clock()
    auth = Authenticator(AuthConfig(api_keys=["static"], cache_ttl_s=30), keys, LocalStore(), clock)
    described, secret = await keys.create(KeySpec(role="readonly", team="t9", models=["chat-*"],
                                                  rate_limit=KeyRateLimit(rpm=5)), "admin")
    principal = await auth.principal(_bearer(secret))
    assert (principal.key_id, principal.role, principal.team) == (described["id"], "readonly", "t9")
    assert principal.may_use("chat-a@1.0.0") and not principal.may_use("embed")
    assert principal.rate_limit is not None and principal.rate_limit.match == described["id"]
    await auth.principal(_bearer(secret))
    assert keys.lookups == 1
    clock.now += 31  # the entry ended: looked up again
    await auth.principal(_bearer(secret))
    assert keys.lookups == 2
    # static keys never reach the database; unknown ones are remembered briefly
    assert (await auth.principal("Bearer static")).role == "admin"
    for _ in range(3):
        with pytest.raises(AuthenticationError, match="Incorrect API key"):
            await auth.principal("Bearer pm-unknown")
    assert keys.lookups == 3
    for header in (None, "", "Basic abc", "Bearer "):
        with pytest.raises(AuthenticationError, match="Missing API key"):
            await auth.principal(header)


async def test_expiry_ends_the_cache_entry_early(keys):
    clock = Clock()
    auth = Authenticator(AuthConfig(api_keys=["s"], cache_ttl_s=3600), keys, LocalStore(), clock)
    _, secret = await keys.create(KeySpec(expires_in_s=2), None)
    await auth.principal(_bearer(secret))
    clock.now += 2.5  # before the TTL, past the expiry: looked up again, and the database says it expired
    expired = datetime.now(UTC) + timedelta(seconds=2)
    while datetime.now(UTC) < expired:  # the expiry is wall-clock time in the table
        await asyncio.sleep(0.05)
    with pytest.raises(AuthenticationError, match="expired"):
        await auth.principal(_bearer(secret))


async def test_revocation_here_and_from_another_replica(keys):
    state = LocalStore()  # one store shared by both: its pub/sub stands in for Redis' here
    here = Authenticator(AuthConfig(api_keys=["s"]), keys, state)
    there = Authenticator(AuthConfig(api_keys=["s"]), keys, state)
    there.start()
    try:
        described, secret = await keys.create(KeySpec(), None)
        await here.principal(_bearer(secret))
        await there.principal(_bearer(secret))
        await keys.revoke(described["id"])
        await here.revoked(described["id"])
        with pytest.raises(AuthenticationError, match="revoked"):
            await here.principal(_bearer(secret))
        for _ in range(200):  # the other replica hears it
            try:
                await there.principal(_bearer(secret))
            except AuthenticationError as exc:
                assert "revoked" in exc.message
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the other replica never heard of the revocation")
    finally:
        await there.aclose()


async def test_a_lookup_racing_a_revocation_is_not_cached(keys):
    auth = Authenticator(AuthConfig(api_keys=["s"]), keys, LocalStore())
    described, secret = await keys.create(KeySpec(), None)
    started = asyncio.Event()
    release = asyncio.Event()
    real_find = keys.find

    async def slow_find(key_digest: str):  # noqa: ANN202 - read before the revocation, answered after it
        found = await real_find(key_digest)
        started.set()
        await release.wait()
        return found

    keys.find = slow_find  # type: ignore[method-assign]
    lookup = asyncio.create_task(auth.principal(_bearer(secret)))
    await started.wait()
    await keys.revoke(described["id"])
    await auth.revoked(described["id"])
    release.set()
    assert (await lookup).key_id == described["id"]  # answered from what it read
    keys.find = real_find  # type: ignore[method-assign]
    with pytest.raises(AuthenticationError, match="revoked"):  # but not remembered
        await auth.principal(_bearer(secret))
