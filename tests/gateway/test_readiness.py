"""/ready's probes: one at a time and at most once a second, however many callers (anyone may call /ready, and
each call probed every eager model's upstream)."""

from __future__ import annotations

import asyncio

import pytest

from config.loader import parse_config
from gateway import service
from gateway.service import Gateway

CONFIG = """
routing: {health_check_s: 0}
models:
  - {id: m, backend: openai, base_url: "http://127.0.0.1:1/v1"}
"""


class Probed:
    """A Backend whose health probe is counted, and answers once released."""

    def __init__(self) -> None:
        self.probes = 0
        self.release = asyncio.Event()

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def health(self) -> bool:
        self.probes += 1
        await self.release.wait()
        return True


async def test_callers_share_one_probe_and_a_later_one_probes_again(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(service, "_READY_REUSE_S", 3600.0)  # "within the second", however slow the machine
    backend = Probed()
    gateway = Gateway(parse_config(CONFIG), {"m": backend})
    waiting = [asyncio.ensure_future(gateway.ready()) for _ in range(20)]
    backend.release.set()
    assert await asyncio.gather(*waiting) == [{"m": True}] * 20 and backend.probes == 1
    assert await gateway.ready() == {"m": True} and backend.probes == 1  # a recent probe: the same answer
    monkeypatch.setattr(service, "_READY_REUSE_S", 0.0)
    assert await gateway.ready() == {"m": True} and backend.probes == 2
    await gateway.aclose()
