"""`pointsman engine`'s pieces: the narrowed config and the /metrics page the vLLM poller reads."""

from __future__ import annotations

import msgspec

from backends.base import EngineStats
from backends.vllm_metrics import iter_samples, parse_vllm_metrics
from config.loader import parse_config
from gateway.engine_server import engine_config, find_model, render_metrics

CONFIG = """
models:
  - {id: local, backend: transformers, source: /nowhere, load: lazy, aliases: [l]}
  - {id: remote, backend: openai, base_url: "http://127.0.0.1:9/v1"}
routing: {health_check_s: 2, auto_pool: [remote]}
policies: {cache: {mode: always}, rate_limits: [{rpm: 5}]}
storage: {redis_url: "redis://127.0.0.1:6379/0"}
"""


def test_metrics_page_reads_back_through_the_vllm_parser() -> None:
    page = render_metrics("tiny", EngineStats(running=3, waiting=5, kv_cache_usage=0.375, tokens_per_s=40.0))
    load = parse_vllm_metrics(page.decode())
    assert (load.running, load.waiting, load.kv_cache_usage) == (3.0, 5.0, 0.375)
    assert b"# TYPE vllm:num_requests_waiting gauge" in page


def test_metrics_label_is_escaped() -> None:
    odd = 'org/model "v2"\\x'
    samples = list(iter_samples(render_metrics(odd, EngineStats(1, 0, 0.5)).decode()))
    assert [labels["model_name"] for _, labels, _ in samples] == [odd] * 3


def test_no_stats_renders_an_empty_page() -> None:
    assert render_metrics("remote", None) == b""


def test_engine_config_keeps_one_eager_model_and_drops_policies_and_storage() -> None:
    config = parse_config(CONFIG)
    model = find_model(config, "l")
    assert model is not None and model.id == "local" and find_model(config, "nope") is None
    narrowed = engine_config(config, model, "127.0.0.1", 8123)
    assert [m.id for m in narrowed.models] == ["local"] and narrowed.models[0].eager
    assert narrowed.models[0].aliases == ["l"]
    assert (narrowed.server.host, narrowed.server.port, narrowed.server.workers) == ("127.0.0.1", 8123, 1)
    assert narrowed.policies.cache is None and not narrowed.policies.rate_limits
    assert narrowed.storage.redis_url is None and narrowed.storage.database_url == ""
    assert narrowed.routing.auto_pool == ["*"] and narrowed.routing.health_check_s == 0
    msgspec.convert(msgspec.to_builtins(narrowed), type(narrowed))  # still a valid config
