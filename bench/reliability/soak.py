"""The soak: load for a long while, the gateway's RSS, open fds and asyncio tasks sampled, then idle again."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from bench.reliability.figures import Figure
from bench.reliability.harness import Harness
from bench.reliability.load import Load, load_figures

__all__ = ["Sample", "idle_levels", "measure", "run"]

SECTION = "soak"
RSS_GROWTH_MAX = 0.10  # from after warm-up to the end of the soak
IDLE_TIMEOUT_S = 30.0  # for tasks and fds to come back once the load stops
# Idle keep-alive connections the pools (two upstream deployments, Redis, PostgreSQL) may hold beyond the warm-up's:
# a couple each, by how the soak's requests happened to overlap (+5 seen in CI, beside the other tests' load), bounded
# by the pools' sizes however long the soak runs, where a leak grows with the number of requests (thousands here).
FD_SLACK = 8


@dataclass(frozen=True)
class Sample:
    at_s: float
    rss_kb: int
    fds: int
    tasks: int


def _sample(harness: Harness, started: float) -> Sample:
    return Sample(time.monotonic() - started, harness.rss_kb(), harness.open_fds(), harness.tasks())


async def idle_levels(harness: Harness, tasks: int, fds: int, timeout: float = IDLE_TIMEOUT_S) -> Sample:
    """The gateway's levels once idle: sampled until tasks and fds are back to at most the given levels (a
    finished request's settle, usage row and closing sockets take a moment), or the timeout; the last sample."""
    started = time.monotonic()
    while True:
        now = await asyncio.to_thread(_sample, harness, started)
        if (now.tasks <= tasks and now.fds <= fds) or now.at_s > timeout:
            return now
        await asyncio.sleep(0.2)


async def measure(harness: Harness, seconds: float, concurrency: int, warmup_s: float,
                  sample_every_s: float) -> tuple[list[Figure], list[Sample]]:
    """Warm up at the soak's concurrency (pools and caches fill), let it go idle and take that as the baseline;
    then load for `seconds`, sampling; then idle again: tasks and fds must come back to the baseline."""
    assert harness.gateway is not None
    url = harness.gateway.url
    await Load(url, concurrency, "warmup").run(warmup_s)
    baseline = await idle_levels(harness, tasks=0, fds=0, timeout=2.0)  # whatever it settles at in 2 s
    load = Load(url, concurrency, "soak")
    running = asyncio.ensure_future(load.run(seconds))
    started = time.monotonic()
    samples = [await asyncio.to_thread(_sample, harness, started)]
    while not running.done():
        await asyncio.wait([running], timeout=sample_every_s)
        if not running.done():
            samples.append(await asyncio.to_thread(_sample, harness, started))
    tally = running.result()
    idle = await idle_levels(harness, baseline.tasks, baseline.fds + FD_SLACK)
    first, last = samples[0], samples[-1]
    growth = (last.rss_kb - first.rss_kb) / first.rss_kb
    peak_tasks = max(s.tasks for s in samples)
    figures = [
        *load_figures(SECTION, tally, seconds)[:3],
        Figure(SECTION, "gateway RSS after warm-up / at the end",
               f"{first.rss_kb / 1024:.1f} / {last.rss_kb / 1024:.1f} MiB ({growth:+.1%})",
               f"< {RSS_GROWTH_MAX:.0%} growth", growth < RSS_GROWTH_MAX),
        Figure(SECTION, "open fds idle: after warm-up / after the soak",
               f"{baseline.fds} / {idle.fds} (peak under load {max(s.fds for s in samples)})",
               f"back to the warm-up level (+{FD_SLACK} pooled)", idle.fds <= baseline.fds + FD_SLACK),
        Figure(SECTION, "asyncio tasks idle: after warm-up / after the soak",
               f"{baseline.tasks} / {idle.tasks} (peak under load {peak_tasks})",
               "back to the warm-up level", idle.tasks <= baseline.tasks),
    ]
    return figures, samples


def run(workdir: Path, *, quick: bool, seconds: float | None = None, concurrency: int = 16) -> list[Figure]:
    """The `soak` section on a harness of its own: `seconds` (600; 20 quick) of load at `concurrency`."""
    seconds = seconds if seconds is not None else (20.0 if quick else 600.0)
    warmup_s = min(30.0, max(3.0, seconds / 10))
    with Harness(workdir / "soak", budget_tokens=1500) as harness:
        figures, _ = asyncio.run(measure(harness, seconds, concurrency, warmup_s, max(1.0, seconds / 60)))
    return figures
