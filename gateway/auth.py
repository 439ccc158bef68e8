"""Static Bearer API keys, compared in constant time; a Litestar guard for the /v1 routes."""

from __future__ import annotations

import hmac

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler

from gateway.errors import AuthenticationError

__all__ = ["KeyCheck"]


class KeyCheck:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def allows(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode()
        ok = False
        for key in self._keys:  # every key is compared, so timing doesn't tell which one matched
            ok |= hmac.compare_digest(given, key)
        return ok

    def __call__(self, connection: ASGIConnection, _: BaseRouteHandler) -> None:
        if self._keys and not self.allows(connection.headers.get("authorization")):
            raise AuthenticationError(
                "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
            )
