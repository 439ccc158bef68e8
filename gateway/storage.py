"""Opens what the config's `storage` section names (the usage database, the hot-state store) and closes it."""

from __future__ import annotations

import logging
from collections.abc import Callable

from backends.embedder import Embedder
from config.schema import ExperimentConfig, PoliciesConfig, StorageConfig, TemplateConfig
from policies.alerts import BudgetAlerts
from policies.base import Policy
from policies.budget import BudgetPolicy
from policies.cache import ExactCache
from policies.database import migrate, open_engine
from policies.experiments import ExperimentPolicy, ExperimentStore
from policies.rate_limit import RateLimitPolicy
from policies.redis_state import RedisStore
from policies.semantic_cache import SemanticCache
from policies.state import LocalStore, StateStore
from policies.templates import TemplatePolicy
from policies.usage import UsagePolicy
from policies.usage_log import UsageLog

__all__ = ["Storage"]

log = logging.getLogger("pointsman")


class Storage:
    """The app's shared state: the usage log (when `database_url` is set) and the state store (Redis when
    `redis_url` is set, else in process). Built with the app; `start` migrates and starts the writer."""

    def __init__(self, config: StorageConfig) -> None:
        self.url = config.database_url
        self.engine = open_engine(self.url) if self.url else None
        self.usage = UsageLog(self.engine) if self.engine is not None else None
        self.state: StateStore = (RedisStore(config.redis_url, timeout_s=config.redis_timeout_s) if config.redis_url
                                   else LocalStore())
        self.budgets: BudgetPolicy | None = None  # for /v1/usage, once the config has budgets
        self.rate_limits: RateLimitPolicy | None = None  # for /v1/usage too, once it has rate limits
        self.alerts: BudgetAlerts | None = None
        self.embedder: Embedder | None = None  # loaded on first use, only when the semantic cache is on
        self.experiments: ExperimentStore | None = None  # with a database: the experiments' rows and snapshot
        self.templates: TemplatePolicy | None = None  # prompt templates; experiments render through it too
        self.keyed = False  # API keys from the database, each with its own budget, are in use

    def policies(self, config: PoliciesConfig, resolve: Callable[[str], str], keyed: bool = False,
                 first_id: Callable[[str], str] | None = None) -> list[Policy]:
        """The policies the config asks for, on this storage; `resolve` maps a model name to its id, `first_id` a
        name (a chain too) to the id of the model it routes to first. `keyed`: API keys from the database are in
        use, and each may carry its own budget and rate limit, so both policies run even when the config sets
        none."""
        policies: list[Policy] = []
        self.keyed = keyed
        if config.rate_limits or keyed:
            self.rate_limits = RateLimitPolicy(config.rate_limits, self.state, first_id or resolve)
            policies.append(self.rate_limits)
        if config.cache is not None and config.cache.mode != "off":
            policies.append(ExactCache(config.cache, self.state, resolve))
            if config.cache.semantic.enabled:
                self.embedder = Embedder()
                policies.append(SemanticCache(config.cache, self.state, self.embedder.embed_whole, resolve))
        if config.budgets or keyed:
            self.alerts = BudgetAlerts(config.alert_webhook, self.state)
            self.budgets = BudgetPolicy(config.budgets, self.state, alerts=self.alerts)
            policies.append(self.budgets)
        if self.usage is not None:
            policies.append(UsagePolicy(self.usage))
        return policies

    def experiment_policy(self, experiments: list[ExperimentConfig], routable: Callable[[str], bool],
                          ids_of: Callable[[str], tuple[str, ...]] | None = None) -> list[Policy]:
        """The experiment policy, whenever there is a database (experiments may also be created through the
        admin API); `routable` says whether a name is a model, alias or chain of its own, `ids_of` which model
        ids it names."""
        if self.engine is None:  # the config refuses experiments without a database
            return []
        self.experiments = ExperimentStore(self.engine, self.state, experiments)
        render = self.templates.render_into if self.templates is not None else None  # built just before
        return [ExperimentPolicy(self.experiments, routable, render, ids_of)]

    def template_policy(self, templates: list[TemplateConfig]) -> list[Policy]:
        """The template policy: with a database always (templates may be added through the admin API), else
        only for the config's templates."""
        if self.engine is None and not templates:
            return []
        self.templates = TemplatePolicy(templates, self.engine, self.state)  # compiles them: errors stop startup
        return [self.templates]

    async def start(self) -> None:
        if self.engine is not None and self.usage is not None:
            await migrate(self.engine)  # a no-op at the newest revision; replicas starting together take turns
            if self.budgets is not None and isinstance(self.state, LocalStore):  # Redis keeps its counters
                await self.budgets.seed(self.engine, keys=self.keyed)  # before serving: the store started empty
            self.usage.start()
        if self.templates is not None:
            await self.templates.start()  # seeds the config's versions, loads them all, follows changes
        if self.experiments is not None:
            await self.experiments.start()  # writes the config's experiments, loads them all

    async def aclose(self) -> None:
        """Write every usage row still queued, then close the connections."""
        if self.templates is not None:
            await self.templates.aclose()
        if self.experiments is not None:
            await self.experiments.aclose()
        if self.usage is not None:
            await self.usage.aclose()
            usage = self.usage
            log.info("usage log closed: %d rows written, %d dropped (%d of them refused by the database)",
                     usage.written, usage.dropped + usage.refused, usage.refused)
        if self.engine is not None:
            await self.engine.dispose()
        if self.embedder is not None:
            await self.embedder.aclose()
        if self.alerts is not None:
            await self.alerts.aclose()  # webhook deliveries in flight get a few seconds to finish
        await self.state.aclose()
