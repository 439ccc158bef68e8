"""The admin API: load and unload local models, reload the config, model versions' stages. Admin keys only
(callers on this machine when auth is off)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import msgspec
from litestar import Request, Router, get, post
from litestar.params import FromPath

from config.schema import ModelConfig, ModelVersion
from gateway.auth import principal_of
from gateway.lifecycle import ManagedBackend, drained
from gateway.openapi import takes
from gateway.service import Gateway
from policies.model_versions import Step, VersionRegistry
from protocol.errors import BadRequest, GatewayError
from protocol.openai import decode_struct

__all__ = ["admin_router"]

log = logging.getLogger("pointsman.admin")
WORKERS_ENV = "POINTSMAN_WORKERS"  # set by `pointsman serve` for its worker processes
_DRAIN_S = 30.0  # how long an unload waits for the model's requests in flight to finish


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


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
    if not await drained(lambda: managed.in_flight, _DRAIN_S):
        raise Conflict(f"The model '{managed.model.id}' still has {managed.in_flight} requests in flight after "
                       f"{_DRAIN_S:g} s; try again later.")
    await request.app.state.gateway.local.unload(managed, "asked by the admin API")
    return {"id": managed.model.id, "pointsman": managed.describe()}


@post("/reload", status_code=200, summary="Reload the config file: add, remove and change models, routing settings")
async def reload_config(request: Request) -> dict:
    """`added`, `changed`, `removed` and `kept` model ids, and `restart_required`: the changed sections a reload
    does not apply (policies, auth, storage...), in force only after a restart."""
    workers = int(os.environ.get(WORKERS_ENV) or 1)
    if workers > 1:  # this request reaches one worker: the others would keep the old config
        raise Conflict(f"This gateway runs {workers} worker processes and a request reaches only one: reload them all "
                       "with SIGHUP to the `pointsman serve` process.")
    return await request.app.state.reload()


# ---- model versions


class _StageChange(msgspec.Struct, forbid_unknown_fields=True):
    stage: str
    force: bool = False


def _versioned(request: Request, model_id: str) -> tuple[Gateway, VersionRegistry, ModelConfig]:
    gateway: Gateway = request.app.state.gateway
    model = next((m for m in gateway.config.models if m.id == model_id), None)
    if model is None:
        raise gateway.table.not_found(model_id)
    return gateway, request.app.state.versions, model


def _versions_of(gateway: Gateway, model_id: str) -> dict:
    states = gateway.version_states.get(model_id, {})
    return {
        "object": "list",
        "model": model_id,
        "serving": gateway.table.resolve(model_id),  # what `model_id` resolves to now
        "data": [{"version": v, "id": f"{model_id}@{v}", "stage": s.stage,
                  "since": s.since.isoformat() if s.since else None, "settings": s.spec.overrides(),
                  "sunset": s.spec.sunset.isoformat() if s.spec.sunset else None} for v, s in states.items()],
    }


def _moved(gateway: Gateway, model_id: str, steps: list[Step]) -> dict:
    return {**_versions_of(gateway, model_id),
            "transitions": [{"version": s.version, "from": s.from_stage, "to": s.to_stage, "reason": s.reason}
                            for s in steps]}


@get("/models/{model_id:str}/versions", summary="A model's versions, their stages and every transition")
async def list_versions(request: Request, model_id: FromPath[str]) -> dict:
    gateway, registry, model = _versioned(request, model_id)
    return {**_versions_of(gateway, model.id), "transitions": await registry.history(model.id)}


@post("/models/{model_id:str}/versions", status_code=201, summary="Add a version (dev or staging)",
      operation_class=takes(ModelVersion))
async def add_version(request: Request, model_id: FromPath[str]) -> dict:
    gateway, registry, model = _versioned(request, model_id)
    spec: ModelVersion = decode_struct(await request.body(), ModelVersion)
    try:
        model.at_version(spec)  # its overrides must fit this model's backend
    except ValueError as exc:
        raise BadRequest(f"Version {spec.version} does not fit the model '{model.id}': {exc}") from exc
    step = await registry.add(model.id, spec, principal_of(request.scope).key_id)
    return _moved(gateway, model.id, [step])


@post("/models/{model_id:str}/versions/{version:str}/stage", status_code=200,
      summary="Move a version to a stage: production promotes it (the current production becomes deprecated)",
      operation_class=takes(_StageChange))
async def change_stage(request: Request, model_id: FromPath[str], version: FromPath[str]) -> dict:
    gateway, registry, model = _versioned(request, model_id)
    change: _StageChange = decode_struct(await request.body(), _StageChange)
    steps = await registry.move(model.id, version, change.stage, force=change.force,
                                key_id=principal_of(request.scope).key_id)
    return _moved(gateway, model.id, steps)


@post("/models/{model_id:str}/rollback", status_code=200, summary="Back to the previous production version")
async def rollback(request: Request, model_id: FromPath[str]) -> dict:
    gateway, registry, model = _versioned(request, model_id)
    steps = await registry.rollback(model.id, key_id=principal_of(request.scope).key_id)
    return _moved(gateway, model.id, steps)


def admin_router(guard: Callable, middleware: list) -> Router:
    return Router(path="/admin", route_handlers=[load_model, unload_model, reload_config, list_versions,
                                                 add_version, change_stage, rollback],
                  guards=[guard], middleware=middleware)
