"""Resolve the `model` field a client sends (an id or an alias) to the configured model it names."""

from __future__ import annotations

from dataclasses import dataclass

from config.schema import Config, ModelConfig
from gateway.errors import ModelNotFound

__all__ = ["ModelTable", "Route"]


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request goes: the chain of models to try, in order, and how it was chosen."""

    chain: tuple[ModelConfig, ...]
    mode: str = "manual"  # manual | auto | fallback

    @property
    def model(self) -> ModelConfig:
        return self.chain[0]


class ModelTable:
    """Every routable name (ids and aliases), built once from the config."""

    def __init__(self, config: Config) -> None:
        self.models: tuple[ModelConfig, ...] = tuple(config.models)
        self.by_name: dict[str, ModelConfig] = {}
        for model in self.models:
            self.by_name[model.id] = model
            for alias in model.aliases:
                self.by_name[alias] = model
        self._routes = {name: Route((model,)) for name, model in self.by_name.items()}

    @property
    def ids(self) -> list[str]:
        return [m.id for m in self.models]

    def get(self, name: str) -> ModelConfig:
        model = self.by_name.get(name)
        if model is None:
            raise self.not_found(name)
        return model

    def resolve(self, name: str) -> Route:
        route = self._routes.get(name)
        if route is None:
            raise self.not_found(name)
        return route

    def not_found(self, name: str) -> ModelNotFound:
        return ModelNotFound(
            f"The model '{name}' does not exist. Available models: {', '.join(self.ids)}.",
            param="model",
        )
