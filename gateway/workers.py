"""Several worker processes: uvicorn's supervisor, whose stop lets the listener close once the workers have
drained, and whose reload (SIGHUP) retires the old workers without a drain."""

from __future__ import annotations

import os
from pathlib import Path
from socket import socket

from uvicorn import Config
from uvicorn.supervisors import Multiprocess

__all__ = ["RELOADING_ENV", "WorkerSupervisor", "reloading"]

# a file that exists while the parent replaces its workers (SIGHUP): the SIGTERM an old worker then gets is a
# retirement, not a stop of the replica, so it does not drain (/ready would answer 503 while the new workers serve)
RELOADING_ENV = "POINTSMAN_RELOADING"


def reloading() -> bool:
    """Whether this worker's parent is replacing its workers now (gateway/drain.py asks on SIGTERM)."""
    path = os.environ.get(RELOADING_ENV)
    return bool(path) and os.path.exists(path)  # type: ignore[arg-type]


class WorkerSupervisor(Multiprocess):
    """uvicorn's Multiprocess (pinned 0.54) with two changes:
    - on SIGTERM/SIGINT the parent closes its own copy of the listening socket: the workers keep theirs while they
      drain, and once they close them the port refuses new connections at once, where the parent's copy kept
      queueing them until every worker had exited (a request already sent, then reset);
    - a SIGHUP's restart marks itself (`reloading`) while it retires the old workers."""

    def __init__(self, config: Config, sockets: list[socket], flag: Path) -> None:
        super().__init__(config, sockets)
        self.flag = flag

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
