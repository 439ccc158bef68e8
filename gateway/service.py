"""The gateway's models at run time: backends, deployment pools, model versions, the router and classifier;
decides routes."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from datetime import UTC
from email.utils import format_datetime

import msgspec

from backends.base import Backend, build_backend
from config.schema import Config, EnginesConfig, ModelConfig
from gateway.deployments import DeploymentPool
from gateway.lifecycle import LocalModels, ManagedBackend, drained
from policies.context import ANONYMOUS, Principal
from policies.model_versions import Snapshot, VersionState, configured_states, reloaded_states
from protocol.errors import BadRequest, GatewayError, ModelNotFound, PermissionDenied, ServiceUnavailable
from protocol.openai import ModelCard, ModelList, ParsedEmbeddings, ParsedRequest
from routing.classifier import PromptAnalysis, TaskClassifier, request_text
from routing.resolve import ModelTable, Versions
from routing.router import Attempt, Decision, Router
from routing.scoring import CONTEXT_TOO_SMALL

__all__ = ["RELOADED", "Gateway", "restart_required"]

log = logging.getLogger("pointsman")
_READY_REUSE_S = 1.0  # /ready answers from a probe this recent
# prompts longer than this are classified in a worker thread, so the event loop never waits on it
_INLINE_CLASSIFY_CHARS = 2_000
# how often local engines' load figures are copied into the router's live state
_ENGINE_STATS_S = 0.2
# the config's top-level sections an in-process reload applies: models and routing (Gateway.reload), engines (the
# memory budget), responses (read per request from Gateway.config); every other one is built once, at start-up
RELOADED = frozenset({"models", "routing", "engines", "responses"})


class Gateway:
    """Holds the config's models and their backends for one app; no globals, so apps can run side by side."""

    def __init__(self, config: Config, backends: Mapping[str, Backend] | None = None) -> None:
        self.config = config
        self.local = LocalModels(config.engines)
        # every model id served: the config's models and their versions (id@version) that are not archived
        self.version_states: Snapshot = configured_states({m.id: m.versions for m in config.models})
        self.models = _expand(config, self.version_states)
        given = backends or {}
        built = _build_all({i: m for i, m in self.models.items() if i not in given}, config.engines)
        # every model served, and a model a reload took out while requests were in flight on it, until they end
        self.backends: dict[str, Backend] = {i: given[i] if i in given else self._managed(built[i])
                                             for i in self.models}
        self.pools = {i: DeploymentPool(m, self.backends[i], config) for i, m in self.models.items()}
        self.table, self.version_of, self.deprecations = _routing(config, self.models, self.version_states)
        self.router = self._router(config, self.table, self.pools)
        self.classifier = TaskClassifier.load()
        self.created: dict[str, int] = {}  # when each model id was first served: the cards' `created`
        # seeded from the OS per process: workers must not all draw the same sequence (power-of-two choices)
        self.rng = random.Random()
        self._tasks: list[asyncio.Task] = []
        self._health: asyncio.Task | None = None
        self._readiness: tuple[float, asyncio.Future[dict[str, bool]]] | None = None  # the last probe: when, what

    # ---- lifecycle

    def _managed(self, backend: Backend) -> Backend:
        """A local engine is managed (loaded on demand, within the memory budget); others are as built."""
        return self.local.wrap(backend) if backend.model.backend_kind == "transformers" else backend

    def start(self) -> None:
        """Load eager models in the background (/health answers at once, /ready once they are loaded)."""
        self.local.start()
        self._tasks.append(asyncio.create_task(self._load_eager(), name="pointsman-load"))
        self._start_health_checks()
        self._tasks.append(asyncio.create_task(self._read_engine_stats(), name="pointsman-engine-stats"))

    async def _load_eager(self) -> None:
        await self._start_all([self.backends[i] for i, m in self.models.items() if m.eager])

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

    def _start_health_checks(self) -> None:
        """Run the health checks when routing.health_check_s asks for them (at start and after a reload) and
        they do not run yet; a reload to 0 ends them (see _check_health)."""
        running = self._health is not None and not self._health.done()
        if not running and self.config.routing.health_check_s > 0:
            self._health = asyncio.create_task(self._check_health(), name="pointsman-health")
            self._tasks.append(self._health)

    async def _check_health(self) -> None:
        """Active health checks: mark deployments healthy or not, and read vLLM load signals, every
        routing.health_check_s as the config says now; until a reload sets it to 0 (off)."""
        while self.config.routing.health_check_s > 0:
            await asyncio.sleep(self.config.routing.health_check_s)
            if self.config.routing.health_check_s <= 0:
                return
            for model_id, pool in self.pools.items():
                # None: removed by a reload (a model taken out and still draining is probed no more)
                probe = getattr(self.backends.get(model_id), "probe", None) if model_id in self.models else None
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

    def _router(self, config: Config, table: ModelTable, pools: Mapping[str, DeploymentPool]) -> Router:
        # the availability of the pools it was built with: a request decided by this router after a reload
        # swapped them (see decide) reads its own models' pools, never the next config's
        router = Router(config, table, {k: p.live for k, p in pools.items()},
                        lambda model_id: pools[model_id].available())
        # a model kept out of automatic selection stays out whichever version serves it
        for base, served in zip(table.base_ids, table.models, strict=True):
            if served.id != base and base in router.excluded:
                router.excluded[served.id] = router.excluded[base]
        return router

    def reload(self, config: Config) -> dict[str, list[str]]:
        """Switch to `config`'s models without dropping a request: unchanged models keep their backend, pool
        and loaded weights; added and changed ones get new ones (eager ones start loading now); removed and
        replaced ones finish their requests in flight, then close. Routing settings come from the new config;
        versions keep their stages (the config's settings, and its stage for a version new to it). Only the
        sections in RELOADED are applied (see restart_required). Raises ValueError, nothing changed, when a
        model's backend cannot be built."""
        states = reloaded_states(self.version_states, {m.id: m.versions for m in config.models})
        summary = self._switch(config, states)
        log.warning("config reloaded: %s", ", ".join(f"{k} {v}" for k, v in summary.items() if v) or "no change")
        return summary

    def apply_versions(self, states: Snapshot) -> None:
        """The versions' new stages (from the registry): build what a new version needs, then switch what `id`
        resolves to in one step. Requests in flight finish on the version they started with."""
        before = {base: self.table.resolve(base) for base in self.table.base_ids}
        self._switch(self.config, states)
        for base, served in before.items():
            now = self.table.resolve(base)
            if now != served:
                log.warning("model versions: '%s' now serves %s (was %s)", base, now, served)

    def _switch(self, config: Config, states: Snapshot) -> dict[str, list[str]]:
        models = _expand(config, states)
        old = self.models
        kept = {i for i, m in models.items() if old.get(i) == m}
        if config.routing != self.config.routing or config.engines != self.config.engines:
            kept = set()  # pools and managed engines hold those settings: every model gets new ones
        built = _build_all({i: m for i, m in models.items() if i not in kept}, config.engines)  # may raise: no change
        retired = [(i, self.backends[i], self.pools[i]) for i in old if i not in kept]
        self.local.forget(i for i in old if i not in kept)
        if config is not self.config:
            self.local.configure(config.engines)
        backends = {i: self.backends[i] if i in kept else self._managed(built[i]) for i in models}
        pools = {i: self.pools[i] if i in kept else DeploymentPool(m, backends[i], config) for i, m in models.items()}
        table, version_of, deprecations = _routing(config, models, states)
        router = self._router(config, table, pools)
        # a model taken out (no longer in the table: no new request reaches it) keeps its backend and pool by its
        # id while requests are in flight on it: a stream waiting for its first payload then relays from them;
        # _retire lets go of them once they are idle
        leaving = {i for i in self.pools if i not in models and self.pools[i].in_flight}
        backends = {**{i: self.backends[i] for i in leaving}, **backends}
        pools = {**{i: self.pools[i] for i in leaving}, **pools}
        # one synchronous swap: a request decides and dispatches against one consistent set
        (self.config, self.models, self.version_states, self.backends, self.pools, self.table, self.version_of,
         self.deprecations, self.router) = (config, models, states, backends, pools, table, version_of,
                                            deprecations, router)
        self._readiness = None  # the next /ready probes the models served now
        self._tasks = [task for task in self._tasks if not task.done()]  # earlier switches' ended retires and loads
        for model_id, backend, pool in retired:
            self._tasks.append(asyncio.create_task(self._retire(model_id, backend, pool),
                                                   name=f"pointsman-retire-{model_id}"))
        fresh = [backends[i] for i, m in models.items() if i not in kept and m.eager]
        if fresh:
            self._tasks.append(asyncio.create_task(self._start_all(fresh), name="pointsman-reload-load"))
        self.local.start()
        self._start_health_checks()
        return {
            "added": [i for i in models if i not in old],
            "changed": [i for i in models if i in old and i not in kept],
            "removed": [i for i in old if i not in models],
            "kept": sorted(kept),
        }

    async def _retire(self, model_id: str, backend: Backend, pool: DeploymentPool, drain_s: float = 600.0) -> None:
        """Close a model taken out by a reload once its requests in flight have finished (at most `drain_s`);
        a removed one is then no longer found by its id."""
        await drained(lambda: pool.in_flight, drain_s, every_s=0.1)
        if self.pools.get(model_id) is pool:  # removed, and kept by its id while it drained
            self.backends = {i: b for i, b in self.backends.items() if i != model_id}
            self.pools = {i: p for i, p in self.pools.items() if i != model_id}
        try:
            await backend.aclose()
        except Exception:
            log.exception("closing model %s after a reload failed", backend.model.id)

    async def _start_all(self, backends: list[Backend]) -> None:
        results = await asyncio.gather(*(b.start() for b in backends), return_exceptions=True)
        for backend, result in zip(backends, results, strict=True):
            if isinstance(result, BaseException):
                log.error("model %s failed to load: %s", backend.model.id, result)

    async def ready(self) -> dict[str, bool]:
        """Whether each eager model answers: probed at most once a second, the callers in between (anyone may
        call /ready) sharing that probe's answer."""
        now = time.monotonic()
        if self._readiness is None or now - self._readiness[0] >= _READY_REUSE_S:
            self._readiness = (now, asyncio.ensure_future(self._probe_readiness()))
        return dict(await asyncio.shield(self._readiness[1]))

    async def _probe_readiness(self) -> dict[str, bool]:
        eager = [m.id for m in self.table.models if m.eager]  # what each id serves (its production version)
        states = await asyncio.gather(*(self.backends[i].health() for i in eager))
        return dict(zip(eager, states, strict=True))

    async def aclose(self) -> None:
        for task in [*self._tasks, *([self._readiness[1]] if self._readiness is not None else [])]:
            task.cancel()
        await self.local.aclose()
        await asyncio.gather(*(b.aclose() for b in self.backends.values()), return_exceptions=True)

    # ---- decisions

    def model_list(self, principal: Principal = ANONYMOUS) -> ModelList:
        """The served models, but for those the caller's key may not use."""
        return ModelList(data=[self._card(self.table.get(base), base) for base in self.table.base_ids
                               if principal.may_use(base)])

    def model_card(self, name: str, principal: Principal = ANONYMOUS) -> ModelCard:
        try:
            model = self.table.get(name)
        except GatewayError as exc:  # its 404 lists the models: only those the key may use
            raise self._for_key(exc, principal) from None
        if not principal.may_use(model.id):
            # as OpenAI: a model the key cannot use does not exist for it
            raise self.table.not_found(name, principal.may_use)
        return self._card(model, model.id if name == model.id else self.version_of.get(model.id, (model.id,))[0])

    def _card(self, model: ModelConfig, card_id: str) -> ModelCard:
        """OpenAI's fields, and a `pointsman` object: a local engine's status, load and footprint; a remote
        model's availability and deployments; a versioned model's versions and the one it serves."""
        backend, pool = self.backends[model.id], self.pools[model.id]
        if isinstance(backend, ManagedBackend):
            about = backend.describe()
        else:
            about = {"status": "available" if pool.available() else "unavailable", "backend": model.backend_kind,
                     "aliases": list(model.aliases), "deployments": len(pool.states),
                     "in_flight": pool.in_flight}
        base, version = self.version_of.get(model.id, (model.id, None))
        versions = self.table.versions.get(base)
        if versions is not None:
            about = {**about, "version": version, "versions": [{"version": v, "stage": s}
                                                               for v, s in versions.stages.items()]}
        created = self.created.setdefault(card_id, int(time.time()))
        return ModelCard(id=card_id, owned_by="pointsman", created=created, pointsman=about)

    def explain(self, decision: Decision) -> dict:
        """The decision explained, with the version the first model resolved to (a versioned model's)."""
        explanation = decision.explain()
        base, version = self.version_of.get(explanation["model"], (explanation["model"], None))
        if version is not None:
            explanation["version"] = {"model": base, "version": version,
                                      "stage": self.table.versions[base].stages[version]}
        return explanation

    async def analyse(self, request: ParsedRequest) -> PromptAnalysis:
        text = request_text(request.body)
        if len(text) <= _INLINE_CLASSIFY_CHARS:
            return self.classifier.classify(text)
        return await asyncio.to_thread(self.classifier.classify, text)

    async def decide(self, request: ParsedRequest, explain: bool = False, principal: Principal = ANONYMOUS
                     ) -> Decision:
        # one config's table, router and pools throughout: a reload while the prompt is analysed (in a thread
        # when it is long) must not hand this plan to the next config's router (a profile it no longer has)
        table, router, pools = self.table, self.router, self.pools
        try:
            plan = table.plan_request(request.body)
        except GatewayError as exc:
            raise self._for_key(exc, principal) from None
        analysis = await self.analyse(request) if plan.automatic or explain else None
        decision = router.decide(plan, request, analysis)
        if principal.restricted:
            _restrict(decision, principal, explain, _named(table, decision), request)
        if explain:
            decision.deployments = {a.model.id: pools[a.model.id].describe() for a in decision.attempts}
        return decision

    def decide_embeddings(self, request: ParsedEmbeddings, principal: Principal = ANONYMOUS) -> Decision:
        """The models to try for an embeddings request: `model` is an id, an alias or an `a:b` chain of them
        (tried in order); automatic selection picks chat models, so a profile in it is refused, and so is a model
        that cannot embed (a local chat engine), by name."""
        try:
            plan = self.table.plan(request.body.model)
        except GatewayError as exc:
            raise self._for_key(exc, principal) from None
        decision = Decision([], [e.name for e in plan.chain], live=self.router.live)  # for retry-after and holds
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
        if principal.restricted:
            _restrict(decision, principal, False, _named(self.table, decision))
        return decision

    def _for_key(self, error: GatewayError, principal: Principal) -> GatewayError:
        """A model's 404 worded for the caller's key: only the models it may use are listed."""
        name = getattr(error, "model_name", None)
        return self.table.not_found(name, principal.may_use) if name is not None and principal.restricted else error

    def removed_since(self, decision: Decision) -> ModelNotFound | None:
        """The 404 of a request whose every model a reload removed after it was decided (none was tried): not
        an outage of theirs to retry."""
        gone = [a.model.id for a in decision.attempts if a.model.id not in self.pools]
        if not gone or len(gone) < len(decision.attempts):
            return None
        return ModelNotFound(f"The model '{gone[0]}' was removed by a config reload while this request was routed "
                             "to it; the models served now are listed at /v1/models.", param="model")

    @staticmethod
    def nothing_to_try(decision: Decision, request: ParsedRequest | ParsedEmbeddings | None = None) -> GatewayError:
        """Why `decision` left nothing to try; a too-long prompt's 400 names `request`'s prompt field."""
        too_long = dict(decision.skipped)  # models named, skipped for their context window
        if not too_long and all(c.reason.startswith(CONTEXT_TOO_SMALL) for c in decision.candidates):
            too_long = {c.model: c.reason for c in decision.candidates}  # automatic routing's, all for that
        if not decision.attempts and too_long:
            return BadRequest(
                "The prompt plus max_tokens is longer than the context window of every model that could take it: "
                + "; ".join(f"{m}: {r}" for m, r in too_long.items()),
                param="messages" if request is None else request.prompt_param, code="context_length_exceeded",
            )
        if not decision.attempts:
            reasons = "; ".join(f"{c.model}: {c.reason}" for c in decision.candidates)
            if decision.candidates and all(c.unmet for c in decision.candidates):  # the client asks the impossible
                unmet = "; ".join(f"{c.model}: {c.unmet}" for c in decision.candidates)
                return BadRequest(f"No model meets this request's route requirements ({unmet}).", param="route",
                                  code="no_model_meets_requirements")
            return ServiceUnavailable(f"No model can take this request now ({reasons}).")
        names = ", ".join(a.model.id for a in decision.attempts)
        error = ServiceUnavailable(
            f"No deployment of {names} can take requests now: their circuit breakers are open after repeated "
            "failures; retry after the cooldown."
        )
        retry_after = decision.retry_after()  # when the first of their breakers half-opens
        if retry_after is not None:
            error.headers = {"retry-after": str(retry_after)}
        return error


def _restrict(decision: Decision, principal: Principal, explain: bool, named: set[str],
              request: ParsedRequest | ParsedEmbeddings | None = None) -> None:
    """Take the models the caller's key may not use out of the decision (ineligible, with the reason), so that
    neither automatic routing nor a fallback reaches them. Nothing left to try is a 403 when the client named a
    model it may not use (`named`: the ids its chain names); else the error the key's own models give when the
    request is at fault (no model meets the route's requirements, the prompt fits none), or a 403 with their
    reasons: never one naming models the key may not use. An explanation just shows it."""
    models = ", ".join(principal.allowed_models)
    reason = f"not allowed for this API key (its models: {models})"
    # ineligible candidates and skipped models too: an error about them would name them
    candidates = {a.model.id for a in decision.attempts} | {c.model for c in decision.candidates}
    candidates |= set(decision.skipped)
    refused = {model_id: reason for model_id in candidates if not principal.may_use(model_id)}
    if not refused:
        return
    decision.exclude(refused)
    if decision.attempts or explain:
        return
    if asked := sorted(named.intersection(refused)):
        raise PermissionDenied(f"This API key may not use {', '.join(asked)}; its models: {models}.", param="model")
    own = [c for c in decision.candidates if principal.may_use(c.model)]  # eligible or not: the key's only
    error = Gateway.nothing_to_try(Decision(
        [], decision.chain, decision.analysis, own,
        {model_id: why for model_id, why in decision.skipped.items() if principal.may_use(model_id)},
    ), request)
    if isinstance(error, BadRequest):  # the request itself: it fits none of them, or meets no route requirement
        raise error
    reasons = "; ".join(f"{c.model}: {c.reason}" for c in own) or "none of them can be chosen automatically"
    raise PermissionDenied(f"No model this API key may use can take this request ({reasons}); its models: {models}.",
                           param="model")


def _named(table: ModelTable, decision: Decision) -> set[str]:
    """The ids of the models a decision's chain names (an id or an alias; not an automatic choice)."""
    elements = (table.by_name.get(name) for name in decision.chain)
    return {element.model.id for element in elements if element is not None and element.model is not None}


def restart_required(running: Config, fresh: Config) -> list[str]:
    """The top-level sections of `fresh` that differ from the `running` config's but that a reload does not
    apply (all but RELOADED, read from Config's own fields: a new section is covered as it is added), in the
    config's order. `running`: the config the gateway started with, whose sections are in force until a restart."""
    return [field.name for field in msgspec.structs.fields(Config)
            if field.name not in RELOADED and getattr(running, field.name) != getattr(fresh, field.name)]


def _build_all(models: Mapping[str, ModelConfig], engines: EnginesConfig) -> dict[str, Backend]:
    """The models' backends, not started (they hold no connection or thread yet): one that cannot be built (a
    CA bundle that is not there, a header value with a newline) is a ValueError in one line naming its model."""
    built: dict[str, Backend] = {}
    for model_id, model in models.items():
        try:
            built[model_id] = build_backend(model, engines)
        except Exception as exc:
            problem = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise ValueError(f"model {model_id!r}: its backend cannot be built: {problem}") from exc
    return built


def _expand(config: Config, states: Snapshot) -> dict[str, ModelConfig]:
    """Every model id to serve: the config's models, and each version that is not archived as `id@version`.
    A stored version whose settings no longer fit its model is left out, loudly."""
    models: dict[str, ModelConfig] = {}
    for model in config.models:
        models[model.id] = model
        for version, state in states.get(model.id, {}).items():
            if state.stage == "archived":
                continue
            try:
                models[f"{model.id}@{version}"] = model.at_version(state.spec)
            except ValueError as exc:  # msgspec.ValidationError is one
                log.error("model %s version %s cannot be served: %s", model.id, version, exc)
    return models


def _routing(config: Config, models: Mapping[str, ModelConfig], states: Snapshot,
             ) -> tuple[ModelTable, dict[str, tuple[str, str]], dict[str, dict[str, str]]]:
    """The model table for these stages, each version id's (model, version), and the response headers of each
    deprecated version: `Deprecation: @<epoch seconds>` (RFC 9745; `true` while the date is not recorded) and
    `Sunset` (RFC 8594) when the version names one."""
    versions: dict[str, Versions] = {}
    version_of: dict[str, tuple[str, str]] = {}
    deprecations: dict[str, dict[str, str]] = {}
    for model in config.models:
        mine = states.get(model.id)
        if not mine:
            continue
        configs = {}
        for version, state in mine.items():
            version_id = f"{model.id}@{version}"
            version_of[version_id] = (model.id, version)
            if version_id in models:
                configs[version] = models[version_id]
            if state.stage == "deprecated":
                deprecations[version_id] = _deprecation_headers(state)
        serving = next((v for v, s in mine.items() if s.stage == "production" and v in configs), None)
        versions[model.id] = Versions({v: s.stage for v, s in mine.items()}, configs, serving)
    return ModelTable(config, versions), version_of, deprecations


def _deprecation_headers(state: VersionState) -> dict[str, str]:
    headers = {"deprecation": f"@{int(state.since.timestamp())}" if state.since is not None else "true"}
    sunset = state.spec.sunset
    if sunset is not None:
        headers["sunset"] = format_datetime(sunset.astimezone(UTC) if sunset.tzinfo else sunset.replace(tzinfo=UTC),
                                            usegmt=True)
    return headers
