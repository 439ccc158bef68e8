"""The backend contract and the registry that maps a model's `backend:` tag to its implementation."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from config.schema import EnginesConfig, ModelConfig
from protocol.openai import ParsedRequest

__all__ = ["BACKENDS", "Backend", "EngineStats", "build_backend"]


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A local engine's live load: what the router scores (as it does vLLM's /metrics) and `pointsman engine`
    exports on its /metrics. Local engines have a `stats() -> EngineStats` method; remote backends do not."""

    running: int  # sequences in the running batch
    waiting: int  # requests queued for a place in it
    kv_cache_usage: float  # 0..1: the share of the engine's sequence slots (or KV-cache budget) in use
    tokens_per_s: float | None = None  # measured aggregate decode rate, None until measured
    queue_wait_s: float | None = None  # recent time from arrival to a place in the batch (EWMA), None until measured


@runtime_checkable
class Backend(Protocol):
    """One configured model. The request's Struct type says which endpoint (chat or text completion).

    `complete` returns the JSON body of a `chat.completion` / `text_completion`; `stream` yields the JSON
    payload of each chunk (without the `data: ` framing, without `[DONE]`). Both raise `GatewayError`s.
    When `headers` is a dict, a backend fills it with the response headers worth relaying to the client
    (`retry-after`, `retry-after-ms`, `x-ratelimit-*`, lowercase) as soon as it has them: for `stream`, before
    the first payload is yielded. A backend with nothing to relay leaves it empty.
    A backend with several deployments lists them as `deployments: [(key, weight)]`; `deployment` is an
    index into that list, chosen by the balancer (a local engine is its own single deployment).
    """

    model: ModelConfig

    async def start(self) -> None:
        """Load weights or open connection pools; called once at startup (eager) or on first use."""

    async def complete(self, request: ParsedRequest, deployment: int = 0,
                       headers: dict[str, str] | None = None) -> bytes: ...

    def stream(self, request: ParsedRequest, deployment: int = 0,
               headers: dict[str, str] | None = None) -> AsyncIterator[bytes]: ...

    async def health(self) -> bool:
        """True when the model is loaded, or its upstream answers."""

    async def aclose(self) -> None: ...


# the `backend:` tag -> "module:Class"; imported lazily so torch loads only when a local model is configured
BACKENDS: dict[str, str] = {
    "transformers": "backends.transformers_engine:TransformersBackend",
    "openai": "backends.openai_upstream:OpenAIBackend",
    "vllm": "backends.openai_upstream:OpenAIBackend",
    "embeddings": "backends.embeddings:EmbeddingsBackend",
}


def build_backend(model: ModelConfig, engines: EnginesConfig | None = None) -> Backend:
    """The backend for `model`; local engines also get the `engines:` settings (cache dir, memory budget)."""
    module, _, name = BACKENDS[model.backend_kind].partition(":")
    cls = getattr(importlib.import_module(module), name)
    return cls(model, engines or EnginesConfig()) if model.backend_kind == "transformers" else cls(model)
