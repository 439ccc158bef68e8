"""Who is calling: Bearer API keys (static, bootstrap, and the database's) checked once per key and cached in
process, revocations announced to every replica over the state store's pub/sub, and Litestar guards per role."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler

from config.schema import AuthConfig
from policies.api_keys import KeyStore, digest
from policies.context import ANONYMOUS, Principal, Role
from policies.state import StateStore
from protocol.errors import AuthenticationError, PermissionDenied

__all__ = ["ADMIN", "ANALYTICS", "PRINCIPAL", "READ", "USE", "Authenticator", "credentials", "principal_of"]

log = logging.getLogger("pointsman.auth")

PRINCIPAL = "pointsman.principal"  # the ASGI scope key the guards write
CHANNEL = "keys:revoked"  # a revoked key's id, published to every replica

# which roles each family of endpoints admits
USE = frozenset({"admin", "user"})  # completions, embeddings, /v1/route, feedback
READ = frozenset({"admin", "user", "readonly"})  # models, the caller's own usage
ANALYTICS = frozenset({"admin", "readonly"})  # GET analytics, /metrics
ADMIN = frozenset({"admin"})  # everything else under /admin

_WHAT = {USE: "completions and embeddings", READ: "this endpoint", ANALYTICS: "analytics and metrics",
         ADMIN: "the admin API"}
_NEGATIVE_TTL_S = 5.0  # an unknown key is remembered this long, so guessing does not reach the database each time
_CACHE_MAX = 100_000
_RETRY_INITIAL_S, _RETRY_MAX_S = 0.1, 2.0  # a failed revocation announcement is retried this often, doubling

Guard = Callable[[ASGIConnection, BaseRouteHandler], Awaitable[None]]


def principal_of(scope: dict) -> Principal:
    return scope.get(PRINCIPAL, ANONYMOUS)


def credentials(connection: ASGIConnection) -> str | None:
    """The `Authorization` header, or Anthropic's `x-api-key` as a Bearer one (the anthropic SDK sends that)."""
    headers = connection.headers
    header = headers.get("authorization")
    if header is None and (key := headers.get("x-api-key")):
        header = f"Bearer {key}"
    return header


def _loopback(connection: ASGIConnection) -> bool:
    client = connection.scope.get("client")
    if not client:
        return False
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False


class Authenticator:
    """Maps a Bearer token to its Principal. Static `auth.api_keys` and the bootstrap admin key are admins, known
    at start; any other token is looked up by its SHA-256 in the database's `api_keys` once, then cached for
    `auth.cache_ttl_s` (a key's expiry ends its entry sooner). A revoked key's id is published on the state
    store; every replica drops that key's entry when it hears it, and drops every entry when its subscription
    was lost (messages may have been missed). A lookup that raced a revocation is not cached."""

    def __init__(self, config: AuthConfig, keys: KeyStore | None, state: StateStore,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = config.enabled
        self.keys, self.state, self.clock = keys, state, clock
        self.ttl_s = config.cache_ttl_s
        static = [*config.api_keys, *([config.admin_key] if config.admin_key else [])]
        self._static = {digest(k): Principal(key_id="admin" if k == config.admin_key else f"static-{i}")
                        for i, k in enumerate(static)}
        # digest -> (Principal, or why the key does not work; monotonic time the entry ends)
        self._cache: dict[str, tuple[Principal | str, float]] = {}
        self._generation = 0  # bumped by every revocation: a lookup that started before one is not cached
        self._listener: asyncio.Task | None = None
        self._announcing: set[asyncio.Task] = set()  # revocations being announced again after a failed try

    # ---- checking a token

    async def principal(self, header: str | None) -> Principal:
        """The caller behind an `Authorization` header; raises AuthenticationError saying why when there is none."""
        scheme, _, token = (header or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("Missing API key. Send it as 'Authorization: Bearer <key>'.")
        key = digest(token)
        found = self._static.get(key)
        if found is not None:
            return found
        entry = self._cache.get(key)
        if entry is None or entry[1] <= self.clock():
            entry = await self._look_up(key)
        if isinstance(entry[0], str):
            raise AuthenticationError(entry[0])
        return entry[0]

    async def _look_up(self, key: str) -> tuple[Principal | str, float]:
        now = self.clock()
        generation = self._generation
        stored = await self.keys.find(key) if self.keys is not None else None
        entry: tuple[Principal | str, float]
        if stored is None:
            entry = ("Incorrect API key provided.", now + _NEGATIVE_TTL_S)
        elif stored.revoked:
            entry = (f"The API key {stored.principal.key_id} has been revoked.", now + self.ttl_s)
        else:
            ends = now + self.ttl_s
            if stored.expires_at is not None:
                left = (stored.expires_at - datetime.now(UTC)).total_seconds()
                if left <= 0:
                    entry = (f"The API key {stored.principal.key_id} expired at "
                             f"{stored.expires_at.isoformat().replace('+00:00', 'Z')}.", now + self.ttl_s)
                    return self._keep(key, entry, generation)
                ends = min(ends, now + left)
            entry = (stored.principal, ends)
        return self._keep(key, entry, generation)

    def _keep(self, key: str, entry: tuple[Principal | str, float], generation: int
              ) -> tuple[Principal | str, float]:
        if generation == self._generation:  # else a revocation arrived meanwhile: answer, but do not remember
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key] = entry
        return entry

    # ---- guards

    def guard(self, roles: frozenset[Role]) -> Guard:
        """A guard admitting `roles`: 401 without a working key, 403 `permission_denied` for another role. With
        auth off everyone is the anonymous admin (the routes then carry no guard at all; see `guards`)."""
        what = _WHAT.get(roles, "this endpoint")

        async def check(connection: ASGIConnection, _: BaseRouteHandler) -> None:
            principal = await self.principal(credentials(connection))
            if principal.role not in roles:
                raise PermissionDenied(f"A key with the role '{principal.role}' may not use {what}; it needs "
                                       f"one of: {', '.join(sorted(roles))}.")
            connection.scope[PRINCIPAL] = principal  # type: ignore[literal-required]

        return check

    def guards(self, roles: frozenset[Role]) -> list[Guard]:
        """The guards for a family of public routes: none when auth is off (nothing to check, nothing to pay)."""
        return [self.guard(roles)] if self.enabled else []

    def admin_guard(self, roles: frozenset[Role] = ADMIN) -> Guard:
        """For /admin: with auth on, a key with one of `roles`; with auth off, callers on this machine only."""
        if self.enabled:
            return self.guard(roles)

        async def loopback_only(connection: ASGIConnection, _: BaseRouteHandler) -> None:
            if not _loopback(connection):
                raise AuthenticationError("With auth off the admin API answers only callers on this machine; set "
                                          "auth.api_keys or POINTSMAN_ADMIN_KEY to reach it from elsewhere.")

        return loopback_only

    # ---- revocation across replicas

    async def revoked(self, key_id: str) -> None:
        """Forget `key_id` here at once, and tell the other replicas: one try now (bounded by the store's timeout);
        if it fails, retries in the background until one succeeds or `cache_ttl_s` has passed (by then every
        replica's entry for the key has ended anyway)."""
        self._forget(key_id)
        try:
            await self.state.publish(CHANNEL, key_id.encode())
        except Exception as exc:
            log.warning("auth: could not announce the revocation of %s (%s); retrying for up to auth.cache_ttl_s "
                        "(%g s)", key_id, exc, self.ttl_s)
            task = asyncio.get_running_loop().create_task(self._announce(key_id, self.clock() + self.ttl_s))
            self._announcing.add(task)
            task.add_done_callback(self._announcing.discard)

    async def _announce(self, key_id: str, until: float) -> None:
        delay = _RETRY_INITIAL_S
        while self.clock() < until:
            await asyncio.sleep(min(delay, max(until - self.clock(), 0.0)))
            delay = min(delay * 2, _RETRY_MAX_S)
            try:
                await self.state.publish(CHANNEL, key_id.encode())
            except Exception as exc:
                log.debug("auth: announcing the revocation of %s failed again (%s)", key_id, exc)
                continue
            log.warning("auth: revocation of %s announced after retrying", key_id)
            return
        log.warning("auth: could not announce the revocation of %s within %g s; every replica's cache entry for it "
                    "has ended since", key_id, self.ttl_s)

    def _forget(self, key_id: str | None) -> None:
        self._generation += 1
        if key_id is None:
            self._cache.clear()
            return
        for key in [k for k, (who, _) in self._cache.items() if isinstance(who, Principal) and who.key_id == key_id]:
            del self._cache[key]

    def start(self) -> None:
        if self.keys is not None and self.enabled:
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        while True:
            try:
                async with self.state.subscribe(CHANNEL) as messages:
                    self._forget(None)  # whatever was missed while not subscribed: look every key up again
                    async for message in messages:
                        self._forget(message.decode())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is down: entries still end within the TTL; subscribe again
                log.debug("auth: revocation subscription lost (%s)", exc)
            await asyncio.sleep(1.0)

    async def aclose(self) -> None:
        for task in [*self._announcing, *([self._listener] if self._listener is not None else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
