"""The generation routes as Litestar ASGI handlers: Litestar still routes them, runs their guards and renders their
errors, but a request skips the HTTP handler's machinery (kwargs and signature models, an exit stack, the response
pipeline): 16-26 us of the ~100 us a request cost in process without policies (bench/RESULTS.md). Each reads its
body as Litestar's Request does; its OpenAPI operation, which Litestar leaves out for ASGI handlers, is added by
`document`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from litestar import Request
from litestar.exceptions import ClientException, MethodNotAllowedException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.handlers import ASGIRouteHandler, asgi
from litestar.openapi.spec import OpenAPI, Operation, PathItem
from litestar.types import ASGIApp, Receive, Scope, Send

from gateway.request_id import request_id_of

__all__ = ["HotRoute", "document", "hot_route", "read_body"]

Answer = Callable[[Request, bytes], Awaitable[ASGIApp]]


@dataclass(frozen=True, slots=True)
class HotRoute:
    """A generation route's handler and the OpenAPI operation it stands for."""

    handler: ASGIRouteHandler
    path: str  # under its router's path
    operation: Operation


def hot_route(path: str, name: str, summary: str, operation: type[Operation], answer: Answer) -> HotRoute:
    """POST `path` answered by `answer(request, body)`; OPTIONS and other methods are answered as Litestar
    answers them for a POST-only route (204 with Allow, 405)."""

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]  # type: ignore[typeddict-item]
        if method != "POST":
            if method == "OPTIONS":  # what Litestar answers for an HTTP route it was not given an OPTIONS handler for
                await send({"type": "http.response.start", "status": 204, "headers": [
                    (b"allow", b"OPTIONS, POST"), (b"x-request-id", request_id_of(scope).encode())]})
                await send({"type": "http.response.body", "body": b""})
                return
            raise MethodNotAllowedException(headers={"allow": "POST, OPTIONS"})  # Litestar's own, for such a route
        body = await read_body(scope, receive, scope["litestar_app"].request_max_body_size)  # type: ignore[typeddict-item]
        if body is None:
            return  # the client left while sending: there is no one to answer
        response = await answer(Request(scope, receive, send), body)
        await response(scope, receive, send)

    handle.__name__ = handle.__qualname__ = name
    documented = operation(summary=summary, operation_id=name, deprecated=False)
    return HotRoute(asgi(path, name=name, copy_scope=False)(handle), path, documented)


async def read_body(scope: Scope, receive: Receive, limit: int | None) -> bytes | None:
    """The request's whole body, or None when the client disconnects first. Over `limit` bytes, announced or
    received (a chunked body has no content-length), raises RequestEntityTooLarge (413)."""
    most = float("inf") if limit is None else limit
    for key, value in scope["headers"]:  # type: ignore[typeddict-item]
        if key == b"content-length":
            try:
                announced = int(value)
            except ValueError:
                raise ClientException(f"Invalid content-length: {value.decode('latin-1')!r}") from None
            if announced > most:
                raise RequestEntityTooLarge
            break
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")  # type: ignore[union-attr]
        if chunk:
            size += len(chunk)
            if size > most:
                raise RequestEntityTooLarge
            chunks.append(chunk)
        if not message.get("more_body", False):  # type: ignore[union-attr]
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def document(schema: OpenAPI, prefix: str, routes: Sequence[HotRoute]) -> None:
    """Add each route's POST operation to the app's OpenAPI document."""
    paths = schema.paths if schema.paths is not None else {}
    for route in routes:
        paths[prefix + route.path] = PathItem(post=route.operation)
    schema.paths = paths
