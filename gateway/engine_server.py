"""`pointsman engine`: one model of a config served alone, OpenAI-compatible, with vLLM's load gauges on /metrics."""

from __future__ import annotations

import msgspec.structs
from litestar import Litestar

from backends.base import EngineStats
from config.schema import Config, ModelConfig, PoliciesConfig, RoutingConfig, StorageConfig
from gateway.app import create_app

__all__ = ["create_engine_app", "engine_config", "find_model", "render_metrics"]

# the names backends/vllm_metrics.py reads from `vllm serve`, so a gateway polls this server as it polls vLLM
_GAUGES = (
    ("vllm:num_requests_running", "Number of requests in model execution batches.", "running"),
    ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", "waiting"),
    ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", "kv_cache_usage"),
)


def find_model(config: Config, name: str) -> ModelConfig | None:
    """The model whose id or alias is `name`."""
    return next((m for m in config.models if name == m.id or name in m.aliases), None)


def engine_config(config: Config, model: ModelConfig, host: str, port: int) -> Config:
    """`config` narrowed to `model`, loaded at startup: no policies, no usage rows, no shared state (the gateway
    in front of the engine keeps those)."""
    return msgspec.structs.replace(
        config,
        server=msgspec.structs.replace(config.server, host=host, port=port, workers=1),
        models=[msgspec.structs.replace(model, load="eager")],
        routing=RoutingConfig(load_balancing=config.routing.load_balancing, health_check_s=0),
        storage=StorageConfig(database_url=""),
        policies=PoliciesConfig(),
    )


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(model_name: str, stats: EngineStats | None) -> bytes:
    """Prometheus text exposition of the three load gauges (none when the backend reports no stats)."""
    lines: list[str] = []
    if stats is not None:
        label = f'{{model_name="{_escape(model_name)}"}}'
        for name, help_text, field in _GAUGES:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge",
                      f"{name}{label} {float(getattr(stats, field))!r}"]
    return ("\n".join(lines) + "\n").encode() if lines else b""


def create_engine_app(config: Config) -> Litestar:
    """The gateway app for a one-model config, plus /metrics; the model loads before the port opens (uvicorn
    binds after the startup hooks), so a supervisor's /health probe means "ready", as with `vllm serve`."""
    model = config.models[0]

    def load_gauges() -> bytes:
        stats = getattr(app.state.gateway.backends[model.id], "stats", None)
        return render_metrics(model.id, stats() if stats is not None else None)

    app = create_app(config, extra_metrics=load_gauges)  # /metrics: these, and the gateway's own when enabled
    app.state.engine_model = model

    async def load_model() -> None:
        await app.state.gateway.backends[model.id].start()

    app.on_startup.append(load_model)
    return app

