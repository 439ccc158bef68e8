"""The admin API of prompt templates: list them, add a version, move a version between stages, its history."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
from litestar import Request, Router, get, post
from litestar.params import FromPath

from config.schema import TemplateName, TemplateStage, TemplateVersionConfig
from gateway.auth import principal_of
from gateway.openapi import takes
from policies.templates import TemplatePolicy
from protocol.errors import BadRequest
from protocol.openai import decode_struct

__all__ = ["templates_router"]


class NewVersion(TemplateVersionConfig, kw_only=True):
    """POST /admin/templates: a version of a template (created with its first version)."""

    name: TemplateName
    stage: TemplateStage = "dev"
    force: bool = False  # start in production, skipping staging


class StageChange(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    stage: TemplateStage
    force: bool = False  # dev -> production without staging


def _policy(request: Request) -> TemplatePolicy:
    templates = request.app.state.storage.templates
    if templates is None:
        raise BadRequest("Prompt templates need a database (storage.database_url) or `templates:` in the config.")
    return templates


def templates_router(guard: Callable, middleware: list) -> Router:
    """Mounted at /admin/templates behind the admin guard; transitions record the caller's key (or `loopback`)."""

    def caller(request: Request) -> str:
        return principal_of(request.scope).key_id or "loopback"

    @get("/", summary="List prompt templates and their versions")
    async def list_templates(request: Request) -> dict:
        return {"object": "list", "data": _policy(request).describe()}

    @post("/", status_code=201, summary="Add a template version (and the template with its first one)",
          operation_class=takes(NewVersion))
    async def create_version(request: Request) -> dict:
        policy = _policy(request)
        new = decode_struct(await request.body(), NewVersion)
        spec = TemplateVersionConfig(version=new.version, stage=new.stage, messages=new.messages,
                                     variables=new.variables)
        return await policy.create(new.name, spec, caller(request), force=new.force)

    @post("/{name:str}/versions/{version:str}/stage", status_code=200,
          summary="Move a template version to another stage (validated; promoting deprecates the old production)",
          operation_class=takes(StageChange))
    async def move_version(request: Request, name: FromPath[str], version: FromPath[str]) -> dict:
        change = decode_struct(await request.body(), StageChange)
        return await _policy(request).move(name, version, change.stage, caller(request), force=change.force)

    @get("/{name:str}/history", summary="Every stage transition of a template's versions")
    async def history(request: Request, name: FromPath[str]) -> dict:
        return {"object": "list", "name": name, "data": await _policy(request).history(name)}

    return Router(path="/admin/templates", route_handlers=[list_templates, create_version, move_version, history],
                  guards=[guard], middleware=middleware)
