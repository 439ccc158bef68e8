"""The `model` grammar: ids and aliases, profiles, ':' chains matched longest-first, and other clients' fields."""

from __future__ import annotations

import pytest

from config.loader import parse_config
from protocol.errors import BadRequest, ModelNotFound
from protocol.openai import ChatCompletionRequest, decode_request
from routing.resolve import ModelTable, requested_chain


def chain(**fields):
    """requested_chain of a chat request with these fields, decoded as the gateway decodes it."""
    raw = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return requested_chain(decode_request(raw, ChatCompletionRequest).body)

CONFIG = """
routing:
  profiles:
    coding: {quality: 0.9, cost: 0.1, latency: 0, load: 0}
models:
  - {id: smollm2, backend: openai, base_url: "http://127.0.0.1:1/v1", aliases: [small]}
  - {id: remote-a, backend: openai, base_url: "http://127.0.0.1:2/v1"}
  - {id: remote-b, backend: openai, base_url: "http://127.0.0.1:3/v1"}
  - {id: "org/model:v2", backend: openai, base_url: "http://127.0.0.1:4/v1"}
  - {id: "org/model", backend: openai, base_url: "http://127.0.0.1:5/v1"}
"""


@pytest.fixture(scope="module")
def table() -> ModelTable:
    return ModelTable(parse_config(CONFIG))


def _names(table: ModelTable, name: str) -> list[tuple[str | None, str | None]]:
    return [(e.model.id if e.model else None, e.profile) for e in table.plan(name).chain]


def test_ids_aliases_and_profiles(table):
    assert _names(table, "smollm2") == [("smollm2", None)]
    assert _names(table, "small") == [("smollm2", None)]
    assert _names(table, "auto") == [(None, "balanced")]
    for profile in ("fast", "cheap", "quality", "coding"):
        assert _names(table, f"auto-{profile}") == [(None, profile)]
    assert not table.plan("small").automatic and table.plan("auto-fast").automatic


def test_chains_and_longest_match(table):
    assert _names(table, "smollm2:auto") == [("smollm2", None), (None, "balanced")]
    assert _names(table, "remote-a:remote-b:auto-cheap") == [("remote-a", None), ("remote-b", None), (None, "cheap")]
    # an id containing ':' wins over its prefix
    assert _names(table, "org/model:v2") == [("org/model:v2", None)]
    assert _names(table, "org/model:v2:org/model") == [("org/model:v2", None), ("org/model", None)]
    assert _names(table, "org/model:small") == [("org/model", None), ("smollm2", None)]


@pytest.mark.parametrize("name,bad", [("nope", "nope"), ("smollm2:nope", "nope"), ("nope:auto", "nope"),
                                      ("smollm2:", "smollm2:"), ("auto-turbo", "auto-turbo")])
def test_unknown_elements_are_named(table, name, bad):
    with pytest.raises(ModelNotFound) as err:
        table.plan(name)
    assert f"'{bad}'" in err.value.message and err.value.code == "model_not_found"
    assert "remote-a" in err.value.message


def test_other_clients_fields():
    assert chain(model="x", auto_select=True) == ["auto"]
    assert chain(preferred_model="remote-a") == ["remote-a", "auto"]
    assert chain(preferred_model="remote-a", fallback_mode="none") == ["remote-a"]
    assert chain(preferred_model="remote-a", fallback_mode="remote-b") == ["remote-a", "remote-b"]
    assert chain(models=["remote-a", "remote-b"]) == ["remote-a", "remote-b"]
    assert chain(model="smollm2", models=["remote-a", "smollm2"]) == ["smollm2", "remote-a"]
    with pytest.raises(BadRequest) as err:
        chain()
    assert err.value.param == "model"
    # the types are checked once, when the body is decoded
    for field, value in [("models", "remote-a"), ("preferred_model", ""), ("auto_select", "yes"), ("models", [""])]:
        with pytest.raises(BadRequest) as err:
            chain(**{field: value})
        assert err.value.param.startswith(field)


def test_plan_request_joins_the_fields(table):
    raw = {"messages": [{"role": "user", "content": "hi"}], "preferred_model": "small",
           "fallback_mode": "remote-b:auto-fast"}
    plan = table.plan_request(decode_request(raw, ChatCompletionRequest).body)
    assert [(e.model.id if e.model else e.profile) for e in plan.chain] == ["smollm2", "remote-b", "fast"]


def test_ids_of_parses_names_with_colons_as_routing_does(table):
    """What an experiment checks a key against: a model whose id has a colon is one model, not two."""
    assert table.ids_of("org/model:v2") == ("org/model:v2",)
    assert table.ids_of("small:org/model:v2") == ("smollm2", "org/model:v2")
    assert table.ids_of("remote-a:auto") == ("remote-a",)  # auto chooses among the caller's own
    assert table.ids_of("nope") == ("nope",)
    assert table.first_id("small:remote-b") == "smollm2" and table.first_id("auto") == "auto"
