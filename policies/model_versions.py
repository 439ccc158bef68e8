"""Model versions' stages: the allowed transitions, their record in SQL, and every replica kept in step."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from config.schema import VERSION_STAGES, ModelVersion
from policies.database import checked, model_version_transitions, model_versions
from policies.state import StateStore
from protocol.errors import BadRequest, GatewayError, NotFound

__all__ = [
    "CHANNEL",
    "TRANSITIONS",
    "InvalidTransition",
    "Snapshot",
    "Step",
    "VersionRegistry",
    "VersionState",
    "configured_states",
    "reloaded_states",
    "plan_rollback",
    "plan_stage",
    "semver_key",
]

log = logging.getLogger("pointsman.versions")

CHANNEL = "model-versions"  # pub/sub: "something changed, re-read the database"
POLL_S = 0.5  # and a re-read of the newest transition's id this often, so a lost message delays by at most this

# Where each stage may go without `force`. Archived is final, even forced.
TRANSITIONS: dict[str, frozenset[str]] = {
    "dev": frozenset({"staging", "archived"}),
    "staging": frozenset({"dev", "production", "archived"}),
    "production": frozenset({"staging", "deprecated"}),
    "deprecated": frozenset({"staging", "production", "archived"}),
    "archived": frozenset(),
}
_NEW_STAGES = ("dev", "staging")  # where an added version starts


class InvalidTransition(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "invalid_transition"


@dataclass(frozen=True, slots=True)
class VersionState:
    """One version as the gateway serves it: its settings, its stage and since when (None: not recorded)."""

    spec: ModelVersion
    stage: str
    since: datetime | None = None


Snapshot = dict[str, dict[str, VersionState]]  # model id -> version -> state; replaced whole, never mutated


@dataclass(frozen=True, slots=True)
class Step:
    version: str
    from_stage: str | None
    to_stage: str
    reason: str  # added | config | stage | promoted | replaced | rollback


def configured_states(configured: Mapping[str, Sequence[ModelVersion]]) -> Snapshot:
    """The stages the config names, before the database has a say."""
    return {model_id: {v.version: VersionState(v, v.stage) for v in versions}
            for model_id, versions in configured.items() if versions}


def reloaded_states(known: Snapshot, configured: Mapping[str, Iterable[ModelVersion]]) -> Snapshot:
    """The stages after a config reload, for each model `configured` names: its versions take the reloaded
    settings, a known version keeps its stage (and since when), a new one takes the config's; versions the config
    no longer names stay as they are known."""
    states: Snapshot = {}
    for model_id, versions in configured.items():
        mine = known.get(model_id, {})
        states[model_id] = {**mine, **{v.version: VersionState(v, mine[v.version].stage, mine[v.version].since)
                                       if v.version in mine else VersionState(v, v.stage) for v in versions}}
    return states


def plan_stage(stages: Mapping[str, str], version: str, target: str, force: bool = False) -> list[Step]:
    """The steps that move `version` to `target`: a promotion also moves the current production version to
    deprecated. Raises NotFound, BadRequest (no such stage) or InvalidTransition."""
    if target not in VERSION_STAGES:
        raise BadRequest(f"Unknown stage {target!r}: expected one of {', '.join(VERSION_STAGES)}.", param="stage")
    current = stages.get(version)
    if current is None:
        raise NotFound(f"There is no version {version!r} (versions: {', '.join(stages) or 'none'}).",
                       code="version_not_found")
    if current == target:
        raise InvalidTransition(f"Version {version} is already in {target}.")
    if current == "archived":
        raise InvalidTransition(f"Version {version} is archived: archived is final.")
    if target not in TRANSITIONS[current] and not force:
        allowed = ", ".join(sorted(TRANSITIONS[current]))
        raise InvalidTransition(f"Version {version} cannot go from {current} to {target} (from {current}: {allowed});"
                                " send \"force\": true to do it anyway.")
    steps = []
    if target == "production":
        steps += [Step(v, "production", "deprecated", "replaced") for v, s in stages.items() if s == "production"]
    steps.append(Step(version, current, target, "promoted" if target == "production" else "stage"))
    return steps


def plan_rollback(stages: Mapping[str, str], history: Sequence[tuple[str, str | None, str]]) -> list[Step]:
    """Back to the previous production version: the one that most recently left production (and is deprecated
    or staging now) returns to it; the current one goes to staging. `history`: (version, from, to), oldest first."""
    current = next((v for v, s in stages.items() if s == "production"), None)
    if current is None:
        raise InvalidTransition("No version is in production: there is nothing to roll back.")
    for version, from_stage, _ in reversed(history):
        if from_stage == "production" and version != current and stages.get(version) in ("deprecated", "staging"):
            return [Step(current, "production", "staging", "rollback"),
                    Step(version, stages[version], "production", "rollback")]
    raise InvalidTransition(f"No earlier production version to roll back to from {current}.")


class VersionRegistry:
    """The versions' stages, durable in SQL when there is a database (else in this process only).

    Every change is one transaction (the model's rows locked on PostgreSQL), applied here at once, then announced
    on the state store's pub/sub; every replica re-reads the database on the message and also checks the newest
    transition's id every POLL_S, so a lost message (Redis down) cannot leave it behind. `on_change(snapshot)`
    is called with each new snapshot, synchronously: the gateway swaps its routing table there."""

    def __init__(self, engine: AsyncEngine | None, state: StateStore,
                 configured: Mapping[str, Sequence[ModelVersion]]) -> None:
        self.engine, self.state = engine, state
        self.configured = {m: {v.version: v for v in vs} for m, vs in configured.items() if vs}
        self.snapshot: Snapshot = configured_states(configured)
        self.generation: int | None = None  # the newest transition's id this replica has applied
        self.on_change: Callable[[Snapshot], None] | None = None
        self._history: dict[str, list[dict]] = {}  # without a database
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []

    # ---- lifecycle

    async def start(self, on_change: Callable[[Snapshot], None]) -> None:
        """Record the config's versions not yet in the database, load the stages, start following changes."""
        self.on_change = on_change
        if self.engine is None:
            on_change(self.snapshot)
            return
        try:
            await self._seed()
        except sa.exc.IntegrityError:  # a replica starting beside this one inserted them first
            await self._seed()
        await self.refresh(force=True)
        self._tasks = [asyncio.create_task(self._listen(), name="pointsman-versions-listen"),
                       asyncio.create_task(self._poll(), name="pointsman-versions-poll")]

    async def reconfigure(self, configured: Mapping[str, Sequence[ModelVersion]]) -> None:
        """After a config reload: its versions' settings, and a record of the versions new to it (without a
        database, in this process's stages: a known version keeps its stage, a new one takes the config's, as
        Gateway.reload keeps them)."""
        self.configured = {m: {v.version: v for v in vs} for m, vs in configured.items() if vs}
        if self.engine is not None:
            await self._seed()
            await self.refresh(force=True)
            return
        async with self._lock:
            self.snapshot = reloaded_states(self.snapshot, {m: specs.values() for m, specs in self.configured.items()})

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _seed(self) -> None:
        async with self.engine.begin() as conn:  # type: ignore[union-attr]
            rows = await conn.execute(sa.select(model_versions.c.model_id, model_versions.c.version))
            known = {tuple(row) for row in rows}
            now = datetime.now(UTC)
            for model_id, versions in self.configured.items():
                for spec in versions.values():
                    if (model_id, spec.version) not in known:
                        await self._insert(conn, model_id, spec, None, now, "config")

    # ---- changes

    async def add(self, model_id: str, spec: ModelVersion, key_id: str | None) -> Step:
        """A new version, in dev or staging."""
        checked(spec.version, model_versions.c.version, "version")
        if spec.stage not in _NEW_STAGES:
            raise BadRequest(f"A new version starts in dev or staging, not {spec.stage}; then move it.",
                             param="stage")
        step = Step(spec.version, None, spec.stage, "added")
        if self.engine is None:
            async with self._lock:
                self._exists(self.snapshot.get(model_id, {}), model_id, spec.version)
                self._apply_here(model_id, [step], key_id, False, {spec.version: spec})
            return step
        async with self.engine.begin() as conn:
            stages = await self._stages(conn, model_id)
            self._exists(stages, model_id, spec.version)
            try:
                await self._insert(conn, model_id, spec, key_id, datetime.now(UTC), "added")
            except sa.exc.IntegrityError as exc:  # added at the same moment on another replica
                raise self._exists_error(model_id, spec.version) from exc
        await self._announce()
        return step

    async def move(self, model_id: str, version: str, stage: str, *, force: bool = False,
                   key_id: str | None = None) -> list[Step]:
        """Move a version to `stage` (validated; see TRANSITIONS); promotion deprecates the current production."""
        return await self._change(model_id, key_id, force, lambda stages, _: plan_stage(stages, version, stage, force))

    async def rollback(self, model_id: str, *, key_id: str | None = None) -> list[Step]:
        """Back to the previous production version (see plan_rollback)."""
        return await self._change(model_id, key_id, False, plan_rollback)

    async def _change(self, model_id: str, key_id: str | None, force: bool,
                      plan: Callable[[dict[str, str], list[tuple[str, str | None, str]]], list[Step]]) -> list[Step]:
        if self.engine is None:
            async with self._lock:
                stages = {v: s.stage for v, s in self.snapshot.get(model_id, {}).items()}
                history = [(h["version"], h["from"], h["to"]) for h in self._history.get(model_id, [])]
                steps = plan(stages, history)
                self._apply_here(model_id, steps, key_id, force, {})
            return steps
        async with self.engine.begin() as conn:
            stages = await self._stages(conn, model_id)
            t = model_version_transitions.c
            rows = await conn.execute(sa.select(t.version, t.from_stage, t.to_stage)
                                      .where(t.model_id == model_id).order_by(t.id))
            steps = plan(stages, [tuple(row) for row in rows])
            now = datetime.now(UTC)
            for step in steps:
                await conn.execute(model_versions.update()
                                   .where(model_versions.c.model_id == model_id,
                                          model_versions.c.version == step.version)
                                   .values(stage=step.to_stage, stage_since=now))
                await conn.execute(model_version_transitions.insert().values(
                    model_id=model_id, version=step.version, from_stage=step.from_stage, to_stage=step.to_stage,
                    at=now, key_id=key_id, forced=force, reason=step.reason))
        await self._announce()
        return steps

    async def history(self, model_id: str) -> list[dict]:
        """Every transition of the model's versions, oldest first."""
        if self.engine is None:
            return list(self._history.get(model_id, []))
        t = model_version_transitions.c
        async with self.engine.connect() as conn:
            rows = await conn.execute(sa.select(t.version, t.from_stage, t.to_stage, t.at, t.key_id, t.forced,
                                                t.reason).where(t.model_id == model_id).order_by(t.id))
            return [_transition(*row) for row in rows]

    # ---- keeping in step

    async def refresh(self, force: bool = False) -> bool:
        """Re-read the database; apply (call on_change) when anything changed. Serialized, so an older read can
        never be applied after a newer one."""
        async with self._lock:
            snapshot, generation = await self._read()
            if not force and generation == self.generation and snapshot == self.snapshot:
                return False
            self.generation = generation
            changed = snapshot != self.snapshot
            self.snapshot = snapshot
            if (changed or force) and self.on_change is not None:
                self.on_change(snapshot)
            return changed

    async def _announce(self) -> None:
        await self.refresh()
        try:
            await self.state.publish(CHANNEL, str(self.generation).encode())
        except Exception as exc:  # the others still catch up within POLL_S
            log.warning("model versions: could not announce a change (%s); replicas catch up by polling", exc)

    async def _listen(self) -> None:
        while True:
            try:
                async with self.state.subscribe(CHANNEL) as messages:
                    async for _ in messages:
                        await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is down: polling still holds; subscribe again shortly
                log.debug("model versions: subscription lost (%s)", exc)
            await asyncio.sleep(1.0)

    async def _poll(self) -> None:
        t = model_version_transitions.c
        while True:
            await asyncio.sleep(POLL_S)
            try:
                async with self.engine.connect() as conn:  # type: ignore[union-attr]
                    newest = (await conn.execute(sa.select(sa.func.max(t.id)))).scalar()
                if newest != self.generation:
                    await self.refresh()
            except asyncio.CancelledError:
                raise
            except (OSError, sa.exc.SQLAlchemyError) as exc:  # the database is away (a restart): the next poll retries
                log.warning("model versions: could not re-read the database (%s: %s)", type(exc).__name__, exc)
            except Exception:
                log.exception("model versions: could not re-read the database")

    async def _read(self) -> tuple[Snapshot, int | None]:
        v = model_versions.c
        async with self.engine.connect() as conn:  # type: ignore[union-attr]
            rows = (await conn.execute(sa.select(v.model_id, v.version, v.stage, v.spec, v.stage_since))).all()
            newest = (await conn.execute(sa.select(sa.func.max(model_version_transitions.c.id)))).scalar()
        snapshot: Snapshot = {}
        for model_id, version, stage, spec_text, since in rows:
            spec = self.configured.get(model_id, {}).get(version)  # the config stays the source of settings
            if spec is None:
                try:
                    spec = msgspec.json.decode(spec_text, type=ModelVersion)
                except msgspec.DecodeError as exc:  # written by a newer or older schema: leave it out, loudly
                    log.error("model %s version %s: unreadable settings in the database: %s", model_id, version, exc)
                    continue
            snapshot.setdefault(model_id, {})[version] = VersionState(spec, stage, since)
        return {model_id: _ordered(versions) for model_id, versions in snapshot.items()}, newest

    # ---- helpers

    @staticmethod
    async def _stages(conn: AsyncConnection, model_id: str) -> dict[str, str]:
        v = model_versions.c
        query = sa.select(v.version, v.stage).where(v.model_id == model_id).order_by(v.version)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()  # two admins promoting at once: one waits for the other
        return {version: stage for version, stage in (await conn.execute(query)).all()}

    @staticmethod
    async def _insert(conn: AsyncConnection, model_id: str, spec: ModelVersion, key_id: str | None,
                      now: datetime, reason: str) -> None:
        await conn.execute(model_versions.insert().values(
            model_id=model_id, version=spec.version, stage=spec.stage, spec=msgspec.json.encode(spec).decode(),
            created_at=now, stage_since=now))
        await conn.execute(model_version_transitions.insert().values(
            model_id=model_id, version=spec.version, from_stage=None, to_stage=spec.stage, at=now, key_id=key_id,
            forced=False, reason=reason))

    def _exists(self, stages: Mapping, model_id: str, version: str) -> None:
        if version in stages:
            raise self._exists_error(model_id, version)

    @staticmethod
    def _exists_error(model_id: str, version: str) -> InvalidTransition:
        return InvalidTransition(f"Model {model_id} already has a version {version}.", code="version_exists")

    def _apply_here(self, model_id: str, steps: list[Step], key_id: str | None, force: bool,
                    added: Mapping[str, ModelVersion]) -> None:
        """Without a database: the steps applied to this process's snapshot, and recorded in memory."""
        now = datetime.now(UTC)
        versions = dict(self.snapshot.get(model_id, {}))
        for step in steps:
            spec = added.get(step.version) or versions[step.version].spec
            versions[step.version] = VersionState(spec, step.to_stage, now)
            self._history.setdefault(model_id, []).append(
                _transition(step.version, step.from_stage, step.to_stage, now, key_id, force, step.reason))
        self.snapshot = {**self.snapshot, model_id: _ordered(versions)}
        if self.on_change is not None:
            self.on_change(self.snapshot)


def semver_key(version: str) -> tuple:
    """Semantic versioning's precedence: numbers compared as numbers, a pre-release before its release."""
    core, _, pre = version.split("+", 1)[0].partition("-")
    numbers = tuple(int(part) for part in core.split("."))
    tags = tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in pre.split(".")) if pre else ()
    return numbers, not pre, tags


def _ordered(versions: dict[str, VersionState]) -> dict[str, VersionState]:
    return dict(sorted(versions.items(), key=lambda item: semver_key(item[0])))


def _transition(version: str, from_stage: str | None, to_stage: str, at: datetime, key_id: str | None,
                forced: bool, reason: str) -> dict:
    return {"version": version, "from": from_stage, "to": to_stage, "at": at.isoformat(), "key_id": key_id,
            "forced": bool(forced), "reason": reason}
