"""Prompt templates: rendering into messages, variables, the sandbox's refusals and limits, stages and their
transitions in SQL (SQLite and PostgreSQL), a restart, and two replicas following one change."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from config.schema import Config, TemplateConfig, TemplateVersionConfig
from policies.cache import cache_key
from policies.context import RequestContext
from policies.database import migrate, open_engine
from policies.state import LocalStore, StateStore
from policies.template_sandbox import SafeTemplate
from policies.templates import TemplateArchived, TemplateConflict, TemplatePolicy, compile_version
from protocol.errors import BadRequest
from protocol.openai import ChatCompletionRequest, CompletionRequest, decode_request
from tests.policies.conftest import PG_URL, eventually

CONFIGURED = msgspec.convert([{
    "name": "support",
    "versions": [
        {"version": "1.0.0", "stage": "production",
         "messages": [{"role": "system", "content": "You help {{ customer }} with {{ product|upper }}."
                                                    "{% if vip %} Be quick.{% endif %}"}],
         "variables": {"customer": {}, "product": {"default": "billing"}, "vip": {"type": "boolean",
                                                                                   "default": False}}},
        {"version": "2.0.0", "stage": "staging",
         "messages": [{"role": "system", "content": "v2 for {{ customer }}: {{ items|join(', ') }}"},
                      {"role": "assistant", "content": "{{ count * 2 }} noted."}],
         "variables": {"customer": {}, "items": {"type": "array", "default": []},
                       "count": {"type": "integer", "default": 1}}},
        {"version": "0.9.0", "stage": "archived",
         "messages": [{"role": "system", "content": "old"}]},
    ],
}], list[TemplateConfig])
USER = [{"role": "user", "content": "my invoice is wrong"}]


def _spec(version: str, content: str, stage: str = "dev", **variables: dict) -> TemplateVersionConfig:
    return msgspec.convert({"version": version, "stage": stage, "messages": [{"role": "system", "content": content}],
                            "variables": variables}, TemplateVersionConfig)


def _ctx(template: dict | None = None, messages: list | None = None, **extra) -> RequestContext:
    raw = {"model": "m", "messages": USER if messages is None else messages, **extra}
    if template is not None:
        raw["template"] = template
    return RequestContext(decode_request(raw, ChatCompletionRequest))


async def _refused(policy: TemplatePolicy, template: dict, error: type = BadRequest) -> BadRequest:
    with pytest.raises(error) as info:
        await policy.admit(_ctx(template))
    return info.value


@pytest.fixture
def memory() -> TemplatePolicy:
    return TemplatePolicy(CONFIGURED, None, LocalStore())


# ---- rendering and variables --------------------------------------------------------------------------------


async def test_the_production_version_renders_before_the_requests_own_messages(memory):
    ctx = _ctx({"name": "support", "variables": {"customer": "Ada"}}, temperature=0)
    before = cache_key(ctx.request.raw, "m", "chat", "t")
    assert await memory.admit(ctx) is None
    assert ctx.request.raw["messages"] == [
        {"role": "system", "content": "You help Ada with BILLING."}, *USER]
    assert [m.content for m in ctx.request.body.messages] == ["You help Ada with BILLING.", USER[0]["content"]]
    assert "template" not in ctx.request.raw and ctx.request.raw["temperature"] == 0
    assert ctx.headers["x-pointsman-template"] == "support@1.0.0"
    # the cache keys on what is routed: the rendered messages, so other variables mean another entry
    other = _ctx({"name": "support", "variables": {"customer": "Bob"}}, temperature=0)
    await memory.admit(other)
    assert cache_key(ctx.request.raw, "m", "chat", "t") != cache_key(other.request.raw, "m", "chat", "t") != before


async def test_a_named_version_renders_every_message_and_a_template_alone_is_a_request(memory):
    ctx = _ctx({"name": "support", "version": "2.0.0",
                "variables": {"customer": "Ada", "items": ["a", "b"], "count": 4}}, messages=[])
    await memory.admit(ctx)
    assert ctx.request.raw["messages"] == [{"role": "system", "content": "v2 for Ada: a, b"},
                                           {"role": "assistant", "content": "8 noted."}]
    assert ctx.headers["x-pointsman-template"] == "support@2.0.0"


async def test_requests_without_a_template_are_untouched(memory):
    ctx = _ctx()
    request = ctx.request
    assert await memory.admit(ctx) is None
    assert ctx.request is request and not ctx.headers


def test_empty_messages_need_a_template():
    with pytest.raises(BadRequest) as info:
        decode_request({"model": "m", "messages": []}, ChatCompletionRequest)
    assert info.value.param == "messages"
    with pytest.raises(BadRequest) as info:
        decode_request({"model": "m", "messages": USER, "template": {"name": "x", "vars": {}}}, ChatCompletionRequest)
    assert info.value.param == "template.vars"  # the unknown field itself


@pytest.mark.parametrize(("variables", "param", "says"), [
    ({}, "template.variables.customer", "needs the variable"),
    ({"customer": 7}, "template.variables.customer", "type string, not integer"),
    ({"customer": "Ada", "vip": "yes"}, "template.variables.vip", "type boolean"),
    ({"customer": "Ada", "colour": "red"}, "template.variables.colour", "declares no variable"),
])
async def test_a_missing_wrongly_typed_or_unknown_variable_is_a_400_naming_it(memory, variables, param, says):
    error = await _refused(memory, {"name": "support", "variables": variables})
    assert error.status == 400 and error.param == param and says in error.message


async def test_integers_are_not_booleans_and_numbers_take_both(memory):
    error = await _refused(memory, {"name": "support", "version": "2.0.0",
                                    "variables": {"customer": "A", "count": True}})
    assert error.param == "template.variables.count"
    error = await _refused(memory, {"name": "support", "version": "2.0.0",
                                    "variables": {"customer": "A", "count": 1.5}})
    assert error.param == "template.variables.count"


async def test_unknown_templates_versions_and_archived_ones_are_refused(memory):
    error = await _refused(memory, {"name": "nope"})
    assert error.param == "template.name" and error.code == "template_not_found"
    error = await _refused(memory, {"name": "support", "version": "9.9.9", "variables": {"customer": "A"}})
    assert error.param == "template.version" and "1.0.0" in error.message
    error = await _refused(memory, {"name": "support", "version": "0.9.0"}, TemplateArchived)
    assert error.status == 410 and error.code == "template_archived"


async def test_a_legacy_completion_with_a_template_is_refused(memory):
    request = decode_request({"model": "m", "prompt": "x", "template": {"name": "support"}}, CompletionRequest)
    with pytest.raises(BadRequest, match="chat completions only"):
        await memory.admit(RequestContext(request))


async def test_render_into_replaces_an_earlier_rendering_as_an_experiment_arm_does(memory):
    ctx = _ctx({"name": "support", "variables": {"customer": "Ada"}})
    await memory.admit(ctx)
    memory.render_into(ctx, "support", "2.0.0")  # the arm's version; the request's variables still apply
    assert ctx.request.raw["messages"] == [{"role": "system", "content": "v2 for Ada: "},
                                           {"role": "assistant", "content": "2 noted."}, *USER]
    assert ctx.headers["x-pointsman-template"] == "support@2.0.0"


# ---- the sandbox ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ range.__globals__.os }}",
    "{{ customer.format_map }}{{ '{0.__class__}'.format(customer) }}",
    "{{ '%s' % customer }}",
    "{{ customer.expandtabs(9) }}",
])
async def test_a_sandbox_escape_is_a_400_and_is_logged(source, caplog):
    spec = _spec("1.0.0", source, customer={})
    policy = TemplatePolicy([TemplateConfig(name="evil", versions=[
        msgspec.structs.replace(spec, stage="production")])], None, LocalStore())
    with caplog.at_level(logging.WARNING, logger="pointsman.policies.templates"):
        error = await _refused(policy, {"name": "evil", "variables": {"customer": "x"}})
    assert error.status == 400 and error.code == "template_security_error"
    assert "tried to leave the sandbox" in caplog.text


@pytest.mark.parametrize("source", [
    "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
    "{{ 'a' * 1000000000 }}",
    "{% set a = 'x' * 90000 %}{{ a ~ a }}",
    "{{ ('x' * 1000).replace('x', 'y' * 1000) }}",
    "{{ (['x' * 50000] * 3)|join }}",
    "{{ range(100000000)|list }}",
    "{{ 'a'.ljust(1000000000) }}",
    "{% for i in range(5000) %}{{ 'x' * 50 }}{% endfor %}",
])
async def test_runaway_templates_stop_at_a_limit(source):
    policy = TemplatePolicy([TemplateConfig(name="big", versions=[_spec("1.0.0", source, "production")])], None,
                            LocalStore())
    error = await _refused(policy, {"name": "big"})
    assert error.status == 400 and error.code == "template_limit", error.message


async def test_render_errors_are_400s():
    policy = TemplatePolicy([TemplateConfig(name="t", versions=[
        _spec("1.0.0", "{{ (1 / n) }}{{ user.name }}", "production", n={"type": "integer"},
              user={"type": "object"})])], None, LocalStore())
    error = await _refused(policy, {"name": "t", "variables": {"n": 0, "user": {"name": "a"}}})
    assert error.code == "template_render_error" and "ZeroDivisionError" in error.message
    error = await _refused(policy, {"name": "t", "variables": {"n": 1, "user": {}}})
    assert error.code == "template_render_error" and "name" in error.message


@pytest.mark.parametrize(("source", "says"), [
    ("{% include 'other' %}", "include is not allowed"),
    ("{% extends 'base' %}", "extends is not allowed"),
    ("{% import 'm' as m %}", "import is not allowed"),
    ("{{ unclosed", "unexpected end of template"),
    ("{{ x|center(10) }}", "No filter named 'center'"),
    ("{{ undeclared }}", "undeclared variables: undeclared"),
])
def test_bad_templates_are_refused_before_any_request(source, says):
    with pytest.raises(ValueError, match=says):
        compile_version("t", _spec("1.0.0", source))


def test_a_default_of_the_wrong_type_is_refused():
    with pytest.raises(ValueError, match="not of type integer"):
        compile_version("t", _spec("1.0.0", "{{ n }}", n={"type": "integer", "default": "1"}))


def test_the_config_refuses_two_production_versions_and_a_bad_version():
    base = {"models": [{"id": "m", "backend": "openai", "base_url": "http://x"}]}
    message = [{"role": "system", "content": "x"}]
    with pytest.raises(msgspec.ValidationError, match="at most one version"):
        msgspec.convert({**base, "templates": [{"name": "t", "versions": [
            {"version": "1.0.0", "messages": message}, {"version": "1.1.0", "messages": message}]}]}, Config)
    with pytest.raises(msgspec.ValidationError, match="version"):
        msgspec.convert({**base, "templates": [{"name": "t", "versions": [{"version": "1.0", "messages": message}]}]},
                        Config)


def test_compiled_templates_read_no_globals_but_range():
    assert SafeTemplate("{{ a }}{% for i in range(b) %}{{ c[i] }}{% endfor %}").variables == {"a", "b", "c"}


# ---- SQL: stages, transitions, restart, replicas ----------------------------------------------------------------


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator:
    engine = open_engine(f"sqlite+aiosqlite:///{tmp_path}/templates.db")
    await migrate(engine)
    yield engine
    await engine.dispose()


async def _started(engine, state: StateStore | None = None) -> TemplatePolicy:
    policy = TemplatePolicy(CONFIGURED, engine, state or LocalStore())
    await policy.start()
    return policy


async def test_stages_move_by_the_rules_and_survive_a_restart(sqlite):
    policy = await _started(sqlite)
    try:
        with pytest.raises(TemplateConflict, match="through staging, or force"):
            await policy.create("support", _spec("3.0.0", "{{ customer }} v3", customer={}), "key-1")
            await policy.move("support", "3.0.0", "production", "key-1")
        await policy.move("support", "2.0.0", "production", "key-2")  # staging -> production
        assert policy.lookup("support", None).version == "2.0.0"
        assert policy.lookup("support", "1.0.0").stage == "deprecated"  # in the same transaction
        with pytest.raises(TemplateConflict, match="from archived"):
            await policy.move("support", "0.9.0", "production", "key-2")
        with pytest.raises(TemplateConflict, match="exists already"):
            await policy.create("support", _spec("2.0.0", "again"), "key-1")
        with pytest.raises(BadRequest, match="starts in dev or staging"):
            await policy.create("support", _spec("4.0.0", "x", "production"), "key-1")
        await policy.move("support", "3.0.0", "production", "key-3", force=True)
        await policy.move("support", "1.0.0", "archived", "key-3")
        history = await policy.history("support")
    finally:
        await policy.aclose()
    moves = [(h["version"], h["from"], h["to"], h["by"], h["forced"]) for h in history]
    assert ("2.0.0", "staging", "production", "key-2", False) in moves
    assert ("1.0.0", "production", "deprecated", "key-2", False) in moves
    assert ("3.0.0", "dev", "production", "key-3", True) in moves
    assert ("3.0.0", None, "dev", "key-1", False) in moves

    restarted = await _started(sqlite)  # the same config again: the database's stages stand
    try:
        assert restarted.lookup("support", None).version == "3.0.0"
        assert restarted.lookup("support", "2.0.0").stage == "deprecated"
        with pytest.raises(TemplateArchived):
            restarted.lookup("support", "1.0.0")
        ctx = _ctx({"name": "support", "variables": {"customer": "Ada"}})
        await restarted.admit(ctx)
        assert ctx.request.raw["messages"][0]["content"] == "Ada v3"
        assert ctx.headers["x-pointsman-template"] == "support@3.0.0"
    finally:
        await restarted.aclose()


async def test_a_version_with_a_bad_template_is_refused_and_nothing_is_written(sqlite):
    policy = await _started(sqlite)
    try:
        with pytest.raises(BadRequest, match="undeclared variables"):
            await policy.create("support", _spec("5.0.0", "{{ who }}"), "k")
        assert {v["version"] for v in policy.describe()[0]["versions"]} == {"0.9.0", "1.0.0", "2.0.0"}
        assert len(await policy.history("support")) == 3
    finally:
        await policy.aclose()


async def test_without_a_database_the_config_serves_and_nothing_can_change(memory):
    with pytest.raises(BadRequest, match="database"):
        await memory.create("x", _spec("1.0.0", "x"), "k")


@pytest.mark.asyncio(loop_scope="session")
async def test_two_replicas_on_postgresql_follow_one_promotion(store, pg_schema):
    engines = [open_engine(PG_URL, schema=pg_schema) for _ in range(2)]
    await migrate(engines[0], schema=pg_schema)
    one, two = [await _started(engine, store) for engine in engines]
    try:
        assert two.lookup("support", None).version == "1.0.0"
        await one.create("fresh", _spec("1.0.0", "hi {{ n }}", "staging", n={"type": "integer"}), "key-1")
        await one.move("support", "2.0.0", "production", "key-1")
        # pub/sub (Redis, or the same process's store) tells the other replica; it reloads from SQL
        await eventually(lambda: two.lookup("support", None).version == "2.0.0")
        await eventually(lambda: "fresh" in two._versions)
        ctx = _ctx({"name": "fresh", "version": "1.0.0", "variables": {"n": 3}})
        await two.admit(ctx)
        assert ctx.request.raw["messages"][0]["content"] == "hi 3"
    finally:
        for policy in (one, two):
            await policy.aclose()
        for engine in engines:
            await engine.dispose()
