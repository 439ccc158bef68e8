"""Graceful drain on SIGTERM: /ready answers 503 at once, requests are still served for `server.drain_s` while a
load balancer takes the replica out, then the server's own graceful shutdown (stop accepting, finish in-flight
requests within `server.shutdown_grace_s`, the lifespan's shutdown flushing the usage log)."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from gateway.workers import reloading

__all__ = ["Drain"]

log = logging.getLogger("pointsman")


class Drain:
    """Wraps the server's SIGTERM handler (uvicorn's, which starts its shutdown): the first SIGTERM marks the
    app draining and hands the signal on `delay_s` later, from a timer thread (the handler only sets flags); a
    second SIGTERM hands it on at once. Installed from the lifespan, in the main thread; a process whose
    SIGTERM handler is not a Python callable (tests serving the app in a thread) is left alone."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.draining = False
        self._previous: Callable[[int, FrameType | None], Any] | None = None
        self._timer: threading.Timer | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):
            return
        self._previous = previous
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, sig: int, frame: FrameType | None) -> None:
        handing_on = self._previous
        if handing_on is None:
            return
        if reloading():  # a SIGHUP retiring this worker, the replica serving on: no drain, /ready stays 200
            handing_on(sig, frame)
            return
        if self.draining or self.delay_s <= 0:
            self.draining = True
            if self._timer is not None:
                self._timer.cancel()
            handing_on(sig, frame)
            return
        self.draining = True
        log.warning("SIGTERM: draining (/ready answers 503); the listener closes in %g s", self.delay_s)
        self._timer = threading.Timer(self.delay_s, handing_on, (sig, None))
        self._timer.daemon = True
        self._timer.start()

    def uninstall(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
