"""The admin API: load and unload local models, reload the config. Loopback callers or the static keys only."""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from litestar import Request, Router, post
from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from litestar.params import FromPath

from gateway.auth import KeyCheck
from gateway.lifecycle import ManagedBackend
from gateway.service import Gateway
from protocol.errors import AuthenticationError, BadRequest, GatewayError

__all__ = ["admin_router"]

log = logging.getLogger("pointsman.admin")
_DRAIN_S = 30.0  # how long an unload waits for the model's requests in flight to finish


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


def _loopback(connection: ASGIConnection) -> bool:
    client = connection.scope.get("client")
    if not client:
        return False
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False


def admin_guard(keys: KeyCheck):  # noqa: ANN201 - a Litestar guard
    """Until roles exist: callers on this machine, or callers with one of the static keys."""

    def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        if _loopback(connection):
            return
        if keys.enabled and keys.allows(connection.headers.get("authorization")):
            return
        raise AuthenticationError("The admin API answers callers on this machine, or with a static API key "
                                  "sent as 'Authorization: Bearer <key>'.")

    return guard


def _managed(request: Request, model_id: str) -> ManagedBackend:
    gateway: Gateway = request.app.state.gateway
    model = gateway.table.get(model_id)  # a 404 model_not_found for an unknown name
    managed = gateway.local.managed.get(model.id)
    if managed is None:
        raise BadRequest(f"The model '{model.id}' is not a local engine: it has nothing to load or unload.",
                         param="model")
    return managed


@post("/models/{model_id:str}/load", status_code=200, summary="Load a local model now")
async def load_model(request: Request, model_id: FromPath[str]) -> dict:
    managed = _managed(request, model_id)
    await request.app.state.gateway.local.ensure(managed)
    return {"id": managed.model.id, "pointsman": managed.describe()}


@post("/models/{model_id:str}/unload", status_code=200, summary="Unload a local model once its requests finish")
async def unload_model(request: Request, model_id: FromPath[str]) -> dict:
    managed = _managed(request, model_id)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _DRAIN_S
    while managed.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if managed.in_flight:
        raise Conflict(f"The model '{managed.model.id}' still has {managed.in_flight} requests in flight after "
                       f"{_DRAIN_S:g} s; try again later.")
    await request.app.state.gateway.local.unload(managed, "asked by the admin API")
    return {"id": managed.model.id, "pointsman": managed.describe()}


@post("/reload", status_code=200, summary="Reload the config file: add, remove and change models")
async def reload_config(request: Request) -> dict:
    return await request.app.state.reload()


def admin_router(keys: KeyCheck, middleware: list) -> Router:
    return Router(path="/admin", route_handlers=[load_model, unload_model, reload_config],
                  guards=[admin_guard(keys)], middleware=middleware)
