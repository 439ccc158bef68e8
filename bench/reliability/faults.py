"""Faults under load: an upstream, Redis and PostgreSQL each die or restart while the load runs; what was lost."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from bench.reliability.figures import Figure
from bench.reliability.harness import Harness
from bench.reliability.load import Load, Tally, budget_figures, load_figures

__all__ = ["FAULTS", "STREAM_GAP_S", "inject", "measure", "row_figures", "run", "under_faults"]

SECTION = "faults"
STREAM_GAP_S = 0.02  # between stream chunks: a stream lasts ~0.1 s, so some are midway when an upstream dies
FAULTS = ("upstream killed (-9) and restarted", "Redis killed (-9) and restarted",
          "PostgreSQL restarted (-m fast)")


async def inject(harness: Harness, load: Load, step: int) -> list[str]:
    """Each fault in turn, `step` finished requests apart (before, during the outage, after): the load runs on
    throughout. The blocking starts and stops run in a thread so that the client keeps going meanwhile."""
    done: list[str] = []
    await load.after(step)
    await asyncio.to_thread(harness.kill_upstream, 0)
    await load.after(step)
    await asyncio.to_thread(harness.restart_upstream, 0)
    done.append(FAULTS[0])
    await load.after(step)
    await asyncio.to_thread(harness.redis.kill)
    await load.after(step)
    await asyncio.to_thread(harness.redis.start)
    done.append(FAULTS[1])
    await load.after(step)
    await asyncio.to_thread(harness.postgres.restart)
    await load.after(step)
    done.append(FAULTS[2])
    return done


async def under_faults(harness: Harness, concurrency: int, step: int, tag: str = "faults",
                       ) -> tuple[Tally, list[str]]:
    """Load until every fault has been injected and recovered from."""
    assert harness.gateway is not None
    load = Load(harness.gateway.url, concurrency, tag, stream_gap_s=STREAM_GAP_S)
    running = asyncio.ensure_future(load.run())
    try:
        injected = await inject(harness, load, step)
    finally:
        load.stop()
        await running
    return load.tally, injected


def row_figures(harness: Harness, tally: Tally, tag: str) -> list[Figure]:
    """After the gateway has stopped (its queued rows written): every response the client got has one usage row."""
    rows = harness.usage_rows()
    ours = Counter(r.request_id for r in rows if r.request_id.startswith(tag + "-"))
    answered = set(tally.answered)
    lost = answered - set(ours)
    doubled = sum(count - 1 for count in ours.values() if count > 1)
    return [
        Figure(SECTION, "usage rows lost", f"{len(lost):,} of {len(answered):,}", "0", not lost),
        Figure(SECTION, "usage rows doubled", f"{doubled:,}", "0", doubled == 0),
        *budget_figures(SECTION, rows, harness.budget_tokens, tally),
    ]


async def measure(harness: Harness, concurrency: int, step: int, tag: str = "faults") -> list[Figure]:
    """The faults' figures; the gateway is stopped (SIGTERM) to count its rows, then started again."""
    tally, injected = await under_faults(harness, concurrency, step, tag)
    code = await asyncio.to_thread(harness.stop_gateway)
    assert harness.gateway is not None
    continued = harness.gateway.output().count("broke mid-stream")  # relay.py's warning, once per continuation
    figures = [Figure(SECTION, "faults injected under load", "; ".join(injected) or "none", str(len(FAULTS)),
                      len(injected) == len(FAULTS)),
               *load_figures(SECTION, tally, None, streams_may_fail=True),
               Figure(SECTION, "streams continued on the other deployment (gateway log)", f"{continued:,}"),
               Figure(SECTION, "gateway exit status on SIGTERM", str(code), "0", code == 0),
               *row_figures(harness, tally, tag)]
    await asyncio.to_thread(harness.start_gateway)
    return figures


def run(workdir: Path, *, quick: bool, concurrency: int = 64) -> list[Figure]:
    """The `faults` section on a harness of its own; the faults come `step` requests apart."""
    step = 300 if quick else 2000
    with Harness(workdir / "faults", budget_tokens=600 if quick else 1500) as harness:
        return asyncio.run(measure(harness, concurrency, step))
