"""Several worker processes: uvicorn's supervisor, whose stop lets the listener close once the workers have
drained, and whose reload (SIGHUP) retires the old workers without a drain, unless the new config is refused."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from socket import socket

from uvicorn import Config
from uvicorn.supervisors import Multiprocess

__all__ = ["RELOADING_ENV", "WorkerSupervisor", "reloading"]

# a file that exists while the parent replaces its workers (SIGHUP): the SIGTERM an old worker then gets is a
# retirement, not a stop of the replica, so it does not drain (/ready would answer 503 while the new workers serve)
RELOADING_ENV = "POINTSMAN_RELOADING"
log = logging.getLogger("uvicorn.error")  # the supervisor's own log, as uvicorn's lines about its workers


def reloading() -> bool:
    """Whether this worker's parent is replacing its workers now (gateway/drain.py asks on SIGTERM)."""
    path = os.environ.get(RELOADING_ENV)
    return bool(path) and os.path.exists(path)  # type: ignore[arg-type]


class WorkerSupervisor(Multiprocess):
    """uvicorn's Multiprocess (pinned 0.54) with two changes:
    - on SIGTERM/SIGINT the parent closes its own copy of the listening socket: the workers keep theirs while they
      drain, and once they close them the port refuses new connections at once, where the parent's copy kept
      queueing them until every worker had exited (a request already sent, then reset);
    - a SIGHUP's restart marks itself (`reloading`) while it retires the old workers, and does not start when
      `vet_reload(workers)` gives a reason (the config the new workers would read): the old ones keep serving."""

    def __init__(self, config: Config, sockets: list[socket], flag: Path,
                 vet_reload: Callable[[int], str | None] | None = None) -> None:
        super().__init__(config, sockets)
        self.flag = flag
        self.vet_reload = vet_reload

    def handle_hup(self) -> None:
        reason = self.vet_reload(self.processes_num) if self.vet_reload is not None else None
        if reason is not None:
            log.error("Received SIGHUP, reload refused (the workers keep serving as they were): %s", reason)
            return
        super().handle_hup()

    def handle_term(self) -> None:
        super().handle_term()
        self._close_listeners()

    def handle_int(self) -> None:
        super().handle_int()
        self._close_listeners()

    def restart_all(self) -> None:
        self.flag.touch()
        try:
            super().restart_all()
        finally:
            self.flag.unlink(missing_ok=True)

    def _close_listeners(self) -> None:
        for sock in self.sockets:
            sock.close()
