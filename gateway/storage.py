"""Opens what the config's `storage` section names (the usage database, the hot-state store) and closes it."""

from __future__ import annotations

import logging

from config.schema import StorageConfig
from policies.base import Policy
from policies.database import migrate, open_engine
from policies.redis_state import RedisStore
from policies.state import LocalStore, StateStore
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
        self.state: StateStore = RedisStore(config.redis_url) if config.redis_url else LocalStore()

    def policies(self) -> list[Policy]:
        return [UsagePolicy(self.usage)] if self.usage is not None else []

    async def start(self) -> None:
        if self.engine is not None and self.usage is not None:
            await migrate(self.engine)  # a no-op at the newest revision; replicas starting together take turns
            self.usage.start()

    async def aclose(self) -> None:
        """Write every usage row still queued, then close the connections."""
        if self.usage is not None:
            await self.usage.aclose()
            log.info("usage log closed: %d rows written, %d dropped", self.usage.written, self.usage.dropped)
        if self.engine is not None:
            await self.engine.dispose()
        await self.state.aclose()
