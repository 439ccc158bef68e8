"""A rolling restart of one of two replicas at a time, under continuous mixed load through a readiness-driven
balancer: no request dropped, each SIGTERM exits 0, every answered request leaves exactly one usage row."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

if __name__ == "__main__":  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.reliability.balancer import Balancer
from bench.reliability.figures import Figure, table
from tests.conftest import POINTSMAN, Process, http, spawn, start_upstream, wait_until
from tests.services import pg_admin

__all__ = ["REDIS_URL", "RollingCounts", "figures", "restart_under_load", "run"]

REDIS_URL = "redis://127.0.0.1:6379/11"  # database 11: no test or other benchmark uses it
LONG_WORDS = " ".join(f"w{i}" for i in range(20))


@dataclass
class RollingCounts:
    """What one rolling restart measured; `served_*` are per replica (A, B)."""

    sent: int = 0
    ok: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)  # the first few, to say why
    streams: int = 0  # streams completed whole (long ones included)
    long_streams: int = 0
    retried: dict[str, int] = field(default_factory=dict)  # by the balancer, by case
    balancer_failed: dict[str, int] = field(default_factory=dict)
    dropped_out: tuple[int, int] = (0, 0)  # times each replica left the balancer's endpoints (1 each: its restart)
    served_before: tuple[int, int] = (0, 0)  # before A's SIGTERM
    served_after: tuple[int, int] = (0, 0)  # after B was back and in use, until the load stopped
    served: tuple[int, int] = (0, 0)
    in_flight_at_sigterm: list[int] = field(default_factory=list)  # requests on the replica, A then B
    restart_exit_codes: list[int] = field(default_factory=list)  # A's then B's, from the rolling SIGTERMs
    final_exit_codes: list[int] = field(default_factory=list)  # both, stopped at the end to flush their rows
    drain_to_exit_s: list[float] = field(default_factory=list)  # SIGTERM to exit, A then B
    start_to_ready_s: list[float] = field(default_factory=list)  # restart to /ready 200, A then B
    load_s: float = 0.0
    answered: int = 0  # requests answered 200 whose x-request-id is known
    rows_lost: int = 0  # answered, no usage row
    rows_duplicated: int = 0  # answered, more than one usage row
    rows_total: int = 0


class _Load:
    """Closed-loop load: `concurrency` workers, each sending its next request when the last one ended. One request
    in seven is a long stream (20 chunks, 0.15 s apart), three in seven short streams, the rest plain: an odd cycle,
    so that round robin over two backends does not send every long stream to the same one."""

    def __init__(self, url: str, run_id: str, concurrency: int) -> None:
        self.url, self.run_id, self.concurrency = url, run_id, concurrency
        self.counts = RollingCounts()
        self.answered: set[str] = set()
        self.stopping = False
        self._numbers = itertools.count()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout,
                                         connector=aiohttp.TCPConnector(limit=self.concurrency)) as session:
            await asyncio.gather(*(self._worker(session) for _ in range(self.concurrency)))

    async def _worker(self, session: aiohttp.ClientSession) -> None:
        while not self.stopping:
            await self._one(session, next(self._numbers))

    async def _one(self, session: aiohttp.ClientSession, n: int) -> None:
        kind = "long" if n % 7 == 0 else "stream" if n % 7 in (1, 2, 3) else "plain"
        prompt = f"r{n} {LONG_WORDS} gap:0.15" if kind == "long" else f"r{n} hello from the rolling restart"
        request_id = f"{self.run_id}-{n}"
        body = {"model": "remote-a", "user": self.run_id, "stream": kind != "plain",
                "messages": [{"role": "user", "content": prompt}]}
        self.counts.sent += 1
        try:
            async with session.post(self.url + "/v1/chat/completions", json=body,
                                    headers={"x-request-id": request_id}) as response:
                raw = await response.read()
                problem = _problem(response.status, response.headers.get("x-request-id"), request_id, raw,
                                   kind != "plain", "echo: " + prompt)
        except (aiohttp.ClientError, TimeoutError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            self.counts.failed += 1
            if len(self.counts.failures) < 10:
                self.counts.failures.append(f"{request_id} ({kind}): {problem}")
            return
        self.counts.ok += 1
        self.answered.add(request_id)
        if kind != "plain":
            self.counts.streams += 1
            self.counts.long_streams += kind == "long"


def _problem(status: int, echoed: str | None, request_id: str, raw: bytes, stream: bool, expected: str) -> str | None:
    """Why an answer does not count as served in full, or None when it does."""
    if status != 200:
        return f"HTTP {status}: {raw[:200]!r}"
    if echoed != request_id:
        return f"x-request-id {echoed!r}"
    if not stream:
        text = json.loads(raw)["choices"][0]["message"]["content"]
        return None if text == expected else f"answer {text!r}"
    events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return f"stream without [DONE] after {len(events)} events"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in map(json.loads, events[:-1])
                   if c.get("choices"))
    return None if text == expected else f"stream text {text!r}"


def _config(upstream_url: str, database: str, run_id: str) -> str:
    # the budget's on_store_error: allow, as the rate limit's default: on a starved machine a Redis call can
    # outlast the store's 0.5 s timeout, and a refusal for that (test_redis_outage.py) is not what this run is about
    return f"""
server: {{drain_s: 1.0, shutdown_grace_s: 20}}
models:
  - {{id: remote-a, backend: openai, base_url: "{upstream_url}", upstream_model: mock-model}}
routing: {{health_check_s: 0}}
storage: {{redis_url: "{REDIS_URL}", database_url: "postgresql+asyncpg://postgres@127.0.0.1:5432/{database}"}}
policies:
  rate_limits:
    - {{scope: user, match: "{run_id}", rpm: 1000000}}
  budgets:
    - {{scope: user, match: "{run_id}", period: day, max_tokens: 1000000000, on_store_error: allow}}
"""


def _listening_port() -> int:
    """A free port below the kernel's ephemeral range: while a replica is down between its exit and its restart,
    no outgoing connection on this machine can take its port as a source port (a free_port() one could)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except OSError:  # not Linux: IANA's ephemeral range starts here
        low = 49152
    for port in random.sample(range(max(1024, low - 12000), low), 200):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


class _Replica:
    """One `pointsman serve` on a fixed port, restartable on the same port."""

    def __init__(self, workdir: Path, name: str, config: Path) -> None:
        self.workdir, self.name, self.config = workdir, name, config
        self.port = _listening_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.generation = 0
        self.process: Process | None = None

    def start(self) -> float:
        """Start it and wait until /ready answers 200; returns how long that took."""
        self.generation += 1
        log = self.workdir / f"replica-{self.name}-{self.generation}.log"
        began = time.monotonic()
        proc = spawn([*POINTSMAN, "serve", "--config", str(self.config), "--port", str(self.port)], log)
        self.process = Process(proc, log, self.url, self.port)
        wait_until(lambda: http("GET", self.url + "/ready", timeout=2)[0] == 200, proc, log, 180)
        return time.monotonic() - began

    def terminate(self) -> tuple[int, float]:
        """SIGTERM, then wait for the exit (drain plus grace at most); returns the exit code and how long."""
        assert self.process is not None
        began = time.monotonic()
        self.process.proc.send_signal(signal.SIGTERM)
        code = self.process.proc.wait(60)
        return code, time.monotonic() - began

    def kill(self) -> None:
        if self.process is not None:
            self.process.stop(signal.SIGKILL)


async def _until(condition, timeout: float, what: str) -> None:  # noqa: ANN001
    """Poll a condition on the event loop (the load keeps running meanwhile)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def _rows(database: str) -> dict[str, int]:
    import asyncpg

    conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:5432/{database}", timeout=5)
    try:
        found = await conn.fetch("SELECT request_id, count(*) AS n FROM usage_rows GROUP BY request_id")
    finally:
        await conn.close()
    return {r["request_id"]: r["n"] for r in found}


async def restart_under_load(workdir: Path, *, before_s: float, after_s: float,
                             concurrency: int = 16) -> RollingCounts:
    """Two replicas behind the balancer, load through it; restart A then B (SIGTERM, exit, start on the same
    port, ready and in use again), load `before_s` before and `after_s` after; then stop both (flushing their
    usage rows) and match the rows in PostgreSQL against the requests answered."""
    run_id = uuid.uuid4().hex[:12]
    database = f"pointsman_rolling_{run_id}"
    config = workdir / "rolling.yaml"
    replicas = [_Replica(workdir, "a", config), _Replica(workdir, "b", config)]
    balancer = Balancer([r.url for r in replicas])
    await pg_admin(f"CREATE DATABASE {database}")
    upstream: Process | None = None
    try:
        upstream = start_upstream(workdir)
        config.write_text(_config(upstream.url, database, run_id))
        await asyncio.gather(*(asyncio.to_thread(r.start) for r in replicas))
        load = _Load(await balancer.start(), run_id, concurrency)
        counts = load.counts
        await _until(lambda: all(b.ready for b in balancer.backends), 10, "the balancer to see both replicas ready")
        began = time.monotonic()
        loading = asyncio.create_task(load.run())
        await asyncio.sleep(before_s)  # load for a while: the figures are over this span
        await _until(lambda: all(b.served for b in balancer.backends), 30, "both replicas to serve")
        counts.served_before = _served(balancer)
        for replica, backend in zip(replicas, balancer.backends, strict=True):
            await _until(lambda b=backend: b.ready and b.in_flight > 0, 30, f"requests on replica {replica.name}")
            counts.in_flight_at_sigterm.append(backend.in_flight)
            code, took = await asyncio.to_thread(replica.terminate)
            counts.restart_exit_codes.append(code)
            counts.drain_to_exit_s.append(round(took, 2))
            counts.start_to_ready_s.append(round(await asyncio.to_thread(replica.start), 2))
            served = backend.served
            await _until(lambda b=backend, s=served: b.ready and b.served > s, 30,
                         f"the balancer to send replica {replica.name} requests again")
        after = _served(balancer)
        await asyncio.sleep(after_s)
        await _until(lambda: all(b.served > n for b, n in zip(balancer.backends, after, strict=True)), 30,
                     "both replicas to serve after the restart")
        counts.served_after = tuple(b.served - n for b, n in zip(balancer.backends, after, strict=True))
        load.stopping = True
        await loading
        counts.load_s = round(time.monotonic() - began, 1)
        counts.served = _served(balancer)
        counts.retried = dict(balancer.retried)
        counts.balancer_failed = dict(balancer.failed)
        counts.dropped_out = (balancer.backends[0].dropped_out, balancer.backends[1].dropped_out)
        # the rows still queued are written on the way out
        stopped = await asyncio.gather(*(asyncio.to_thread(r.terminate) for r in replicas))
        counts.final_exit_codes = [code for code, _ in stopped]
        rows = await _rows(database)
        counts.answered = len(load.answered)
        counts.rows_lost = sum(1 for rid in load.answered if rid not in rows)
        counts.rows_duplicated = sum(1 for rid in load.answered if rows.get(rid, 0) > 1)
        counts.rows_total = sum(rows.values())
        return counts
    finally:
        await balancer.stop()
        for replica in replicas:
            replica.kill()
        if upstream is not None:
            upstream.stop()
        await pg_admin(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def _served(balancer: Balancer) -> tuple[int, int]:
    first, second = balancer.backends
    return first.served, second.served


def figures(c: RollingCounts) -> list[Figure]:
    section = "rolling restart"
    retried = ", ".join(f"{n} {case}" for case, n in c.retried.items())
    return [
        Figure(section, "requests failed (non-200, transport error, incomplete stream)",
               f"{c.failed} of {c.sent:,}", "0", c.failed == 0),
        Figure(section, "streams completed whole (long: 20 chunks over 3 s)", f"{c.streams:,} ({c.long_streams} long)"),
        Figure(section, "requests in flight on the replica at its SIGTERM (A, B)",
               ", ".join(map(str, c.in_flight_at_sigterm))),
        Figure(section, "SIGTERM exit codes (A, B; both at the end)",
               ", ".join(map(str, c.restart_exit_codes + c.final_exit_codes)), "0", 
               c.restart_exit_codes + c.final_exit_codes == [0, 0, 0, 0]),
        Figure(section, "usage rows lost (answered, no row)", f"{c.rows_lost} of {c.answered:,}", "0",
               c.rows_lost == 0),
        Figure(section, "usage rows duplicated", str(c.rows_duplicated), "0", c.rows_duplicated == 0),
        Figure(section, "retried by the balancer (connect failed / reused connection closed unanswered)",
               retried or "0"),
        Figure(section, "times A, B left the balancer's endpoints", "{}, {}".format(*c.dropped_out), "1, 1",
               c.dropped_out == (1, 1)),
        Figure(section, "served by A, B before the restart", "{:,}, {:,}".format(*c.served_before)),
        Figure(section, "served by A, B after the restart", "{:,}, {:,}".format(*c.served_after),
               "both > 0", min(c.served_after) > 0),
        Figure(section, "SIGTERM to exit (A, B), s", ", ".join(map(str, c.drain_to_exit_s))),
        Figure(section, "restart to ready (A, B), s", ", ".join(map(str, c.start_to_ready_s))),
        Figure(section, "load duration, s (concurrency 16)", str(c.load_s)),
    ]


def run(workdir: Path, *, quick: bool) -> list[Figure]:
    """The rolling restart's figures: a short run (quick) or ten seconds of load before and after."""
    span = 1.5 if quick else 10.0
    mine = workdir / "rolling"  # the suite's sections share workdir
    mine.mkdir(parents=True, exist_ok=True)
    return figures(asyncio.run(restart_under_load(mine, before_s=span, after_s=span)))


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(table(run(Path(tmp), quick="--quick" in sys.argv)))
