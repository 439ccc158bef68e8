"""Versioned prompt templates: rendered into a chat request's messages before routing (stage 20), kept in SQL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

import msgspec
import sqlalchemy as sa
from jinja2.exceptions import SecurityError, TemplateError
from sqlalchemy.ext.asyncio import AsyncEngine

from config.schema import TemplateConfig, TemplateVariable, TemplateVersionConfig
from policies.base import STAGES, no_op
from policies.context import Outcome, Reply, RequestContext
from policies.database import checked, storable, template_transitions, template_versions, templates
from policies.state import StateStore, StoreUnavailable
from policies.template_sandbox import RENDER_LIMIT_S, RenderLimit, SafeTemplate
from protocol.errors import BadRequest, GatewayError
from protocol.openai import ChatCompletionRequest, Message, ParsedRequest

__all__ = ["TRANSITIONS", "Applied", "CompiledVersion", "TemplateArchived", "TemplateConflict", "TemplatePolicy",
           "compile_version"]

log = logging.getLogger("pointsman.policies.templates")

CHANNEL = "templates"  # a message here: reload the templates from SQL now
POLL_S = 2.0  # and read the newest transition's id this often, for messages lost while Redis was away
HEADER = "x-pointsman-template"

# stage -> the stages it may move to; dev -> production skips staging and needs `force`
TRANSITIONS: dict[str, frozenset[str]] = {
    "dev": frozenset({"staging", "archived"}),
    "staging": frozenset({"dev", "production", "archived"}),
    "production": frozenset({"deprecated", "staging"}),
    "deprecated": frozenset({"production", "archived"}),  # back to production: a rollback
    "archived": frozenset(),
}
_PYTHON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "array": (list,),
    "object": (dict,),
}
_spec_encode = msgspec.json.encode
_spec_decode = msgspec.json.Decoder(TemplateVersionConfig).decode


class TemplateArchived(GatewayError):
    status = 410
    type = "invalid_request_error"
    code = "template_archived"


class TemplateConflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


def _type_ok(value: Any, kind: str) -> bool:
    if isinstance(value, bool):
        return kind == "boolean"
    return isinstance(value, _PYTHON_TYPES[kind])


@dataclass(frozen=True, slots=True)
class CompiledVersion:
    """One version ready to render: its compiled messages and declared variables; `stage` is its current one."""

    name: str
    version: str
    stage: str
    spec: TemplateVersionConfig
    messages: tuple[tuple[str, SafeTemplate], ...]

    def bind(self, given: dict[str, Any]) -> dict[str, Any]:
        """The variables to render with: given ones type-checked, missing ones defaulted; a 400 names the first
        that is undeclared, missing or of the wrong type."""
        declared = self.spec.variables
        for key in given:
            if key not in declared:
                raise BadRequest(f"Template '{self.name}@{self.version}' declares no variable '{key}' (it declares: "
                                 f"{', '.join(declared) or 'none'}).", param=f"template.variables.{key}")
        values: dict[str, Any] = {}
        for key, var in declared.items():
            if key in given:
                value = given[key]
                if not _type_ok(value, var.type):
                    raise BadRequest(f"Template variable '{key}' must be of type {var.type}, not "
                                     f"{_json_type(value)}.", param=f"template.variables.{key}")
                values[key] = value
            elif var.is_required:
                raise BadRequest(f"Template '{self.name}@{self.version}' needs the variable '{key}' ({var.type}).",
                                 param=f"template.variables.{key}")
            else:
                values[key] = var.default
        return values

    def render(self, values: dict[str, Any]) -> list[tuple[str, str]]:
        """(role, text) per message; a 400 when the sandbox refuses or the template fails. Runs on the event loop:
        a typical render takes microseconds (a thread hop would cost several times that) and the sandbox stops any
        render at its time budget, each filter and call bounded before it runs."""
        deadline = time.thread_time() + RENDER_LIMIT_S  # one CPU budget for all the messages, not one each
        try:
            return [(role, template.render(values, deadline)) for role, template in self.messages]
        except SecurityError as exc:
            log.warning("template %s@%s tried to leave the sandbox: %s", self.name, self.version, exc)
            raise BadRequest(f"Template '{self.name}@{self.version}' was refused by the sandbox: {exc}",
                             param="template", code="template_security_error") from None
        except RenderLimit as exc:
            raise BadRequest(f"Template '{self.name}@{self.version}' went past a render limit: {exc}",
                             param="template", code="template_limit") from None
        except (TemplateError, Exception) as exc:  # a filter's TypeError, a RecursionError...
            raise BadRequest(f"Template '{self.name}@{self.version}' failed to render: {type(exc).__name__}: "
                             f"{exc}", param="template", code="template_render_error") from None


def _json_type(value: Any) -> str:
    for name in _PYTHON_TYPES:
        if _type_ok(value, name):
            return name
    return "null" if value is None else type(value).__name__


def compile_version(name: str, spec: TemplateVersionConfig, stage: str | None = None) -> CompiledVersion:
    """Compile a version's messages, checking what can be checked before any request: Jinja syntax, the
    sandbox's forbidden tags, variables used but not declared, defaults of the wrong type. ValueError if not."""
    where = f"template {name!r} version {spec.version}"
    for key, var in spec.variables.items():
        _check_default(where, key, var)
    compiled = []
    for i, message in enumerate(spec.messages):
        try:
            template = SafeTemplate(message.content)
        except (TemplateError, SecurityError) as exc:
            raise ValueError(f"{where}: messages[{i}]: {exc}") from None
        undeclared = template.variables - spec.variables.keys()
        if undeclared:
            raise ValueError(f"{where}: messages[{i}] uses undeclared variables: {', '.join(sorted(undeclared))}")
        compiled.append((message.role, template))
    return CompiledVersion(name, spec.version, stage or spec.stage, spec, tuple(compiled))


def _check_default(where: str, key: str, var: TemplateVariable) -> None:
    if var.default is not None and not _type_ok(var.default, var.type):
        raise ValueError(f"{where}: variable {key!r}: the default is not of type {var.type}")


def _describe(version: CompiledVersion) -> dict[str, Any]:
    return {
        "version": version.version, "stage": version.stage,
        "messages": [{"role": m.role, "content": m.content} for m in version.spec.messages],
        "variables": {k: {"type": v.type, "required": v.is_required, "default": v.default}
                      for k, v in version.spec.variables.items()},
    }


@dataclass(frozen=True, slots=True)
class Applied:
    """What `ctx.state["template"]` holds once a template was rendered: which, and the request before it."""

    name: str
    version: str
    original: ParsedRequest


class TemplatePolicy:
    """Stage 20. A chat request with `template: {name, version?, variables}` gets the version's rendered
    messages put before its own; the response says which (`x-pointsman-template: NAME@VERSION`).

    The versions live in memory (compiled once, by name and version) and are swapped whole on a change; SQL is
    read at startup and on change only (a pub/sub message, or a new transition seen by a 2 s poll), never per
    request. Without a database the config's templates serve and the admin API cannot change them.
    """

    name: ClassVar[str] = "template"
    stage: ClassVar[int] = STAGES["template"]

    def __init__(self, configured: list[TemplateConfig], engine: AsyncEngine | None, state: StateStore) -> None:
        self.configured = configured
        self.engine = engine
        self.state = state
        # compile the config's versions now: a bad template fails startup, not a request
        self._compiled: dict[tuple[str, str], CompiledVersion] = {}
        versions: dict[str, dict[str, CompiledVersion]] = {}
        for template in configured:
            for spec in template.versions:
                compiled = self._compiled[template.name, spec.version] = compile_version(template.name, spec)
                versions.setdefault(template.name, {})[spec.version] = compiled
        self._install(versions)
        self._seen: int | None = None  # the newest transition id loaded
        self._reloading = asyncio.Lock()
        self._task: asyncio.Task | None = None

    # ---- the request path -------------------------------------------------------------------------------

    async def admit(self, ctx: RequestContext) -> Reply | None:
        body = ctx.request.body
        ref = getattr(body, "template", None)
        if ref is None:
            if ctx.request.raw.get("template") is not None:  # a legacy completion: no messages to put it in
                raise BadRequest("'template' applies to chat completions only.", param="template")
            return None
        self.render_into(ctx, ref.name, ref.version, ref.variables)
        return None

    @no_op
    async def approve(self, ctx: RequestContext, decision: Any) -> None:
        return None

    @no_op
    async def settle(self, ctx: RequestContext, outcome: Outcome) -> None:
        return None

    def render_into(self, ctx: RequestContext, name: str, version: str | None = None,
                    variables: dict[str, Any] | None = None) -> CompiledVersion:
        """Render `name@version` (the production version when None) into the request's messages, in place of
        any template rendered before (an experiment arm choosing another version calls this after admit did).
        `variables` None: the request's own `template.variables`. Raises a 400 (410 when archived)."""
        applied: Applied | None = ctx.state.get("template")
        base = applied.original if applied is not None else ctx.request
        body = base.body
        if not isinstance(body, ChatCompletionRequest):
            raise BadRequest("'template' applies to chat completions only.", param="template")
        if variables is None:
            variables = body.template.variables if body.template is not None else {}
        compiled = self.lookup(name, version)
        rendered = compiled.render(compiled.bind(variables))
        raw = {k: v for k, v in base.raw.items() if k != "template"}
        raw["messages"] = [{"role": role, "content": text} for role, text in rendered] + list(base.raw["messages"])
        messages = [Message(role=role, content=text) for role, text in rendered]  # type: ignore[arg-type]
        ctx.request = ParsedRequest(msgspec.structs.replace(body, messages=messages + body.messages), raw)
        ctx.state["template"] = Applied(compiled.name, compiled.version, base)
        ctx.headers[HEADER] = f"{compiled.name}@{compiled.version}"
        if compiled.stage == "deprecated":
            ctx.headers["x-pointsman-template-stage"] = "deprecated"
        return compiled

    def lookup(self, name: str, version: str | None) -> CompiledVersion:
        versions = self._versions.get(name)
        if versions is None:
            raise BadRequest(f"Unknown template '{name}'.", param="template.name", code="template_not_found")
        if version is None:
            production = self._production.get(name)
            if production is None:
                raise BadRequest(f"Template '{name}' has no production version: name one in 'template.version'.",
                                 param="template.version", code="template_not_found")
            return production
        compiled = versions.get(version)
        if compiled is None:
            raise BadRequest(f"Template '{name}' has no version '{version}' (it has: {', '.join(versions)}).",
                             param="template.version", code="template_not_found")
        if compiled.stage == "archived":
            raise TemplateArchived(f"Template '{name}@{version}' is archived: use another version.",
                                   param="template.version")
        return compiled

    def _install(self, versions: dict[str, dict[str, CompiledVersion]]) -> None:
        """Swap in a whole new set: a request reads one consistent snapshot, whatever changes during it."""
        production = {name: v for name, vs in versions.items() for v in vs.values() if v.stage == "production"}
        self._versions, self._production = versions, production

    # ---- admin ------------------------------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        production = self._production
        return [
            {"name": name, "production": production[name].version if name in production else None,
             "versions": [_describe(v) for v in vs.values()]}
            for name, vs in sorted(self._versions.items())
        ]

    def _writable(self) -> AsyncEngine:
        if self.engine is None:
            raise BadRequest("Templates can be changed only with a database (storage.database_url).")
        return self.engine

    async def create(self, name: str, spec: TemplateVersionConfig, by: str | None, force: bool = False) -> dict:
        """Add a version (a new template too): immutable once added. Starts in its `stage`, production only with
        `force` (promote from staging instead); the previous production version becomes deprecated."""
        engine = self._writable()
        checked(name, templates.c.name, "name")
        checked(spec.version, template_versions.c.version, "version")
        try:  # off the event loop: parsing and compiling tens of kilobytes of Jinja takes a good part of a second
            compiled = await asyncio.to_thread(compile_version, name, spec)
        except ValueError as exc:
            raise BadRequest(str(exc), param="messages") from None
        if spec.stage in ("production", "deprecated", "archived") and not force:
            raise BadRequest(f"A new version starts in dev or staging, not {spec.stage} (promote it, or force).",
                             param="stage")
        now = datetime.now(UTC)
        async with engine.begin() as conn:
            exists = await conn.scalar(sa.select(templates.c.name).where(templates.c.name == name))
            if exists is None:
                await conn.execute(templates.insert().values(name=name, created_at=now))
            taken = await conn.scalar(sa.select(template_versions.c.stage).where(
                template_versions.c.name == name, template_versions.c.version == spec.version))
            if taken is not None:
                raise TemplateConflict(f"Template '{name}@{spec.version}' exists already: versions are immutable, "
                                       "add a new one.", param="version")
            if spec.stage == "production":
                await self._demote_production(conn, name, by, now)
            await conn.execute(template_versions.insert().values(
                name=name, version=spec.version, stage=spec.stage, spec=_spec_encode(spec).decode(),
                created_at=now, created_by=by))
            await conn.execute(template_transitions.insert().values(
                name=name, version=spec.version, from_stage=None, to_stage=spec.stage, at=now, by_key=by,
                forced=force))
        self._compiled[name, spec.version] = compiled
        await self._changed()
        return {"name": name, "version": spec.version, "stage": spec.stage}

    async def move(self, name: str, version: str, to: str, by: str | None, force: bool = False) -> dict:
        """Move a version to another stage, checked against TRANSITIONS (dev -> production needs `force`);
        promoting to production deprecates the version that held it, in the same transaction."""
        engine = self._writable()
        if to not in TRANSITIONS:
            raise BadRequest(f"Unknown stage '{to}': expected one of {', '.join(TRANSITIONS)}.", param="stage")
        now = datetime.now(UTC)
        async with engine.begin() as conn:
            current = await conn.scalar(sa.select(template_versions.c.stage).where(
                template_versions.c.name == name, template_versions.c.version == version).with_for_update())
            if current is None:
                raise BadRequest(f"Unknown template version '{name}@{version}'.", param="version",
                                 code="template_not_found")
            if current == to:
                raise TemplateConflict(f"'{name}@{version}' is in {to} already.", param="stage")
            allowed = to in TRANSITIONS[current] or (force and current == "dev" and to == "production")
            if not allowed:
                hint = " (through staging, or force)" if current == "dev" and to == "production" else ""
                raise TemplateConflict(f"'{name}@{version}' cannot move from {current} to {to}{hint}; from {current}"
                                       f" it may go to: {', '.join(sorted(TRANSITIONS[current])) or 'nowhere'}.",
                                       param="stage")
            if to == "production":
                await self._demote_production(conn, name, by, now)
            await self._set_stage(conn, name, version, current, to, by, now, force)
        await self._changed()
        return {"name": name, "version": version, "from": current, "stage": to}

    async def _demote_production(self, conn: Any, name: str, by: str | None, now: datetime) -> None:
        rows = await conn.execute(sa.select(template_versions.c.version).where(
            template_versions.c.name == name, template_versions.c.stage == "production").with_for_update())
        for (old,) in rows.all():
            await self._set_stage(conn, name, old, "production", "deprecated", by, now, False)

    @staticmethod
    async def _set_stage(conn: Any, name: str, version: str, current: str, to: str, by: str | None,
                         now: datetime, forced: bool) -> None:
        await conn.execute(template_versions.update().where(
            template_versions.c.name == name, template_versions.c.version == version).values(stage=to))
        await conn.execute(template_transitions.insert().values(
            name=name, version=version, from_stage=current, to_stage=to, at=now, by_key=by, forced=forced))

    async def history(self, name: str) -> list[dict[str, Any]]:
        engine = self._writable()
        if not storable(name, template_transitions.c.name):  # no template has that name
            return []
        async with engine.connect() as conn:
            rows = await conn.execute(sa.select(template_transitions).where(
                template_transitions.c.name == name).order_by(template_transitions.c.id))
            return [{"version": r.version, "from": r.from_stage, "to": r.to_stage, "at": r.at.isoformat(),
                     "by": r.by_key, "forced": r.forced} for r in rows]

    # ---- persistence and refresh --------------------------------------------------------------------------

    async def start(self) -> None:
        """Seed the config's versions the database lacks, load every version, and follow changes."""
        if self.engine is None:
            return
        await self._seed()
        await self.reload()
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _seed(self) -> None:
        assert self.engine is not None
        now = datetime.now(UTC)
        async with self.engine.begin() as conn:
            stored = {(r.name, r.version): r.spec for r in await conn.execute(
                sa.select(template_versions.c.name, template_versions.c.version, template_versions.c.spec))}
            names = set((await conn.execute(sa.select(templates.c.name))).scalars())
            production = set((await conn.execute(sa.select(template_versions.c.name).where(
                template_versions.c.stage == "production"))).scalars())
            for template in self.configured:
                if template.name not in names:
                    await conn.execute(templates.insert().values(name=template.name, created_at=now))
                for spec in template.versions:
                    key = (template.name, spec.version)
                    if key in stored:
                        kept = _spec_decode(stored[key])
                        if (kept.messages, kept.variables) != (spec.messages, spec.variables):
                            log.warning("template %s@%s in the config differs from the database's; versions are "
                                        "immutable, the database's is kept (add a new version)", *key)
                        continue
                    stage = spec.stage
                    if stage == "production" and template.name in production:
                        stage = "staging"  # the database's production version stands; promote this one to replace it
                    await conn.execute(template_versions.insert().values(
                        name=template.name, version=spec.version, stage=stage, spec=_spec_encode(spec).decode(),
                        created_at=now, created_by="config"))
                    await conn.execute(template_transitions.insert().values(
                        name=template.name, version=spec.version, from_stage=None, to_stage=stage, at=now,
                        by_key="config", forced=False))

    async def reload(self) -> None:
        """Read every version from SQL and swap them in (compiling only versions not seen before)."""
        assert self.engine is not None
        async with self._reloading:
            async with self.engine.connect() as conn:
                seen = await conn.scalar(sa.select(sa.func.max(template_transitions.c.id)))
                rows = (await conn.execute(sa.select(template_versions))).all()
            versions: dict[str, dict[str, CompiledVersion]] = {}
            for row in sorted(rows, key=lambda r: (r.name, r.created_at, r.version)):
                compiled = self._compiled.get((row.name, row.version))
                if compiled is None:
                    try:
                        compiled = await asyncio.to_thread(compile_version, row.name, _spec_decode(row.spec))
                    except (ValueError, msgspec.DecodeError) as exc:
                        log.error("template %s@%s cannot be used: %s", row.name, row.version, exc)
                        continue
                    self._compiled[row.name, row.version] = compiled
                if compiled.stage != row.stage:
                    compiled = CompiledVersion(compiled.name, compiled.version, row.stage, compiled.spec,
                                               compiled.messages)
                versions.setdefault(row.name, {})[row.version] = compiled
            self._install(versions)
            self._seen = seen

    async def _changed(self) -> None:
        """After a write: reload here at once, and tell the other replicas."""
        await self.reload()
        try:
            await self.state.publish(CHANNEL, b"changed")
        except StoreUnavailable as exc:  # the others see it at their next poll
            log.warning("templates changed; could not tell the other replicas at once: %s", exc)

    async def _follow(self) -> None:
        listener = asyncio.get_running_loop().create_task(self._listen())
        try:
            while True:
                await asyncio.sleep(POLL_S)
                try:
                    async with self.engine.connect() as conn:  # type: ignore[union-attr]
                        newest = await conn.scalar(sa.select(sa.func.max(template_transitions.c.id)))
                    if newest != self._seen:
                        await self.reload()
                except (OSError, sa.exc.SQLAlchemyError) as exc:  # the database is away: the next poll retries
                    log.warning("templates: the periodic check failed (%s: %s)", type(exc).__name__, exc)
                except Exception:
                    log.exception("templates: the periodic check failed")
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _listen(self) -> None:
        subscription = self.state.subscribe(CHANNEL)
        try:
            while True:
                try:
                    async for _ in subscription:
                        await self.reload()
                    return
                except StoreUnavailable:
                    await asyncio.sleep(1.0)
                except Exception:
                    log.exception("templates: reloading after a change failed")
                    await asyncio.sleep(1.0)
        finally:
            await subscription.aclose()
