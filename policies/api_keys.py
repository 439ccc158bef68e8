"""API keys kept in SQL: created with a secret shown once, stored as its SHA-256, listed, revoked and looked up."""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Annotated, Any

import msgspec
import sqlalchemy as sa
from msgspec import Meta
from sqlalchemy.ext.asyncio import AsyncEngine

from config.schema import BudgetConfig, Period, RateLimitConfig
from policies.context import Principal, Role
from policies.database import api_keys, checked, storable
from protocol.errors import BadRequest, NotFound, ServiceUnavailable
from protocol.openai import PositiveInt

__all__ = ["KEY_PREFIX", "KeyBudget", "KeyRateLimit", "KeySpec", "KeyStore", "StoredKey", "digest", "principal_of_row"]

KEY_PREFIX = "pm-"
_SECRET_BYTES = 32  # 256 bits: a digest lookup is then as safe as a constant-time compare of the secret


def digest(secret: str | bytes) -> str:
    """The SHA-256 a key is stored and looked up by (hex). A slow hash would buy nothing for 256 random bits."""
    return hashlib.sha256(secret.encode() if isinstance(secret, str) else secret).hexdigest()


class KeyBudget(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The key's own budget: tokens and/or USD per period, beside the config's budgets."""

    period: Period = "month"
    max_tokens: PositiveInt | None = None
    max_cost_usd: Annotated[float, Meta(gt=0)] | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is None and self.max_cost_usd is None:
            raise ValueError("set max_tokens, max_cost_usd or both")


class KeyRateLimit(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The key's own requests and/or tokens per minute, beside the config's rate limits."""

    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None

    def __post_init__(self) -> None:
        if self.rpm is None and self.tpm is None:
            raise ValueError("set rpm, tpm or both")


class KeySpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of POST /admin/keys."""

    role: Role = "user"
    team: Annotated[str, Meta(min_length=1, max_length=200)] | None = None
    name: Annotated[str, Meta(max_length=200)] | None = None
    models: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["*"])  # globs over model ids
    expires_at: Annotated[datetime, Meta(tz=True)] | None = None  # a time without an offset: a 400 naming it
    expires_in_s: Annotated[int, Meta(ge=1)] | None = None
    budget: KeyBudget | None = None
    rate_limit: KeyRateLimit | None = None

    def __post_init__(self) -> None:
        """BadRequest naming the field (msgspec would wrap a ValueError in a ValidationError naming none)."""
        if self.expires_at is not None and self.expires_in_s is not None:
            raise BadRequest("Set expires_at or expires_in_s, not both.", param="expires_in_s")
        try:  # the expiry is stored in UTC, which ends with the year 9999
            if self.expires_at is not None:
                self.expires_at.astimezone(UTC)
            elif self.expires_in_s is not None:
                datetime.now(UTC) + timedelta(seconds=self.expires_in_s)
        except OverflowError:
            param = "expires_at" if self.expires_at is not None else "expires_in_s"
            raise BadRequest("The key would expire after the year 9999 (UTC).", param=param) from None


@dataclass(frozen=True, slots=True)
class StoredKey:
    """A key as looked up: who it makes the caller, and why it no longer works if it does not."""

    principal: Principal
    expires_at: datetime | None
    revoked: bool


def _decode(text: str | None, kind: type) -> Any:
    return None if text is None else msgspec.json.decode(text, type=kind)


def principal_of_row(row: Any) -> Principal:
    """The Principal a stored key stands for; its own budget and rate limit become `key`-scope ones."""
    budget: KeyBudget | None = _decode(row.budget, KeyBudget)
    limit: KeyRateLimit | None = _decode(row.rate_limit, KeyRateLimit)
    return Principal(
        key_id=row.id,
        role=row.role,
        team=row.team,
        allowed_models=tuple(msgspec.json.decode(row.models, type=list[str])),
        budget=None if budget is None else BudgetConfig(
            scope="key", match=row.id, period=budget.period, max_tokens=budget.max_tokens,
            max_cost_usd=budget.max_cost_usd),
        rate_limit=None if limit is None else RateLimitConfig(scope="key", match=row.id, rpm=limit.rpm,
                                                              tpm=limit.tpm),
    )


def _describe(row: Any) -> dict[str, Any]:
    """A key as the admin API shows it: everything but the secret, which is never stored."""
    return {
        "id": row.id, "object": "api_key", "hint": row.hint, "name": row.name, "role": row.role, "team": row.team,
        "models": msgspec.json.decode(row.models), "budget": _decode(row.budget, dict),
        "rate_limit": _decode(row.rate_limit, dict),
        "expires_at": _iso(row.expires_at), "created_at": _iso(row.created_at), "created_by": row.created_by,
        "revoked_at": _iso(row.revoked_at),
    }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


@contextlib.asynccontextmanager
async def _reached() -> AsyncIterator[None]:
    """A database that cannot be reached is a 503 for the caller (a key's lookup, the admin API), never a 500."""
    try:
        yield
    except (OSError, sa.exc.SQLAlchemyError) as exc:
        raise ServiceUnavailable(f"The API key database cannot be reached: {type(exc).__name__}; try again "
                                 "shortly.") from exc


class KeyStore:
    """The `api_keys` table. Lookups are by digest; the caller caches them (gateway/auth.py). A database that cannot
    be reached is a ServiceUnavailable (503) from every method."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(self, spec: KeySpec, created_by: str | None) -> tuple[dict[str, Any], str]:
        """A new key: its description, and the secret, which exists only in this answer."""
        now = datetime.now(UTC)
        expires = spec.expires_at or (now + timedelta(seconds=spec.expires_in_s) if spec.expires_in_s else None)
        if expires is not None and expires <= now:
            raise BadRequest("expires_at is in the past.", param="expires_at")
        secret = KEY_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)
        values = {
            "id": "key_" + secrets.token_hex(8), "digest": digest(secret), "hint": f"{secret[:7]}...{secret[-4:]}",
            "name": checked(spec.name, api_keys.c.name, "name"), "role": spec.role,
            "team": checked(spec.team, api_keys.c.team, "team"),
            "models": msgspec.json.encode(spec.models).decode(),
            "budget": None if spec.budget is None else msgspec.json.encode(spec.budget).decode(),
            "rate_limit": None if spec.rate_limit is None else msgspec.json.encode(spec.rate_limit).decode(),
            "expires_at": expires, "created_at": now, "created_by": created_by, "revoked_at": None,
        }
        async with _reached(), self.engine.begin() as connection:
            await connection.execute(api_keys.insert().values(**values))
        return _describe(SimpleNamespace(**values)), secret  # described like a stored row

    async def list(self, include_revoked: bool = False) -> list[dict[str, Any]]:
        query = sa.select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        async with _reached(), self.engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        return [_describe(row) for row in rows]

    async def get(self, key_id: str) -> dict[str, Any]:
        if not storable(key_id, api_keys.c.id):  # no such key can exist: 404 without asking the database
            raise NotFound(f"No API key with id {key_id!r}.", param="id")
        async with _reached(), self.engine.connect() as connection:
            row = (await connection.execute(sa.select(api_keys).where(api_keys.c.id == key_id))).first()
        if row is None:
            raise NotFound(f"No API key with id {key_id!r}.", param="id")
        return _describe(row)

    async def revoke(self, key_id: str) -> dict[str, Any]:
        """Mark the key revoked (kept, for the usage rows that name it); revoking twice is a no-op."""
        if not storable(key_id, api_keys.c.id):
            return await self.get(key_id)  # the 404
        async with _reached(), self.engine.begin() as connection:
            await connection.execute(api_keys.update().where(
                (api_keys.c.id == key_id) & api_keys.c.revoked_at.is_(None)).values(revoked_at=datetime.now(UTC)))
        return await self.get(key_id)

    async def find(self, key_digest: str) -> StoredKey | None:
        async with _reached(), self.engine.connect() as connection:
            row = (await connection.execute(sa.select(api_keys).where(api_keys.c.digest == key_digest))).first()
        if row is None:
            return None
        return StoredKey(principal_of_row(row), row.expires_at, row.revoked_at is not None)

