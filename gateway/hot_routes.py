"""The generation routes as Litestar ASGI handlers: Litestar still runs their guards and renders their errors, but a
request skips the HTTP handler's machinery (kwargs and signature models, an exit stack, the response pipeline):
16-26 us of the ~100 us a request cost in process without policies (bench/RESULTS.md), and, through
`route_directly`, the router's path lookup. Each reads its body as Litestar's Request does; its OpenAPI operation,
which Litestar leaves out for ASGI handlers, is added by `document`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from litestar import Litestar
from litestar._asgi.utils import is_valid_host, wrap_in_exception_handler
from litestar.connection import ASGIConnection
from litestar.exceptions import ClientException, MethodNotAllowedException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.handlers import ASGIRouteHandler, asgi
from litestar.openapi.spec import OpenAPI, Operation, PathItem
from litestar.routes import ASGIRoute
from litestar.types import ASGIApp, Receive, Scope, Send
from litestar.utils.scope.state import ScopeState

from gateway.request_id import request_id_of

__all__ = ["HotRoute", "document", "hot_route", "read_body", "route_directly"]

Answer = Callable[[Scope, Receive, bytes], Awaitable[ASGIApp]]


@dataclass(frozen=True, slots=True)
class HotRoute:
    """A generation route's handler and the OpenAPI operation it stands for."""

    handler: ASGIRouteHandler
    path: str  # under its router's path
    operation: Operation


def hot_route(path: str, name: str, summary: str, operation: type[Operation], answer: Answer) -> HotRoute:
    """POST `path` answered by `answer(scope, receive, body)` (no Litestar Request made: ~100 bytecodes a request);
    OPTIONS and other methods are answered as Litestar
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
        response = await answer(scope, receive, body)
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


def route_directly(app: Litestar, routes: Sequence[HotRoute]) -> None:
    """Let a request for one of `routes`' exact paths skip Litestar's router and route layer (path normalising,
    a cached trie lookup, a scope copy) on its way from Litestar's exception middleware to the handler: -9 us of
    gateway CPU a request through wrk, +9% c16 RPS without policies. What the router would decide for such a
    path is decided the same way: its exception handlers, its guards (given the handler itself, where Litestar
    hands each guard a copy), a 400 for an invalid Host. Any other path, a trailing slash or a root_path goes
    through the router as before; a HEAD there as a GET (RFC 9110 9.3.2), where Litestar answers 405 for a route
    with no HEAD handler: the app sees GET, and the server, whose scope still says HEAD, sends no body."""
    router = app.asgi_router
    names = {route.handler.name for route in routes}
    # the handlers as registered, by their full paths, each with its layers' exception handlers and guards:
    # Litestar's router resolves the exception handlers again on every request (a walk up the layers and a dict
    # merge), though a handler's layers never change once the app is built (resolved once here: -4 to -19 us of CPU
    # a request without policies, in process, bench/policy_chain.py's drive, 3 interleaved rounds)
    direct = {route.path: (route.route_handler, route.route_handler.resolve_exception_handlers(),
                           route.route_handler.resolve_guards())
              for route in app.routes if isinstance(route, ASGIRoute) and route.route_handler.name in names}

    async def dispatch(scope: Scope, receive: Receive, send: Send) -> None:
        found = direct.get(scope["path"]) if scope["type"] == "http" else None
        if found is None or scope.get("root_path"):
            if scope.get("method") == "HEAD":  # answered as GET: the server writes the head, never the body
                return await router({**scope, "method": "GET"}, receive, send)  # type: ignore[typeddict-item]
            return await router(scope, receive, send)
        handler, exception_handlers, guards = found
        state = ScopeState.from_scope(scope)
        for name, value in scope["headers"]:
            if name == b"host":
                if not is_valid_host(value):
                    state.exception_handlers = router._app_exception_handlers
                    raise ClientException("Invalid host header")
                break
        state.exception_handlers = exception_handlers
        scope["path_params"] = {}
        scope["route_handler"] = handler
        scope["path_template"] = scope["path"]
        if guards:
            connection: ASGIConnection = ASGIConnection(scope=scope, receive=receive)
            for guard in guards:
                await guard(connection, handler)
        await handler.fn(scope, receive, send)

    app.asgi_handler = wrap_in_exception_handler(dispatch)
