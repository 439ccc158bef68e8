"""The backend contract and the registry that maps a model's `backend:` tag to its implementation."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from config.schema import ModelConfig
from protocol.openai import ParsedRequest

__all__ = ["BACKENDS", "Backend", "build_backend"]


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
}


def build_backend(model: ModelConfig) -> Backend:
    module, _, name = BACKENDS[model.backend_kind].partition(":")
    return getattr(importlib.import_module(module), name)(model)
