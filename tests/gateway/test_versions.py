"""The gateway's version switch in process: what `id` resolves to changes in one step, a request already decided
keeps its version's backend, deprecated versions get their headers, archived ones are closed."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from config.schema import Config
from gateway.service import Gateway
from policies.model_versions import VersionState
from protocol.openai import ChatCompletionRequest, ParsedRequest


def _config() -> Config:
    return msgspec.convert({"models": [{
        "id": "chat", "backend": "openai", "base_url": "http://127.0.0.1:9/v1", "load": "lazy",
        "versions": [{"version": "1.0.0", "stage": "production"},
                     {"version": "2.0.0", "stage": "deprecated", "sunset": "2030-01-01T00:00:00Z"}]}],
        "routing": {"health_check_s": 0}}, Config, strict=False)


def _request(model: str = "chat") -> ParsedRequest:
    raw = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return ParsedRequest(msgspec.convert(raw, ChatCompletionRequest), raw)


async def test_a_switch_moves_new_requests_and_keeps_decided_ones_on_their_version():
    gateway = Gateway(_config())
    try:
        assert gateway.deprecations == {"chat@2.0.0": {"deprecation": "true",  # no recorded date without SQL
                                                       "sunset": "Tue, 01 Jan 2030 00:00:00 GMT"}}
        decided = await gateway.decide(_request())
        assert decided.attempts[0].model.id == "chat@1.0.0"
        old_backend = gateway.backends["chat@1.0.0"]
        since = datetime(2026, 11, 26, tzinfo=UTC)
        specs = {v.version: v for v in gateway.config.models[0].versions}
        gateway.apply_versions({"chat": {"1.0.0": VersionState(specs["1.0.0"], "deprecated", since),
                                         "2.0.0": VersionState(specs["2.0.0"], "production", since)}})
        assert (await gateway.decide(_request())).attempts[0].model.id == "chat@2.0.0"
        # the request decided before the switch still finds its version's backend, the very same one
        assert gateway.backends[decided.attempts[0].model.id] is old_backend
        assert gateway.deprecations == {"chat@1.0.0": {"deprecation": f"@{int(since.timestamp())}"}}
        card = gateway.model_list().data[0]
        assert card.id == "chat" and card.pointsman["version"] == "2.0.0"
        assert gateway.model_card("chat@1.0.0").id == "chat@1.0.0"
        gateway.apply_versions({"chat": {"1.0.0": VersionState(specs["1.0.0"], "archived", since),
                                         "2.0.0": VersionState(specs["2.0.0"], "production", since)}})
        assert "chat@1.0.0" not in gateway.backends  # retired once its requests finish
        assert gateway.table.versions["chat"].stages == {"1.0.0": "archived", "2.0.0": "production"}
    finally:
        await gateway.aclose()


async def test_a_reload_keeps_the_stages_and_adds_the_configs_new_versions():
    gateway = Gateway(_config())
    try:
        specs = {v.version: v for v in gateway.config.models[0].versions}
        gateway.apply_versions({"chat": {"1.0.0": VersionState(specs["1.0.0"], "deprecated"),
                                         "2.0.0": VersionState(specs["2.0.0"], "production")}})
        raw = msgspec.to_builtins(_config())
        raw["models"][0]["versions"].append({"version": "3.0.0", "stage": "dev", "upstream_model": "three"})
        summary = gateway.reload(msgspec.convert(raw, Config))
        assert summary["added"] == ["chat@3.0.0"] and "chat@2.0.0" in summary["kept"]
        assert gateway.table.resolve("chat") == "chat@2.0.0"  # the stage the registry set, not the config's
        assert gateway.table.get("chat@3.0.0").sent_model == "three"
    finally:
        await gateway.aclose()
