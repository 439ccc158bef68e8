"""Local models at run time: load on demand, unload when idle or asked, and stay within the memory budget."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Literal

from backends.base import Backend
from backends.model_loader import estimate_bytes
from config.schema import EnginesConfig, TransformersModel
from protocol.errors import InsufficientMemory, ServiceUnavailable
from protocol.openai import ParsedRequest

__all__ = ["LocalModels", "ManagedBackend", "Status", "drained"]

log = logging.getLogger("pointsman.engines")

Status = Literal["unloaded", "loading", "loaded", "failed"]
_GIB = 2**30


class ManagedBackend:
    """A local engine as the gateway sees it: every request first makes sure it is loaded (within the memory
    budget, through LocalModels) and is counted in flight while it runs, so an idle model can be unloaded and
    a busy one never is. Everything else (stats, deployments, probes) is the engine's own."""

    def __init__(self, inner: Backend, models: LocalModels) -> None:
        self.inner = inner
        self.model: TransformersModel = inner.model  # type: ignore[assignment]  # only local engines are managed
        self._models = models
        self.status: Status = "unloaded"
        self.error: str | None = None
        self.in_flight = 0
        self.last_used = time.monotonic()
        self.load_s: float | None = None
        self.estimate_bytes = _estimate(inner)
        self.lock = asyncio.Lock()

    def __getattr__(self, name: str) -> Any:  # stats(), deployments, probe...: the engine's
        return getattr(self.inner, name)

    async def start(self) -> None:
        await self._models.ensure(self)

    async def health(self) -> bool:
        return self.status == "loaded" and await self.inner.health()

    async def aclose(self) -> None:
        self.status = "unloaded"
        await self.inner.aclose()

    async def complete(self, request: ParsedRequest, deployment: int = 0,
                       headers: dict[str, str] | None = None) -> bytes:
        self._begin()
        try:
            await self._models.ensure(self)
            return await self.inner.complete(request, deployment, headers)
        finally:
            self._end()

    async def stream(self, request: ParsedRequest, deployment: int = 0,
                     headers: dict[str, str] | None = None) -> AsyncIterator[bytes]:
        self._begin()
        try:
            await self._models.ensure(self)
            async for chunk in self.inner.stream(request, deployment, headers):
                yield chunk
        finally:
            self._end()

    def describe(self) -> dict[str, Any]:
        """The `pointsman` object of this model in /v1/models."""
        stats = getattr(self.inner, "stats", None)
        figures = stats() if stats is not None and self.status == "loaded" else None
        return {
            "status": self.status,
            "backend": self.model.backend_kind,
            "aliases": list(self.model.aliases),
            "memory_estimate_bytes": self.estimate_bytes,
            "in_flight": self.in_flight,
            "running": figures.running if figures else 0,
            "queue_length": figures.waiting if figures else 0,
            "tokens_per_s": figures.tokens_per_s if figures else None,
            "queue_wait_s": figures.queue_wait_s if figures else None,
            "load_s": None if self.load_s is None else round(self.load_s, 3),
            "error": self.error,
        }

    def _begin(self) -> None:
        self.in_flight += 1  # before ensure(): a model someone waits for is never chosen for eviction
        self.last_used = time.monotonic()

    def _end(self) -> None:
        self.in_flight -= 1
        self.last_used = time.monotonic()


class LocalModels:
    """Loads and unloads the local engines. With `engines.memory_budget_gb`, the loaded models' estimated
    footprints stay within it: loading one that does not fit first unloads the least recently used idle ones
    (none in flight), and when that cannot make room the request gets a 503 `insufficient_memory` (a fallback
    chain moves on) instead of the process running out of memory. Loads are serialised: on a CPU box they
    compete for the same cores anyway, and one at a time keeps the budget arithmetic exact. Models with
    `idle_unload_s` are unloaded after that long without a request."""

    def __init__(self, engines: EnginesConfig) -> None:
        self.budget: int | None = None
        self.configure(engines)
        self.managed: dict[str, ManagedBackend] = {}
        self._load_lock = asyncio.Lock()
        self._idle_task: asyncio.Task[None] | None = None

    def configure(self, engines: EnginesConfig) -> None:
        """Take the memory budget from `engines` (at start and on a config reload)."""
        self.budget = None if engines.memory_budget_gb is None else int(engines.memory_budget_gb * _GIB)

    def wrap(self, backend: Backend) -> ManagedBackend:
        managed = ManagedBackend(backend, self)
        self.managed[backend.model.id] = managed
        return managed

    def forget(self, model_ids: Iterable[str]) -> None:
        for model_id in model_ids:
            self.managed.pop(model_id, None)

    @property
    def used_bytes(self) -> int:
        return sum(m.estimate_bytes for m in self.managed.values() if m.status in ("loaded", "loading"))

    async def ensure(self, managed: ManagedBackend) -> None:
        """Load `managed` unless it is loaded; raises InsufficientMemory or ServiceUnavailable."""
        if managed.status == "loaded":
            return
        async with self._load_lock:
            if managed.status == "loaded":
                return
            await self._make_room(managed)
            managed.status, managed.error = "loading", None
            started = time.monotonic()
            try:
                await managed.inner.start()
            except Exception as exc:
                managed.status, managed.error = "failed", str(exc)
                log.error("model %s failed to load: %s", managed.model.id, exc)
                raise ServiceUnavailable(f"Model '{managed.model.id}' failed to load: {exc}") from exc
            except BaseException:
                managed.status = "unloaded"
                raise
            managed.status, managed.load_s = "loaded", time.monotonic() - started
            managed.last_used = time.monotonic()
            log.info("model %s loaded in %.1f s (estimated %.0f MiB)", managed.model.id, managed.load_s,
                     managed.estimate_bytes / 2**20)

    async def unload(self, managed: ManagedBackend, reason: str) -> None:
        if managed.status not in ("loaded", "failed"):
            return
        managed.status = "unloaded"
        await managed.inner.aclose()
        log.info("model %s unloaded (%s)", managed.model.id, reason)

    async def _make_room(self, managed: ManagedBackend) -> None:
        if self.budget is None:
            return
        need = managed.estimate_bytes
        if need > self.budget:
            raise InsufficientMemory(
                f"Model '{managed.model.id}' needs an estimated {need / _GIB:.2f} GiB, more than the whole "
                f"engines.memory_budget_gb of {self.budget / _GIB:.2f} GiB."
            )
        while self.used_bytes + need > self.budget:
            idle = [m for m in self.managed.values() if m.status == "loaded" and m.in_flight == 0 and m is not managed]
            if not idle:
                busy = ", ".join(m.model.id for m in self.managed.values() if m.status == "loaded") or "none"
                raise InsufficientMemory(
                    f"Model '{managed.model.id}' needs an estimated {need / _GIB:.2f} GiB and only "
                    f"{(self.budget - self.used_bytes) / _GIB:.2f} GiB of engines.memory_budget_gb is free; the "
                    f"loaded models are busy ({busy}). Try again when they are idle."
                )
            victim = min(idle, key=lambda m: m.last_used)
            await self.unload(victim, f"making room for {managed.model.id}")

    # ---- idle unloading

    def start(self) -> None:
        """Watch for idle models when one has `idle_unload_s`; again after a reload, never twice."""
        running = self._idle_task is not None and not self._idle_task.done()
        if not running and any(m.model.idle_unload_s for m in self.managed.values()):
            self._idle_task = asyncio.create_task(self._unload_idle(), name="pointsman-idle-unload")

    async def aclose(self) -> None:
        if self._idle_task is not None:
            self._idle_task.cancel()

    async def _unload_idle(self) -> None:
        while True:
            limits = [m.model.idle_unload_s for m in self.managed.values() if m.model.idle_unload_s]
            await asyncio.sleep(min([*limits, 60.0]) / 4)
            now = time.monotonic()
            for managed in list(self.managed.values()):
                idle_s = managed.model.idle_unload_s
                if (idle_s and managed.status == "loaded" and managed.in_flight == 0
                        and now - managed.last_used >= idle_s):
                    try:
                        await self.unload(managed, f"idle for {idle_s:g} s")
                    except Exception:
                        log.exception("unloading idle model %s failed", managed.model.id)


def _estimate(backend: Backend) -> int:
    """The loaded footprint in bytes, estimated from the weight files' headers and the dtype (0: unknown)."""
    model = backend.model
    if not isinstance(model, TransformersModel):
        return 0
    try:
        return estimate_bytes(model)
    except Exception as exc:  # an unreadable source fails later, when loading says why
        log.warning("model %s: no memory estimate (%s)", model.id, exc)
        return 0


async def drained(busy: Callable[[], int], within_s: float, every_s: float = 0.05) -> bool:
    """Wait until `busy()` (requests in flight) is 0, at most `within_s`; True when it got there."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while busy() and loop.time() < deadline:
        await asyncio.sleep(every_s)
    return not busy()
