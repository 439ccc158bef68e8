"""The reliability suite's short version: c16 load, each fault once under load, a short soak, on real parts."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator

import pytest

from bench.reliability import faults, load, soak
from bench.reliability.figures import Figure, table
from bench.reliability.harness import Harness
from tests.services import PG_BIN, REDIS_SERVER

CONCURRENCY = 16
BUDGET_TOKENS = 200  # the faults alone (a count of requests, not a time) spend more for the capped user


def _missing() -> str | None:
    for binary in (REDIS_SERVER, str(PG_BIN / "initdb"), str(PG_BIN / "pg_ctl")):
        if not os.path.exists(binary):
            return binary
    return None if shutil.which("runuser") else "runuser"


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Iterator[Harness]:
    if (missing := _missing()) is not None:
        why = f"the reliability suite needs {missing}"
        if os.environ.get("CI"):
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    with Harness(tmp_path_factory.mktemp("reliability"), budget_tokens=BUDGET_TOKENS) as started:
        yield started


def _by_name(figures: list[Figure]) -> dict[str, Figure]:
    return {f.name: f for f in figures}


def test_load_no_request_fails(harness: Harness) -> None:
    figures = asyncio.run(load.drive(harness, 2.0, CONCURRENCY, "t-load"))
    got = _by_name(figures)
    assert got["non-streaming requests failed"].ok and got["streaming requests failed"].ok, table(figures)
    assert [f for f in figures if f.ok is False] == [], table(figures)


def test_faults_lose_no_plain_request_no_row_no_budget(harness: Harness) -> None:
    tally, injected = asyncio.run(faults.under_faults(harness, CONCURRENCY, step=100, tag="t-faults"))
    assert injected == list(faults.FAULTS)
    assert tally.failed["plain"] == 0, tally.reasons
    assert tally.ok["plain"] > 0 and tally.ok["stream"] > 0
    assert tally.refused["503 budget store down (deny)"] > 0  # Redis was away while requests came
    assert harness.stop_gateway() == 0  # its queued usage rows are written on the way out
    figures = faults.row_figures(harness, tally, "t-faults")
    harness.start_gateway()  # for the soak
    got = _by_name(figures)
    assert got["usage rows lost"].value.startswith("0 of "), table(figures)
    assert got["usage rows doubled"].value == "0"
    assert tally.refused["429 budget_exceeded"] > 0  # the budget was reached...
    assert [f for f in figures if f.ok is False] == [], table(figures)  # ...and never overspent


def test_soak_tasks_and_fds_come_back(harness: Harness) -> None:
    figures, samples = asyncio.run(soak.measure(harness, 8.0, CONCURRENCY, warmup_s=1.5, sample_every_s=1.0))
    assert len(samples) >= 3  # sampled while the load ran
    done = int(_by_name(figures)["requests done"].value.split()[0].replace(",", ""))
    assert done > 100
    assert [f for f in figures if f.ok is False] == [], table(figures)
