"""Serve an app object in process (uvicorn in a thread, on a free port), for tests that need to reach into it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import uvicorn

from policies.context import Outcome, RequestContext
from tests.conftest import free_port


class Capture:
    """A policy that keeps each request's context as it settles, by request id: what tests read back."""

    name: ClassVar[str] = "capture"
    stage: ClassVar[int] = 50

    def __init__(self) -> None:
        self.settled: dict[str, RequestContext] = {}

    async def admit(self, ctx: RequestContext) -> None:
        return None

    async def approve(self, ctx: RequestContext, decision: Any) -> None:
        return None

    async def settle(self, ctx: RequestContext, outcome: Outcome) -> None:
        self.settled[ctx.request_id] = ctx


def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll until `condition()` is truthy; returns its value. A wait on a condition, never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@contextmanager
def serve(app, **options) -> Iterator[str]:
    """Run `app` under uvicorn (httptools, uvloop: as `pointsman serve` does) and yield its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", lifespan="on",
                            log_level="warning", **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 20, "the server to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)
