"""Model versions' stages: the transition rules, every transition recorded in SQL (SQLite and PostgreSQL), the
stages surviving a restart, and two replicas sharing a database and a state store agreeing on them."""

from __future__ import annotations

import pytest

from config.schema import ModelVersion
from policies.database import migrate, open_engine
from policies.model_versions import (
    InvalidTransition,
    Snapshot,
    VersionRegistry,
    plan_rollback,
    plan_stage,
    semver_key,
)
from policies.state import LocalStore, StateStore
from protocol.errors import BadRequest, NotFound
from tests.policies.conftest import PG_URL, eventually

CONFIGURED = {"chat": [ModelVersion(version="1.0.0", stage="production"), ModelVersion(version="2.0.0",
                                                                                        stage="staging")]}


def _stages(snapshot: Snapshot, model: str = "chat") -> dict[str, str]:
    return {v: s.stage for v, s in snapshot.get(model, {}).items()}


def test_promotion_deprecates_the_current_production_version():
    steps = plan_stage({"1.0.0": "production", "2.0.0": "staging"}, "2.0.0", "production")
    assert [(s.version, s.from_stage, s.to_stage, s.reason) for s in steps] == [
        ("1.0.0", "production", "deprecated", "replaced"), ("2.0.0", "staging", "production", "promoted")]


@pytest.mark.parametrize(("stage", "target", "force", "error"), [
    ("dev", "production", False, InvalidTransition),  # staging first
    ("archived", "staging", True, InvalidTransition),  # archived is final, even forced
    ("production", "archived", False, InvalidTransition),  # deprecate first
    ("dev", "dev", False, InvalidTransition),
    ("dev", "retired", False, BadRequest),
])
def test_refused_transitions(stage, target, force, error):
    with pytest.raises(error):
        plan_stage({"1.0.0": stage}, "1.0.0", target, force)


def test_force_skips_staging_and_an_unknown_version_is_404():
    assert plan_stage({"1.0.0": "dev"}, "1.0.0", "production", force=True)[-1].to_stage == "production"
    with pytest.raises(NotFound):
        plan_stage({"1.0.0": "dev"}, "2.0.0", "staging")


def test_rollback_returns_to_the_version_that_last_left_production():
    history = [("1.0.0", None, "production"), ("2.0.0", None, "staging"), ("1.0.0", "production", "deprecated"),
               ("2.0.0", "staging", "production")]
    steps = plan_rollback({"1.0.0": "deprecated", "2.0.0": "production"}, history)
    assert [(s.version, s.to_stage) for s in steps] == [("2.0.0", "staging"), ("1.0.0", "production")]
    with pytest.raises(InvalidTransition, match="nothing to roll back"):
        plan_rollback({"1.0.0": "staging"}, [])
    with pytest.raises(InvalidTransition, match="No earlier production"):
        plan_rollback({"1.0.0": "production"}, [("1.0.0", None, "production")])


async def _registry(url: str, store: StateStore, schema: str | None = None) -> tuple[VersionRegistry, list]:
    engine = open_engine(url, schema=schema)
    await migrate(engine)
    seen: list[Snapshot] = []
    registry = VersionRegistry(engine, store, CONFIGURED)
    await registry.start(seen.append)
    return registry, seen


async def _close(registry: VersionRegistry) -> None:
    await registry.aclose()
    await registry.engine.dispose()


async def test_transitions_are_recorded_and_survive_a_restart(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path}/versions.db"
    registry, seen = await _registry(url, LocalStore())
    assert _stages(seen[-1]) == {"1.0.0": "production", "2.0.0": "staging"}
    await registry.add("chat", ModelVersion(version="3.0.0", upstream_model="three"), key_id="static-0")
    await registry.move("chat", "2.0.0", "production", key_id="static-1")
    assert _stages(seen[-1]) == {"1.0.0": "deprecated", "2.0.0": "production", "3.0.0": "dev"}
    assert seen[-1]["chat"]["1.0.0"].since is not None
    await registry.rollback("chat", key_id="static-0")
    with pytest.raises(InvalidTransition, match="already has"):
        await registry.add("chat", ModelVersion(version="3.0.0"), key_id=None)
    with pytest.raises(BadRequest):
        await registry.add("chat", ModelVersion(version="4.0.0", stage="production"), key_id=None)
    history = [(h["version"], h["from"], h["to"], h["key_id"], h["reason"]) for h in await registry.history("chat")]
    assert history == [
        ("1.0.0", None, "production", None, "config"), ("2.0.0", None, "staging", None, "config"),
        ("3.0.0", None, "dev", "static-0", "added"),
        ("1.0.0", "production", "deprecated", "static-1", "replaced"),
        ("2.0.0", "staging", "production", "static-1", "promoted"),
        ("2.0.0", "production", "staging", "static-0", "rollback"),
        ("1.0.0", "deprecated", "production", "static-0", "rollback"),
    ]
    await _close(registry)
    # a restart: the database's stages win over the config's, and the added version is back with its settings
    again, seen = await _registry(url, LocalStore())
    assert _stages(seen[-1]) == {"1.0.0": "production", "2.0.0": "staging", "3.0.0": "dev"}
    assert seen[-1]["chat"]["3.0.0"].spec.upstream_model == "three"
    assert len(await again.history("chat")) == 7  # the config's versions are not recorded twice
    await _close(again)


async def test_without_a_database_stages_live_in_the_process():
    seen: list[Snapshot] = []
    registry = VersionRegistry(None, LocalStore(), CONFIGURED)
    await registry.start(seen.append)
    await registry.move("chat", "2.0.0", "production", key_id="k")
    assert _stages(seen[-1]) == {"1.0.0": "deprecated", "2.0.0": "production"}
    await registry.rollback("chat")
    assert _stages(seen[-1]) == {"1.0.0": "production", "2.0.0": "staging"}
    assert [h["reason"] for h in await registry.history("chat")] == ["replaced", "promoted", "rollback", "rollback"]


async def test_without_a_database_a_reload_adds_versions_that_can_then_move():
    seen: list[Snapshot] = []
    registry = VersionRegistry(None, LocalStore(), CONFIGURED)
    await registry.start(seen.append)
    await registry.move("chat", "2.0.0", "production", key_id="k")
    # the reloaded config adds 3.0.0 and says nothing new of the others: they keep the stages they moved to
    await registry.reconfigure({"chat": [*CONFIGURED["chat"], ModelVersion(version="3.0.0", stage="dev")]})
    assert _stages(registry.snapshot) == {"1.0.0": "deprecated", "2.0.0": "production", "3.0.0": "dev"}
    await registry.move("chat", "3.0.0", "staging", key_id="k")  # was 404 version_not_found
    assert _stages(seen[-1]) == {"1.0.0": "deprecated", "2.0.0": "production", "3.0.0": "staging"}


@pytest.mark.asyncio(loop_scope="session")  # the stores' pools live in the fixtures' loop
async def test_two_replicas_on_postgresql_agree_on_the_stage(store, pg_schema):
    first, seen_first = await _registry(PG_URL, store, pg_schema)
    second, seen_second = await _registry(PG_URL, store, pg_schema)  # also seeds: the rows are there already
    try:
        await first.move("chat", "2.0.0", "production", key_id="static-0")
        # the message (Redis) or the poll (every 0.5 s, also with a process-local store) brings it over
        await eventually(lambda: _stages(seen_second[-1]).get("2.0.0") == "production", within_s=5)
        assert _stages(seen_second[-1]) == _stages(seen_first[-1]) == {"1.0.0": "deprecated", "2.0.0": "production"}
        await second.rollback("chat", key_id="static-1")
        await eventually(lambda: _stages(seen_first[-1]).get("1.0.0") == "production", within_s=5)
        with pytest.raises(InvalidTransition):  # both replicas see the same rows: no second promotion of 1.0.0
            await first.move("chat", "1.0.0", "production")
        assert len(await first.history("chat")) == 6
    finally:
        await _close(first)
        await _close(second)


def test_versions_sort_by_semantic_precedence():
    ordered = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-beta", "1.0.0", "1.2.0", "1.10.0", "10.0.0"]
    assert sorted(reversed(ordered), key=semver_key) == ordered
