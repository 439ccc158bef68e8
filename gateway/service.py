"""The gateway's models at run time: backends, deployment pools, the router and classifier; decides routes."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping

from backends.base import Backend, build_backend
from config.schema import Config
from gateway.deployments import DeploymentPool
from protocol.errors import BadRequest, GatewayError, ServiceUnavailable
from protocol.openai import ModelCard, ModelList, ParsedRequest
from routing.classifier import PromptAnalysis, TaskClassifier, request_text
from routing.resolve import ModelTable
from routing.router import Decision, Router

__all__ = ["Gateway"]

log = logging.getLogger("pointsman")
# prompts longer than this are classified in a worker thread, so the event loop never waits on it
_INLINE_CLASSIFY_CHARS = 2_000


class Gateway:
    """Holds the config's models and their backends for one app; no globals, so apps can run side by side."""

    def __init__(self, config: Config, backends: Mapping[str, Backend] | None = None) -> None:
        self.config = config
        self.table = ModelTable(config)
        self.backends: dict[str, Backend] = dict(
            backends or {m.id: build_backend(m, config.engines) for m in config.models})
        self.pools = {m.id: DeploymentPool(m, self.backends[m.id], config) for m in config.models}
        self.router = Router(config, self.table, {k: p.live for k, p in self.pools.items()},
                             lambda model_id: self.pools[model_id].available())
        self.classifier = TaskClassifier.load()
        self.model_list = ModelList(data=[ModelCard(id=m.id, owned_by="pointsman") for m in config.models])
        # seeded from the OS per process: workers must not all draw the same sequence (power-of-two choices)
        self.rng = random.Random()
        self._tasks: list[asyncio.Task] = []

    # ---- lifecycle

    def start(self) -> None:
        """Load eager models in the background (/health answers at once, /ready once they are loaded)."""
        self._tasks.append(asyncio.create_task(self._load_eager(), name="pointsman-load"))
        if self.config.routing.health_check_s > 0:
            self._tasks.append(asyncio.create_task(self._check_health(), name="pointsman-health"))

    async def _load_eager(self) -> None:
        eager = [self.backends[m.id] for m in self.config.models if m.eager]
        results = await asyncio.gather(*(b.start() for b in eager), return_exceptions=True)
        for backend, result in zip(eager, results, strict=True):
            if isinstance(result, BaseException):
                log.error("model %s failed to load: %s", backend.model.id, result)

    async def _check_health(self) -> None:
        """Active health checks: mark deployments healthy or not, and read vLLM load signals."""
        while True:
            await asyncio.sleep(self.config.routing.health_check_s)
            for model_id, pool in self.pools.items():
                probe = getattr(self.backends[model_id], "probe", None)
                if probe is None:
                    continue
                for index, state in enumerate(pool.states):
                    try:
                        healthy, signals = await probe(index)
                    except Exception:  # a probe must never end the loop
                        log.exception("health probe failed")
                        continue
                    pool.healthy[index] = healthy
                    if signals is not None:
                        state.apply_signals(signals.running, signals.waiting, signals.kv_cache_usage,
                                            asyncio.get_running_loop().time())
                    elif state.has_signals:
                        state.clear_signals()  # stale load figures would mislead the balancer

    async def ready(self) -> dict[str, bool]:
        eager = [m.id for m in self.config.models if m.eager]
        states = await asyncio.gather(*(self.backends[i].health() for i in eager))
        return dict(zip(eager, states, strict=True))

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(b.aclose() for b in self.backends.values()), return_exceptions=True)

    # ---- decisions

    def model_card(self, name: str) -> ModelCard:
        model = self.table.get(name)
        return next(card for card in self.model_list.data if card.id == model.id)

    async def analyse(self, request: ParsedRequest) -> PromptAnalysis:
        text = request_text(request.body)
        if len(text) <= _INLINE_CLASSIFY_CHARS:
            return self.classifier.classify(text)
        return await asyncio.to_thread(self.classifier.classify, text)

    async def decide(self, request: ParsedRequest, explain: bool = False) -> Decision:
        plan = self.table.plan_request(request.body)
        analysis = await self.analyse(request) if plan.automatic or explain else None
        decision = self.router.decide(plan, request, analysis)
        if explain:
            decision.deployments = {a.model.id: self.pools[a.model.id].describe() for a in decision.attempts}
        return decision

    @staticmethod
    def nothing_to_try(decision: Decision) -> GatewayError:
        if not decision.attempts and decision.skipped:
            return BadRequest(
                "The prompt plus max_tokens is longer than the context window of every model that could take it: "
                + "; ".join(f"{m}: {r}" for m, r in decision.skipped.items()),
                param="messages", code="context_length_exceeded",
            )
        if not decision.attempts:
            reasons = "; ".join(f"{c.model}: {c.reason}" for c in decision.candidates)
            return ServiceUnavailable(f"No model can take this request now ({reasons}).")
        names = ", ".join(a.model.id for a in decision.attempts)
        return ServiceUnavailable(
            f"No deployment of {names} can take requests now: their circuit breakers are open after repeated "
            "failures; retry after the cooldown."
        )
