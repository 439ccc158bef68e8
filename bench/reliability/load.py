"""Load through the gateway: an aiohttp client at a fixed concurrency, half streaming, and the `load` figures."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.reliability.figures import Figure
from bench.reliability.harness import CAPPED, LIMITED, MODEL, Harness, UsageRow

__all__ = ["Load", "Tally", "budget_figures", "drive", "load_figures", "run"]

REQUEST_TIMEOUT_S = 60.0
_CODE = re.compile(rb'"error":\s*\{.*?"code":\s*"([^"]+)"', re.S)


@dataclass
class Tally:
    """What the client saw. A refusal by a policy (rate limit, budget, a budget that denies while its store is
    away) is no failure; anything else that is not a whole answer is, split by streaming or not."""

    ok: Counter[str] = field(default_factory=Counter)  # "plain" | "stream"
    failed: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)  # "429 budget_exceeded", ...
    reasons: Counter[str] = field(default_factory=Counter)  # why requests failed, for the report
    latencies_ms: list[float] = field(default_factory=list)  # of whole answers
    answered: list[str] = field(default_factory=list)  # x-request-id of every response the gateway sent

    @property
    def done(self) -> int:
        return sum(self.ok.values()) + sum(self.failed.values()) + sum(self.refused.values())

    def sent(self, kind: str) -> int:
        return self.ok[kind] + self.failed[kind]


def _refusal(status: int, body: bytes) -> str | None:
    """'429 budget_exceeded' and the like for a policy's refusal; None for anything else."""
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    code = error.get("code") if isinstance(error, dict) else None
    if status == 429 and code in ("rate_limit_exceeded", "budget_exceeded"):
        return f"429 {code}"
    if status == 503 and "on_store_error: deny" in str(error.get("message")):
        return "503 budget store down (deny)"
    return None


class Load:
    """`concurrency` workers sending requests until `stop()`. Request n: odd ones stream (with usage); one in 16
    comes from the capped user and one in 16 from the rate-limited one; one in 5 is cacheable (temperature 0, ten
    prompts that repeat), the others carry a fresh prompt. Prompts stay short: the mock upstream echoes them
    word by word, so an answer stays within max_tokens and a budget's reservation covers it. `stream_gap_s` has
    the upstream wait that long between a fresh stream's chunks, so that streams are in flight when it dies."""

    def __init__(self, url: str, concurrency: int, tag: str, tally: Tally | None = None,
                 stream_gap_s: float = 0.0) -> None:
        self.url, self.concurrency, self.tag = url, concurrency, tag
        self.gap = f" gap:{stream_gap_s}" if stream_gap_s else ""
        self.tally = tally or Tally()
        self._numbers = itertools.count()
        self._stopping = asyncio.Event()
        self._progress = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self, seconds: float | None = None) -> Tally:
        """Until `stop()`, or for `seconds`; returns once every worker has finished its last request."""
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            workers = [asyncio.ensure_future(self._worker(session)) for _ in range(self.concurrency)]
            if seconds is not None:
                try:
                    await asyncio.wait_for(self._stopping.wait(), seconds)
                except TimeoutError:
                    self.stop()
            await asyncio.gather(*workers)
        return self.tally

    async def after(self, requests: int, timeout: float = 120.0) -> None:
        """Wait until `requests` more have finished (raises TimeoutError when the load stalls)."""
        target = self.tally.done + requests
        async with asyncio.timeout(timeout):
            while self.tally.done < target:
                self._progress.clear()
                await self._progress.wait()

    async def _worker(self, session: aiohttp.ClientSession) -> None:
        while not self._stopping.is_set():
            await self._one(session, next(self._numbers))
            self._progress.set()

    async def _one(self, session: aiohttp.ClientSession, n: int) -> None:
        stream = n % 2 == 1
        kind = "stream" if stream else "plain"
        user = CAPPED if n % 16 == 0 else LIMITED if n % 16 == 1 else f"user-{n % 7}"
        body: dict = {"model": MODEL, "user": user, "max_tokens": 16, "stream": stream,
                      "messages": [{"role": "user", "content": f"hello {self.tag} {n}{self.gap if stream else ''}"}]}
        if n % 5 == 0:
            body.update(temperature=0, messages=[{"role": "user", "content": f"what is {n % 10}"}])
        if stream:
            body["stream_options"] = {"include_usage": True}
        started = time.perf_counter()
        tally = self.tally
        try:
            async with session.post(self.url + "/v1/chat/completions", json=body,
                                    headers={"x-request-id": f"{self.tag}-{n}"}) as response:
                data = await response.read()
                tally.answered.append(response.headers.get("x-request-id", ""))
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            tally.failed[kind] += 1
            tally.reasons[f"{kind}: {type(exc).__name__}"] += 1
            return
        if status == 200 and _whole(data, stream):
            tally.ok[kind] += 1
            tally.latencies_ms.append((time.perf_counter() - started) * 1000)
        elif (refusal := _refusal(status, data)) is not None:
            tally.refused[refusal] += 1
        else:
            tally.failed[kind] += 1
            tally.reasons[f"{kind}: {status} {_why(data)}"] += 1


def _whole(data: bytes, stream: bool) -> bool:
    if stream:  # a stream cut midway has no [DONE]; an error after the first byte comes as an error event
        return data.rstrip().endswith(b"data: [DONE]") and b'"error"' not in data
    try:
        return bool(json.loads(data)["choices"])
    except (ValueError, KeyError, TypeError):
        return False


def _why(data: bytes) -> str:
    """An error's code (a stream's error event included), else the body's start, on one line."""
    if (code := _CODE.search(data)) is not None:
        return code[1].decode()
    return " ".join(data[:80].decode(errors="replace").split()) or "(empty body)"


def _percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100)[p - 1] if len(values) >= 2 else (values[0] if values else 0.0)


def load_figures(section: str, tally: Tally, seconds: float | None, *, rss_before_kb: int | None = None,
                 rss_after_kb: int | None = None, streams_may_fail: bool = False) -> list[Figure]:
    """The client's figures: requests done (and their rate, given `seconds`), failures split, refusals, latency;
    RSS when given."""
    plain, stream = tally.sent("plain"), tally.sent("stream")
    refused = ", ".join(f"{k}: {v:,}" for k, v in sorted(tally.refused.items())) or "none"
    rate = f" in {seconds:.0f} s ({tally.done / seconds:,.0f}/s)" if seconds else ""
    figures = [
        Figure(section, "requests done", f"{tally.done:,}{rate}"),
        Figure(section, "non-streaming requests failed", f"{tally.failed['plain']:,} of {plain:,}", "0",
               tally.failed["plain"] == 0),
        Figure(section, "streaming requests failed", f"{tally.failed['stream']:,} of {stream:,}",
               "reported" if streams_may_fail else "0", None if streams_may_fail else tally.failed["stream"] == 0),
        Figure(section, "refused by a policy (no failure)", refused),
        Figure(section, "latency p50 / p99 (whole answers)",
               f"{_percentile(tally.latencies_ms, 50):.1f} / {_percentile(tally.latencies_ms, 99):.1f} ms"),
    ]
    if tally.reasons:
        worst = "; ".join(f"{why} x{count}" for why, count in tally.reasons.most_common(3))
        figures.append(Figure(section, "failures seen", worst))
    if rss_before_kb is not None and rss_after_kb is not None:
        figures.append(Figure(section, "gateway RSS before / after",
                              f"{rss_before_kb / 1024:.1f} / {rss_after_kb / 1024:.1f} MiB"))
    return figures


def budget_figures(section: str, rows: list[UsageRow], limit: int, tally: Tally) -> list[Figure]:
    """The capped user's spend as its usage rows record it (cache hits are free) against its budget."""
    spent = sum(r.tokens for r in rows if r.user == CAPPED and r.cache not in ("hit", "semantic-hit"))
    refusals = tally.refused["429 budget_exceeded"]
    return [
        Figure(section, f"budget reached ('{CAPPED}': 429 budget_exceeded)", f"{refusals:,} refusals", "> 0",
               refusals > 0),
        Figure(section, "budget overspend (usage rows, tokens)", f"{max(0, spent - limit):,} ({spent:,} of {limit:,})",
               "0", spent <= limit),
    ]


async def drive(harness: Harness, seconds: float, concurrency: int, tag: str) -> list[Figure]:
    assert harness.gateway is not None
    before = harness.rss_kb()
    tally = await Load(harness.gateway.url, concurrency, tag).run(seconds)
    after = harness.rss_kb()
    return load_figures("load", tally, seconds, rss_before_kb=before, rss_after_kb=after)


def run(workdir: Path, *, quick: bool, seconds: float | None = None, concurrency: int = 64) -> list[Figure]:
    """The `load` section on a harness of its own: `seconds` (60; 5 quick) of load at `concurrency`."""
    seconds = seconds if seconds is not None else (5.0 if quick else 60.0)
    with Harness(workdir / "load", budget_tokens=1500) as harness:
        return asyncio.run(drive(harness, seconds, concurrency, "load"))
