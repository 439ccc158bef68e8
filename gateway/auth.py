"""Static Bearer API keys, compared in constant time; a Litestar guard that puts the caller's Principal on the
request (static keys are admins for now; with auth off every caller is the anonymous admin)."""

from __future__ import annotations

import hmac

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler

from policies.context import ANONYMOUS, Principal
from protocol.errors import AuthenticationError

__all__ = ["PRINCIPAL", "KeyCheck", "principal_of"]

PRINCIPAL = "pointsman.principal"  # the ASGI scope key the guard writes


def principal_of(scope: dict) -> Principal:
    return scope.get(PRINCIPAL, ANONYMOUS)


class KeyCheck:
    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]
        self._principals = [Principal(key_id=f"static-{i}") for i in range(len(keys))]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def principal(self, header: str | None) -> Principal | None:
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        given = token.strip().encode()
        found = None
        for key, principal in zip(self._keys, self._principals, strict=True):
            # every key is compared, so timing doesn't tell which one matched
            if hmac.compare_digest(given, key):
                found = principal
        return found

    def allows(self, header: str | None) -> bool:
        return self.principal(header) is not None

    def __call__(self, connection: ASGIConnection, _: BaseRouteHandler) -> None:
        principal = self.principal(connection.headers.get("authorization"))
        if principal is None:
            raise AuthenticationError(
                "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
            )
        connection.scope[PRINCIPAL] = principal  # type: ignore[literal-required]
