"""The gateway's models at run time: backends, deployment pools, the router and classifier; decides routes."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping

from backends.base import Backend, build_backend
from config.schema import Config, ModelConfig
from gateway.deployments import DeploymentPool
from gateway.lifecycle import LocalModels, ManagedBackend
from protocol.errors import BadRequest, GatewayError, ServiceUnavailable
from protocol.openai import ModelCard, ModelList, ParsedEmbeddings, ParsedRequest
from routing.classifier import PromptAnalysis, TaskClassifier, request_text
from routing.resolve import ModelTable
from routing.router import Attempt, Decision, Router

__all__ = ["Gateway"]

log = logging.getLogger("pointsman")
# prompts longer than this are classified in a worker thread, so the event loop never waits on it
_INLINE_CLASSIFY_CHARS = 2_000
# how often local engines' load figures are copied into the router's live state
_ENGINE_STATS_S = 0.2


class Gateway:
    """Holds the config's models and their backends for one app; no globals, so apps can run side by side."""

    def __init__(self, config: Config, backends: Mapping[str, Backend] | None = None) -> None:
        self.config = config
        self.local = LocalModels(config.engines)
        self.table = ModelTable(config)
        self.backends: dict[str, Backend] = dict(backends or {m.id: self._build(m, config) for m in config.models})
        self.pools = {m.id: DeploymentPool(m, self.backends[m.id], config) for m in config.models}
        self.router = Router(config, self.table, {k: p.live for k, p in self.pools.items()},
                             lambda model_id: self.pools[model_id].available())
        self.classifier = TaskClassifier.load()
        self.created: dict[str, int] = {}  # when each model id was first served: the cards' `created`
        # seeded from the OS per process: workers must not all draw the same sequence (power-of-two choices)
        self.rng = random.Random()
        self._tasks: list[asyncio.Task] = []

    # ---- lifecycle

    def _build(self, model: ModelConfig, config: Config) -> Backend:
        """A model's backend; local engines are managed (loaded on demand, within the memory budget)."""
        backend = build_backend(model, config.engines)
        return self.local.wrap(backend) if model.backend_kind == "transformers" else backend

    def start(self) -> None:
        """Load eager models in the background (/health answers at once, /ready once they are loaded)."""
        self.local.start()
        self._tasks.append(asyncio.create_task(self._load_eager(), name="pointsman-load"))
        if self.config.routing.health_check_s > 0:
            self._tasks.append(asyncio.create_task(self._check_health(), name="pointsman-health"))
        self._tasks.append(asyncio.create_task(self._read_engine_stats(), name="pointsman-engine-stats"))

    async def _load_eager(self) -> None:
        await self._start_all([self.backends[m.id] for m in self.config.models if m.eager])

    async def _read_engine_stats(self) -> None:
        """Local engines' own load (running, waiting, slots in use) into their live state, as vLLM's /metrics
        poll does for vLLM: auto scoring, the balancer and /v1/route see it. Reading it costs microseconds."""
        while True:
            now = asyncio.get_running_loop().time()
            for model_id, backend in self.backends.items():
                stats = getattr(backend, "stats", None)
                pool = self.pools.get(model_id)
                if stats is not None and pool is not None:
                    figures = stats()
                    pool.states[0].apply_signals(figures.running, figures.waiting, figures.kv_cache_usage, now)
            await asyncio.sleep(_ENGINE_STATS_S)

    async def _check_health(self) -> None:
        """Active health checks: mark deployments healthy or not, and read vLLM load signals."""
        while True:
            await asyncio.sleep(self.config.routing.health_check_s)
            for model_id, pool in self.pools.items():
                probe = getattr(self.backends.get(model_id), "probe", None)  # None: removed by a reload
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

    def reload(self, config: Config) -> dict[str, list[str]]:
        """Switch to `config`'s models without dropping a request: unchanged models keep their backend, pool
        and loaded weights; added and changed ones get new ones (eager ones start loading now); removed and
        replaced ones finish their requests in flight, then close. Routing settings come from the new config;
        policies and storage are not reloaded."""
        old = {m.id: m for m in self.config.models}
        kept = {m.id for m in config.models if old.get(m.id) == m}
        if config.routing != self.config.routing or config.engines != self.config.engines:
            kept = set()  # pools and managed engines hold those settings: every model gets new ones
        retired = [(self.backends[i], self.pools[i]) for i in old if i not in kept]
        self.local.forget(i for i in old if i not in kept)
        self.local.budget = LocalModels(config.engines).budget
        backends = {m.id: self.backends[m.id] if m.id in kept else self._build(m, config) for m in config.models}
        pools = {m.id: self.pools[m.id] if m.id in kept else DeploymentPool(m, backends[m.id], config)
                 for m in config.models}
        # one synchronous swap: a request decides and dispatches against one consistent set
        self.config, self.table, self.backends, self.pools = config, ModelTable(config), backends, pools
        self.router = Router(config, self.table, {k: p.live for k, p in pools.items()},
                             lambda model_id: self.pools[model_id].available())
        for backend, pool in retired:
            self._tasks.append(asyncio.create_task(_retire(backend, pool), name=f"pointsman-retire-{pool.model_id}"))
        fresh = [backends[m.id] for m in config.models if m.id not in kept and m.eager]
        self._tasks.append(asyncio.create_task(self._start_all(fresh), name="pointsman-reload-load"))
        self.local.start()
        summary = {
            "added": [m.id for m in config.models if m.id not in old],
            "changed": [m.id for m in config.models if m.id in old and m.id not in kept],
            "removed": [i for i in old if i not in backends],
            "kept": sorted(kept),
        }
        log.warning("config reloaded: %s", ", ".join(f"{k} {v}" for k, v in summary.items() if v) or "no change")
        return summary

    async def _start_all(self, backends: list[Backend]) -> None:
        results = await asyncio.gather(*(b.start() for b in backends), return_exceptions=True)
        for backend, result in zip(backends, results, strict=True):
            if isinstance(result, BaseException):
                log.error("model %s failed to load: %s", backend.model.id, result)

    async def ready(self) -> dict[str, bool]:
        eager = [m.id for m in self.config.models if m.eager]
        states = await asyncio.gather(*(self.backends[i].health() for i in eager))
        return dict(zip(eager, states, strict=True))

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.local.aclose()
        await asyncio.gather(*(b.aclose() for b in self.backends.values()), return_exceptions=True)

    # ---- decisions

    def model_list(self) -> ModelList:
        return ModelList(data=[self._card(m) for m in self.config.models])

    def model_card(self, name: str) -> ModelCard:
        return self._card(self.table.get(name))

    def _card(self, model: ModelConfig) -> ModelCard:
        """OpenAI's fields, and a `pointsman` object: a local engine's status, load and footprint; a remote
        model's availability and deployments."""
        backend, pool = self.backends[model.id], self.pools[model.id]
        if isinstance(backend, ManagedBackend):
            about = backend.describe()
        else:
            about = {"status": "available" if pool.available() else "unavailable", "backend": model.backend_kind,
                     "aliases": list(model.aliases), "deployments": len(pool.states),
                     "in_flight": sum(state.in_flight for state in pool.states)}
        created = self.created.setdefault(model.id, int(time.time()))
        return ModelCard(id=model.id, owned_by="pointsman", created=created, pointsman=about)

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

    def decide_embeddings(self, request: ParsedEmbeddings) -> Decision:
        """The models to try for an embeddings request: `model` is an id, an alias or an `a:b` chain of them
        (tried in order); automatic selection picks chat models, so a profile in it is refused, and so is a model
        that cannot embed (a local chat engine), by name."""
        plan = self.table.plan(request.body.model)
        decision = Decision([], [e.name for e in plan.chain])
        for position, element in enumerate(plan.chain):
            model = element.model
            if model is None:
                raise BadRequest(f"'{element.name}' selects a chat model automatically: name an embeddings model "
                                 "for /v1/embeddings.", param="model")
            if not callable(getattr(self.backends[model.id], "embeddings", None)):
                raise BadRequest(f"The model '{model.id}' does not serve embeddings: it is a chat model.",
                                 param="model", code="model_not_supported")
            if all(a.model.id != model.id for a in decision.attempts):
                decision.attempts.append(Attempt(model, "fallback" if position else "manual"))
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


async def _retire(backend: Backend, pool: DeploymentPool, drain_s: float = 600.0) -> None:
    """Close a model taken out by a reload once its requests in flight have finished (at most `drain_s`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + drain_s
    while any(state.in_flight for state in pool.states) and loop.time() < deadline:
        await asyncio.sleep(0.1)
    try:
        await backend.aclose()
    except Exception:
        log.exception("closing model %s after a reload failed", backend.model.id)
