"""The admin API for experiments: list, create, change weights, status and traffic, pause, stop, promote, and
read the results. Mounted under /admin beside the other admin routes, with the same guard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
from litestar import Request, Router, get, patch, post
from litestar.params import FromPath

from config.schema import ExperimentConfig
from gateway.openapi import takes
from policies.experiments import ExperimentStore, Live
from protocol.errors import BadRequest, GatewayError
from protocol.openai import decode_object

__all__ = ["experiments_router"]


def _store(request: Request) -> ExperimentStore:
    store = request.app.state.storage.experiments
    if store is None:
        raise BadRequest("Experiments need a database: set storage.database_url.")
    return store


def _routable(request: Request) -> Callable[[str], bool]:
    """Whether a model name routes on the running gateway (a model, alias, version, profile or chain)."""
    table = request.app.state.gateway.table

    def routable(name: str) -> bool:
        try:
            table.plan(name)
        except GatewayError:
            return False
        return True

    return routable


def _describe(live: Live) -> dict:
    return {**msgspec.to_builtins(live.config), "promoted": live.promoted}

# PATCH /admin/experiments/{name}: the fields a change may set, as in the config (ExperimentStore.update checks them)
_CHANGES = {"type": "object", "additionalProperties": False, "properties": {
    "weights": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
    "status": {"enum": ["draft", "running", "paused", "stopped"]},
    "traffic": {"type": "number", "minimum": 0, "maximum": 1},
    "alpha": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.5},
    "min_samples": {"type": "integer", "minimum": 2},
    "auto_promote": {"type": "boolean"},
    "primary_metric": {"type": "string"},
}}


@get("/experiments", summary="List the experiments")
async def list_experiments(request: Request) -> dict:
    store = _store(request)
    return {"object": "list", "data": [_describe(live) for live in store.by_name.values()]}


@post("/experiments", status_code=201, summary="Create an experiment (the same shape as in the config file)",
      operation_class=takes(ExperimentConfig))
async def create_experiment(request: Request) -> dict:
    try:
        config = msgspec.json.decode(await request.body(), type=ExperimentConfig)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"Invalid experiment: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise BadRequest(f"Invalid JSON body: {exc}") from exc
    return _describe(await _store(request).create(config, _routable(request)))


@get("/experiments/{name:str}", summary="One experiment")
async def get_experiment(request: Request, name: FromPath[str]) -> dict:
    return _describe(_store(request).get(name))


@patch("/experiments/{name:str}", status_code=200,
       summary="Change weights ({variant: weight}), status, traffic, alpha, min_samples, auto_promote",
       operation_class=takes(_CHANGES))
async def update_experiment(request: Request, name: FromPath[str]) -> dict:
    changes = decode_object(await request.body())
    return _describe(await _store(request).update(name, changes))


@post("/experiments/{name:str}/pause", status_code=200, summary="Pause: no new units enter the experiment")
async def pause_experiment(request: Request, name: FromPath[str]) -> dict:
    return _describe(await _store(request).update(name, {"status": "paused"}))


@post("/experiments/{name:str}/stop", status_code=200, summary="Stop the experiment")
async def stop_experiment(request: Request, name: FromPath[str]) -> dict:
    return _describe(await _store(request).update(name, {"status": "stopped"}))


@post("/experiments/{name:str}/promote", status_code=200,
      summary="Promote a variant: all the weight to it, the experiment stops, the target goes to it",
      operation_class=takes({"type": "object", "required": ["variant"], "properties": {"variant": {"type": "string"}}}))
async def promote_experiment(request: Request, name: FromPath[str]) -> dict:
    variant = decode_object(await request.body()).get("variant")
    if not isinstance(variant, str):
        raise BadRequest("Send {\"variant\": NAME}.", param="variant")
    return _describe(await _store(request).promote(name, variant))


@get("/experiments/{name:str}/results", summary="Per-variant metrics, tests against control, and the winner")
async def experiment_results(request: Request, name: FromPath[str]) -> dict:
    store = _store(request)
    store.get(name)  # a 404 before any work
    usage = request.app.state.storage.usage
    if usage is not None:
        try:  # this replica's queued rows count too
            await usage.flush()
        except Exception:  # noqa: S110 - the database is down: the query below reports it
            pass
    return await store.results(name)


def experiments_router(guard: Any, middleware: list) -> Router:
    """Guarded by the admin guard (gateway.auth.Authenticator.admin_guard), as the other admin routes."""
    return Router(path="/admin", route_handlers=[list_experiments, create_experiment, get_experiment,
                                                 update_experiment, pause_experiment, stop_experiment,
                                                 promote_experiment, experiment_results],
                  guards=[guard], middleware=middleware)

