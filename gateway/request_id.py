"""x-request-id on every response: the client's own when it is a short printable token, else a fresh one."""

from __future__ import annotations

import itertools
import os

from litestar.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["REQUEST_ID", "request_id_of", "request_ids"]

REQUEST_ID = "pointsman.request_id"  # the ASGI scope key that holds the request id once it is known
_MAX_LENGTH = 64  # usage_rows.request_id and feedback.request_id are String(64)
# unique without a syscall per request (uuid4 reads os.urandom each time): a random prefix per process and a
# counter, 32 hex characters like a uuid4's
_PREFIX = os.urandom(8).hex()
_COUNTER = itertools.count()


def _given(scope: Scope) -> str | None:
    for key, value in scope["headers"]:
        if key == b"x-request-id":
            given = value.decode("latin-1")
            return given if len(given) <= _MAX_LENGTH and given.isprintable() and given.isascii() else None
    return None


def request_id_of(scope: Scope) -> str:
    """This request's id, decided once and kept in the scope."""
    rid = scope.get(REQUEST_ID)
    if rid is None:
        rid = scope[REQUEST_ID] = _given(scope) or f"{_PREFIX}{next(_COUNTER):016x}"  # type: ignore[literal-required]
    return rid


def request_ids(app: ASGIApp) -> ASGIApp:
    """Litestar middleware for the routes whose responses Litestar builds (the hot routes and the error renderers
    add the header themselves, which spares every completion a wrapped `send`)."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        header = (b"x-request-id", request_id_of(scope).encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(name == b"x-request-id" for name, _ in headers):
                    message["headers"] = [*headers, header]  # type: ignore[typeddict-unknown-key]
            await send(message)

        await app(scope, receive, send_with_id)

    return middleware
