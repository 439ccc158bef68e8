"""Config reloads in process: the sections a reload leaves for a restart (restart_required, in the answer and a
warning), health checks that follow routing.health_check_s, a decision made across a reload, a model whose backend
cannot be built, reloads one at a time, and what `pointsman admin models reload` prints."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

import msgspec
import pytest

from config.schema import Config, EnginesConfig, ModelConfig
from gateway import admin_cli, service
from gateway.app import create_app
from gateway.cli import main
from gateway.pipeline import Pipeline
from gateway.service import RELOADED, Gateway, restart_required
from policies.base import PolicyChain
from policies.context import ANONYMOUS, RequestContext
from protocol.errors import BadRequest, ModelNotFound
from protocol.openai import ChatCompletionRequest, ParsedRequest

MODEL = {"id": "a", "backend": "openai", "base_url": "http://127.0.0.1:9/v1", "load": "lazy"}

# a changed value for each section a reload does not apply
CHANGED = {
    "server": {"port": 8001},
    "auth": {"api_keys": ["a-static-key"]},
    "storage": {"database_url": "sqlite+aiosqlite:///elsewhere.db"},
    "policies": {"budgets": [{"scope": "global", "max_tokens": 1000}]},
    "templates": [{"name": "greet", "versions": [{"version": "1.0.0",
                                                  "messages": [{"role": "user", "content": "hi"}]}]}],
    "experiments": [{"name": "e", "target": "a",
                     "variants": [{"name": "x", "model": "a"}, {"name": "y", "model": "a"}]}],
    "tracing": {"enabled": True, "exporter": "none"},
    "metrics": {"enabled": True},
    "logging": {"requests": True},
}


def _config(models: list[dict] | None = None, **sections: object) -> Config:
    raw = {"models": models or [MODEL], "routing": {"health_check_s": 0}, "storage": {"database_url": ""},
           **sections}
    return msgspec.convert(raw, Config, strict=False)


def _request(model: str) -> ParsedRequest:
    raw = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return ParsedRequest(msgspec.convert(raw, ChatCompletionRequest), raw)


async def _until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll `condition` on the loop until it holds: a wait on a condition, never a fixed sleep."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def test_restart_required_names_each_changed_section_that_a_reload_does_not_apply():
    running = _config()
    assert restart_required(running, _config()) == []
    names = [field.name for field in msgspec.structs.fields(Config)]
    # every section but those a reload applies, read from Config itself: a new section is covered as it is added
    # (give it a changed value in CHANGED, or add it to RELOADED when a reload applies it)
    assert set(CHANGED) == set(names) - RELOADED
    assert restart_required(running, _config(**CHANGED)) == [name for name in names if name in CHANGED]
    assert restart_required(running, _config(logging={"requests": True})) == ["logging"]
    applied = _config([{**MODEL, "id": "b"}], routing={"health_check_s": 0, "retries": 0},
                      engines={"memory_budget_gb": 1}, responses={"store_ttl_s": 60})
    assert restart_required(running, applied) == []


async def test_a_reload_answers_and_warns_which_changed_sections_wait_for_a_restart(caplog):
    """An operator lowered a budget and reloaded: the answer listed only the models, so the budget seemed in force."""
    started = _config()
    file = {"config": started}
    app = create_app(started, reload_from=lambda: file["config"])
    gateway = app.state.gateway
    try:
        with caplog.at_level(logging.WARNING, logger="pointsman"):
            answer = await app.state.reload()
            assert answer["restart_required"] == []  # always there
            file["config"] = _config([MODEL, {**MODEL, "id": "b"}], policies=CHANGED["policies"],
                                     logging=CHANGED["logging"])
            answer = await app.state.reload()
            assert answer["added"] == ["b"] and answer["restart_required"] == ["policies", "logging"]
            assert gateway.table.ids == ["a", "b"]  # the models are applied
            warnings = [r.getMessage() for r in caplog.records if "restart" in r.getMessage()]
            assert len(warnings) == 1 and "policies, logging" in warnings[0] and "SIGHUP" in warnings[0]
            # the same file again: the budget is still not in force, and the answer still says so
            assert (await app.state.reload())["restart_required"] == ["policies", "logging"]
            file["config"] = started  # back to what runs: nothing waits for a restart
            assert (await app.state.reload())["restart_required"] == []
    finally:
        await gateway.aclose()


class _Probed:
    """A backend whose health probes are counted (all instances together)."""

    probes = 0

    def __init__(self, model: ModelConfig, engines: EnginesConfig | None = None) -> None:
        self.model = model

    async def start(self) -> None:
        return None

    async def health(self) -> bool:
        return True

    async def probe(self, deployment: int) -> tuple[bool, None]:
        _Probed.probes += 1
        return True, None

    async def aclose(self) -> None:
        return None


def _health_checks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "pointsman-health" and not t.done()]


async def test_health_checks_end_when_a_reload_turns_them_off_and_start_when_one_turns_them_on(monkeypatch):
    """routing.health_check_s: 0 is off; after a reload to 0 the loop slept 0 s between rounds, probing every
    deployment back to back without end; and a reload from 0 to a period never started the checks."""
    monkeypatch.setattr(service, "build_backend", _Probed)
    gateway = Gateway(_config(routing={"health_check_s": 0.01}))
    gateway.start()
    try:
        await _until(lambda: _Probed.probes >= 2)
        gateway.reload(_config(routing={"health_check_s": 0}))
        await _until(lambda: not _health_checks())
        gateway.reload(_config(routing={"health_check_s": 0.01}))
        seen = _Probed.probes
        await _until(lambda: _Probed.probes > seen)
        assert len(_health_checks()) == 1
    finally:
        await gateway.aclose()


async def test_a_request_decided_across_a_reload_keeps_one_configs_table_router_and_pools(monkeypatch):
    """A long prompt is classified in a thread: a reload that removed a profile and a model landed meanwhile,
    and the request's plan (old table) went to the new router: KeyError, a 500 (so did /v1/route's)."""
    profiles = {"custom": {"quality": 1.0, "cost": 0.0, "latency": 0.0, "load": 0.0}}
    gateway = Gateway(_config([MODEL, {**MODEL, "id": "gone"}], routing={"health_check_s": 0, "profiles": profiles}))
    analysing, release = [], asyncio.Event()
    analyse = gateway.analyse

    async def slow(request: ParsedRequest):
        analysing.append(request)
        await release.wait()
        return await analyse(request)

    monkeypatch.setattr(gateway, "analyse", slow)
    try:
        automatic = asyncio.create_task(gateway.decide(_request("auto-custom")))
        explained = asyncio.create_task(gateway.decide(_request("gone"), explain=True))
        await _until(lambda: len(analysing) == 2)
        assert gateway.reload(_config())["removed"] == ["gone"]  # the profile is gone too
        release.set()
        assert {a.model.id for a in (await automatic).attempts} == {"a", "gone"}  # decided as the request came
        assert list((await explained).deployments) == ["gone"]
    finally:
        await gateway.aclose()


async def test_a_removed_model_stays_reachable_by_its_id_until_its_requests_in_flight_end():
    """A stream waiting for its first payload when a reload removed its model then looked the model up by id to
    relay it (gateway.backends[id]): KeyError, a 500 to a request the reload should have let finish."""
    gateway = Gateway(_config([MODEL, {**MODEL, "id": "gone"}, {**MODEL, "id": "idle"}]))
    try:
        backend, pool = gateway.backends["gone"], gateway.pools["gone"]
        lease = pool.lease(0)  # in flight
        assert gateway.reload(_config())["removed"] == ["gone", "idle"]
        assert gateway.table.ids == ["a"] and "gone" not in gateway.models  # no new request reaches it
        assert gateway.backends["gone"] is backend and gateway.pools["gone"] is pool  # the one in flight does
        assert "idle" not in gateway.backends  # nothing in flight: let go at once
        gateway.reload(_config())  # a later reload keeps it while it drains
        assert gateway.backends["gone"] is backend
        lease.ok()
        await _until(lambda: "gone" not in gateway.backends and "gone" not in gateway.pools)
    finally:
        await gateway.aclose()


async def test_a_request_whose_models_a_reload_removed_after_its_decision_is_a_404_not_an_outage():
    """Decided, then its only model removed (nothing in flight on it) while a policy's approve ran: every attempt
    was skipped and the answer blamed open circuit breakers, a 503 to retry after a cooldown that never ends."""
    gateway = Gateway(_config([MODEL, {**MODEL, "id": "gone"}]))
    pipeline = Pipeline(gateway, PolicyChain())
    try:
        request = _request("gone")
        ctx = RequestContext(request, ANONYMOUS)
        decision = await gateway.decide(request)
        gateway.reload(_config())
        with pytest.raises(ModelNotFound) as caught:
            await pipeline._first_success(ctx, decision, lambda *args: asyncio.sleep(0))
        assert caught.value.status == 404 and "'gone' was removed by a config reload" in caught.value.message
    finally:
        await gateway.aclose()


@pytest.mark.parametrize("broken", [
    {"base_url": "https://127.0.0.1:9/v1", "tls": {"ca_bundle": "/nonexistent/ca.pem"}},
    {"api_key": "sk-one\ntwo"},
], ids=["missing-ca-bundle", "newline-in-api-key"])
async def test_a_model_whose_backend_cannot_be_built_fails_the_reload_in_one_line_and_changes_nothing(broken):
    """The file is valid YAML and fits the schema, but a backend cannot be built from it: a 500 "internal error"
    after the local models were already forgotten; now a 400 naming the model, in one line, nothing changed."""
    file = {"config": _config()}
    app = create_app(file["config"], reload_from=lambda: file["config"])
    gateway = app.state.gateway
    backend = gateway.backends["a"]
    try:
        file["config"] = _config([{**MODEL, "id": "b"}, {**MODEL, "id": "broken", **broken}])
        with pytest.raises(BadRequest) as refused:
            await app.state.reload()
        message = refused.value.message
        assert "nothing changed" in message and "'broken'" in message and "\n" not in message
        assert gateway.table.ids == ["a"] and gateway.backends == {"a": backend}
        file["config"] = _config([MODEL, {**MODEL, "id": "b"}])
        assert (await app.state.reload())["added"] == ["b"]  # a good file goes through afterwards
    finally:
        await gateway.aclose()


async def test_reloads_run_one_at_a_time_so_the_newer_file_is_applied_last():
    """A SIGHUP beside a POST /admin/reload: the first read the file before it changed and took its time; the
    second read the new file and was applied; then the first applied the old file over it."""
    old, new = _config(), _config([{**MODEL, "id": "b"}])
    reads: list[Config] = []
    reading, release = threading.Event(), threading.Event()

    def read() -> Config:
        if not reads:  # the first reload reads the file as it was, slowly
            reads.append(old)
            reading.set()
            release.wait(10)
            return old
        reads.append(new)
        return new

    app = create_app(old, reload_from=read)
    try:
        first = asyncio.create_task(app.state.reload())
        assert await asyncio.to_thread(reading.wait, 10)
        second = asyncio.create_task(app.state.reload())
        # an absence can only be awaited for a while: the second overtook the first within milliseconds
        done, _ = await asyncio.wait({second}, timeout=0.5)
        assert not done and reads == [old]
        release.set()
        assert (await first)["kept"] == ["a"] and (await second)["added"] == ["b"]
        assert app.state.gateway.table.ids == ["b"]
    finally:
        release.set()
        await app.state.gateway.aclose()


@pytest.mark.parametrize("pending", [[], ["policies", "auth"]])
def test_admin_models_reload_prints_restart_required_only_when_sections_wait(monkeypatch, capsys, pending):
    answer = {"object": "reload", "added": ["b"], "changed": [], "removed": [], "kept": ["a"],
              "restart_required": pending}
    monkeypatch.setattr(admin_cli, "_call", lambda *args, **kwargs: answer)
    assert main(["admin", "models", "reload"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["added", "b"]
    if pending:
        assert "restart_required  policies,auth" in out and "restarts" in out
    else:
        assert "restart" not in out
