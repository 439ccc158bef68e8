"""The template sandbox's limits on filters: arguments checked before a filter runs, results bounded, every filter
call counted and clocked, nothing run while compiling, and one time budget for all of a version's messages."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from jinja2 import pass_eval_context
from jinja2.filters import FILTERS

from config.schema import TemplateConfig, TemplateVersionConfig
from policies.context import RequestContext
from policies.database import migrate, open_engine
from policies.state import LocalStore
from policies.template_sandbox import _ENV, MAX_OUTPUT, SafeTemplate
from policies.templates import TemplatePolicy, compile_version
from protocol.errors import BadRequest
from protocol.openai import ChatCompletionRequest, decode_request


def _spec(content: str | list[str], version: str = "1.0.0", stage: str = "production",
          **variables: dict) -> TemplateVersionConfig:
    contents = [content] if isinstance(content, str) else content
    return msgspec.convert({"version": version, "stage": stage, "variables": variables,
                            "messages": [{"role": "system", "content": c} for c in contents]}, TemplateVersionConfig)


def _ctx(template: dict) -> RequestContext:
    raw = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "template": template}
    return RequestContext(decode_request(raw, ChatCompletionRequest))


def _policy(content: str | list[str], **variables: dict) -> TemplatePolicy:
    return TemplatePolicy([TemplateConfig(name="t", versions=[_spec(content, **variables)])], None, LocalStore())


async def _rendered(content: str, **given) -> str:
    variables = {key: {"type": "integer" if isinstance(value, int) else "string"} for key, value in given.items()}
    ctx = _ctx({"name": "t", "variables": given})
    await _policy(content, **variables).admit(ctx)
    return ctx.request.raw["messages"][0]["content"]


async def _limited(content: str | list[str], **given) -> BadRequest:
    variables = {key: {"type": "integer" if isinstance(value, int) else "string"} for key, value in given.items()}
    with pytest.raises(BadRequest) as info:
        await _policy(content, **variables).admit(_ctx({"name": "t", "variables": given}))
    assert info.value.status == 400 and info.value.code == "template_limit", info.value.message
    return info.value


@pytest.mark.parametrize(("source", "says"), [
    # tojson's indent multiplies every item: 5,000 items indented 90,000 wide were a 450 MB string
    ("{{ (range(5000)|list|tojson(indent=90000))|length }}", "indent=90000"),
    ("{{ (range(5000)|list|tojson(indent='x' * 90000))|length }}", "indent=90000"),
    ("{{ (range(5000)|list|tojson(indent=60))|length }}", "tojson would build"),
    # the slice count makes that many lists, whatever the input
    ("{{ [1]|slice(2000000)|list|length }}", "slices=2000000"),
    ("{{ ('a' * 9)|truncate(5, leeway=99999999) }}", "leeway=99999999"),
    ("{{ 5|round(-100000000) }}", "precision=-100000000"),
    # summing lists copies the running total at every item
    ("{{ ([[1]] * 5000)|sum(start=[])|length }}", "takes a number"),
    # filters going through 100,000 items count one step each (groupby looked 'real' up on each: 1.4 s)
    ("{{ ((range(10000)|list) * 10)|groupby('real')|list|length }}", "steps"),
    ("{{ ((range(10000)|list) * 10)|sort|length }}", "steps"),
    # results are bounded: urlencode triples a string
    ("{{ ('a ' * 50000)|urlencode|length }}", "more than 100000"),
    ("{{ ('x' * 40000)|tojson|length }}{{ ('<' * 40000)|tojson|length }}", "more than 100000"),
    # a list of 100,000 references to a 99,999-character string: ten gigabytes once printed or joined
    ("{% set s = 'x' * 99999 %}{{ ([s] * 100000)|length }}", "more than 100000"),
    ("{% set s = 'x' * 99999 %}{{ ([s, s]|string)|length }}", "more than 100000"),
    ("{% set s = 'x' * 60000 %}{{ ([s] ~ s)|length }}", "more than 100000"),
    ("{% set s = 'x' * 60000 %}{{ [[s], [s]]|join|length }}", "more than 100000"),
])
async def test_filters_arguments_and_results_stay_within_the_limits(source, says):
    error = await _limited(source)
    assert says in error.message


async def test_a_size_a_client_chooses_is_checked_like_a_literal_one():
    error = await _limited("{{ [1]|slice(n)|list|length }}", n=2_000_000)
    assert "slices=2000000" in error.message
    assert await _rendered("{{ [1, 2, 3, 4]|slice(n)|list }}", n=2) == "[[1, 2], [3, 4]]"


async def test_filters_mapped_over_items_count_each_call():
    await _limited("{{ ((range(10000)|list) * 10)|map('string')|list|length }}")
    await _limited("{{ ((range(10000)|list) * 10)|select('odd')|list|length }}")


@pytest.mark.parametrize(("source", "expected"), [
    ("{{ [1, [2]]|tojson(indent=2) }}", "[\n  1,\n  [\n    2\n  ]\n]"),
    ("{{ range(7)|slice(3)|list }}", "[[0, 1, 2], [3, 4], [5, 6]]"),
    ("{{ 'foo bar baz qux'|truncate(9) }}", "foo..."),
    ("{{ 3.14159|round(2) }} {{ [1, 2]|sum(start=10) }}", "3.14 13"),
    ("{{ [{'k': 1}, {'k': 2}, {'k': 1}]|groupby('k')|map(attribute='grouper')|join(',') }}", "1,2"),
    ("{{ 'a b'|urlencode }} {{ ['b', 'a']|sort|join }} {{ 'x' * 1000 ~ '' == 'x' * 1000 }}", "a%20b ab True"),
    ("{{ (range(1000)|list)|map('string')|select('ne', '5')|list|length }}", "999"),
])
async def test_ordinary_filters_render_as_before(source, expected):
    assert await _rendered(source) == expected


def test_nothing_is_folded_or_run_while_compiling(monkeypatch):
    from policies.template_sandbox import _FILTER_CHECKS, _guarded  # noqa: PLC0415

    calls = []

    @pass_eval_context
    def slice_(eval_ctx, value, slices, fill_with=None):
        calls.append(slices)
        return FILTERS["slice"](eval_ctx, value, slices, fill_with)

    monkeypatch.setitem(_ENV.filters, "slice", _guarded("slice", slice_, _FILTER_CHECKS["slice"]))
    source = "{{ [1]|slice(2000000)|list|length }}{% autoescape [1]|slice(2000000)|list|length %}{% endautoescape %}"
    compiled = compile_version("t", _spec(source))
    assert calls == []  # Jinja folds constant expressions at compile time: this one took 7.7 s in the admin POST
    assert "2000000" in _ENV.compile(_ENV.parse(source), raw=True)  # left in the code, for the render to run
    with pytest.raises(BadRequest) as info:
        compiled.render({})
    assert info.value.code == "template_limit" and "slices=2000000" in info.value.message
    assert calls == []  # refused before it ran
    assert SafeTemplate("{{ [1, 2]|slice(2)|list }}").render({}) == "[[1], [2]]" and calls == [2]


def test_filters_and_calls_outside_a_render_refuse_to_run():
    template = SafeTemplate("{{ 'a'|upper }}")
    assert template.render({}) == "A"
    with pytest.raises(Exception, match="only while rendering"):
        _ENV.filters["upper"]("a")  # what Jinja's constant folding would call


async def test_the_admin_api_adds_a_constant_runaway_at_once_and_refuses_it_when_used(tmp_path: Path):
    engine = open_engine(f"sqlite+aiosqlite:///{tmp_path}/templates.db")
    await migrate(engine)
    try:
        policy = TemplatePolicy([], engine, LocalStore())
        await policy.start()
        spec = _spec("{{ [1]|slice(2000000)|list|length }}", stage="dev")
        assert (await policy.create("dos", spec, "admin"))["stage"] == "dev"
        with pytest.raises(BadRequest) as info:
            await policy.admit(_ctx({"name": "dos", "version": "1.0.0"}))
        assert info.value.code == "template_limit"
        replica = TemplatePolicy([], engine, LocalStore())  # another replica loads it without running it
        await replica.start()
        await replica.aclose()
        assert replica.lookup("dos", "1.0.0").messages[0][1].source == spec.messages[0].content
        await policy.aclose()
    finally:
        await engine.dispose()


async def test_one_time_budget_covers_all_of_a_versions_messages(monkeypatch):
    import policies.templates as module  # noqa: PLC0415

    policy = _policy(["{{ 'a'|upper }}", "{{ 'b'|upper }}"])
    ctx = _ctx({"name": "t"})
    await policy.admit(ctx)
    assert [m["content"] for m in ctx.request.raw["messages"][:2]] == ["A", "B"]
    monkeypatch.setattr(module, "RENDER_LIMIT_S", -1.0)  # the version's budget spent before its first message
    error = await _limited(["{{ 'a'|upper }}", "{{ 'b'|upper }}"])
    assert "ms to render" in error.message


def test_the_rendered_text_stays_bounded():
    assert len(SafeTemplate("{{ ('x' * 40000)|tojson }}").render({})) == 40002 < MAX_OUTPUT


def test_a_stalled_thread_is_not_a_slow_render(monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget is the render's CPU time: measured on the wall clock, any stall of the event loop's thread over
    50 ms (the GIL, a busy host) failed ordinary templates now and then."""
    import time

    wall = iter(range(0, 10**9, 3600))  # every reading an hour after the last: a thread stalled at each step
    monkeypatch.setattr(time, "monotonic", lambda: float(next(wall)))
    template = SafeTemplate("{% for x in items %}{{ x|upper }} {% endfor %}{{ items|join(',')|length }}")
    assert template.render({"items": ["a", "b", "c"]}) == "A B C 5"
