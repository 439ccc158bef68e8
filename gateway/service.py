"""The request pipeline behind the handlers: resolve the model, call its backend, report what was served."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from backends.base import Backend, build_backend
from config.schema import Config
from gateway.protocol import ModelCard, ModelList, ParsedRequest
from routing.resolve import ModelTable, Route

__all__ = ["Gateway", "Served", "StreamStart"]

log = logging.getLogger("pointsman")


@dataclass(slots=True)
class Served:
    route: Route
    body: bytes

    @property
    def headers(self) -> dict[str, str]:
        return route_headers(self.route)


@dataclass(slots=True)
class StreamStart:
    """A stream whose first payload already arrived: errors before it were still answerable as HTTP errors."""

    route: Route
    first: bytes | None
    rest: AsyncIterator[bytes]

    @property
    def headers(self) -> dict[str, str]:
        return route_headers(self.route)


def route_headers(route: Route) -> dict[str, str]:
    return {"x-pointsman-model": route.model.id, "x-pointsman-route": route.mode}


class Gateway:
    """Holds the config's models and their backends for one app; no globals, so apps can run side by side."""

    def __init__(self, config: Config, backends: Mapping[str, Backend] | None = None) -> None:
        self.config = config
        self.table = ModelTable(config)
        self.backends: dict[str, Backend] = dict(backends or {m.id: build_backend(m) for m in config.models})
        self.model_list = ModelList(data=[ModelCard(id=m.id, owned_by="pointsman") for m in config.models])
        self._loading: asyncio.Task | None = None

    # ---- lifecycle

    def start_loading(self) -> None:
        """Load eager models in the background: /health answers at once, /ready once they are loaded."""
        self._loading = asyncio.create_task(self._load_eager(), name="pointsman-load")

    async def _load_eager(self) -> None:
        eager = [self.backends[m.id] for m in self.config.models if m.eager]
        results = await asyncio.gather(*(b.start() for b in eager), return_exceptions=True)
        for backend, result in zip(eager, results, strict=True):
            if isinstance(result, BaseException):
                log.error("model %s failed to load: %s", backend.model.id, result)

    async def ready(self) -> dict[str, bool]:
        eager = [m.id for m in self.config.models if m.eager]
        states = await asyncio.gather(*(self.backends[i].health() for i in eager))
        return dict(zip(eager, states, strict=True))

    async def aclose(self) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        await asyncio.gather(*(b.aclose() for b in self.backends.values()), return_exceptions=True)

    # ---- requests

    def model_card(self, name: str) -> ModelCard:
        model = self.table.get(name)
        return next(card for card in self.model_list.data if card.id == model.id)

    async def complete(self, request: ParsedRequest) -> Served:
        route = self.table.resolve(request.body.model)
        return Served(route, await self.backends[route.model.id].complete(request))

    async def stream(self, request: ParsedRequest) -> StreamStart:
        route = self.table.resolve(request.body.model)
        rest = aiter(self.backends[route.model.id].stream(request))
        try:
            first = await anext(rest)
        except StopAsyncIteration:
            first = None
        return StreamStart(route, first, rest)
