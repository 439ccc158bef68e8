"""Gateway overhead: wrk on the mock upstream direct vs via pointsman, and SSE TTFB, into bench/RESULTS.md."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from report import RESULTS, read_section, stamp, write_section  # noqa: E402

SECTION = "## Gateway overhead"
WHY_START, WHY_END = "<!-- why: kept across runs, edit freely -->", "<!-- /why -->"
WRK = "/usr/bin/wrk"
FIXED = "Hello from the mock upstream."
TARGET_ADDED_P50_MS = 1.0
TARGET_RPS_RATIO = 0.40
LITELLM_C16_RPS, LITELLM_C1_ADDED_MS = 115, 12.6
MODES = ("plain", "SSE")
CONCURRENCIES = (1, 16)
TTFB_PROMPT = "a b c d gap:0.05"

TRANSPORT_TABLE = """\
### Transport and server choice

Measured by the lead on this machine on 2026-11-24: a bare Litestar proxy handler in front of the same mock
upstream, wrk as above.

| Transport / server | c16 RPS | c1 p50 |
|---|---:|---:|
| httpx API over httpx-aiohttp's AiohttpTransport, granian | 1,893 | 1.11 ms |
| aiohttp ClientSession, granian | 4,075 | 0.83 ms |
| aiohttp ClientSession, uvicorn + httptools + uvloop | 5,293 | 0.49 ms |
| pointsman's HTTP/1.1 client (`backends/http1.py`), uvicorn + httptools + uvloop | 9,683 | 0.35 ms |
| Litestar handler returning a constant, granian | 13,109 | 0.31 ms |
| Litestar handler returning a constant, uvicorn | 11,848 | 0.14 ms |

Conclusion: uvicorn + httptools + uvloop, with a minimal keep-alive HTTP/1.1 client over asyncio and httptools
(`backends/http1.py`) for the upstream calls: the client library was the largest cost in the proxy's profile."""

DEFAULT_WHY = """\
Why the gap: the mock upstream is itself a uvloop + aiohttp server answering from memory (the direct RPS
column), so the gateway is compared with a near-free backend, and wrk, the upstream and the gateway share the
machine's 2 cores: each gateway request adds a second HTTP exchange (server side and client side) on the CPUs
the upstream needs. A py-spy profile of the 1-worker gateway at c16 plain (`py-spy record --native`, 8 s, on
2026-11-24) found it waiting in epoll about half the time; of its busy samples, pointsman code was about 4%,
aiohttp's client about 49%, uvicorn 19%, Litestar 17%, and socket read/write syscalls about 21%. For scale,
the bare Litestar + aiohttp proxy on uvicorn (table below) reached 5,293 RPS at c16, itself only about 40% of
a direct run here. Against a real model server, whose answers take tens of milliseconds or more, this fixed
per-request cost is small."""


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


@dataclass
class Cell:
    """All runs of one (target, mode, concurrency) combination."""

    runs: list[WrkResult] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.runs)


@dataclass
class Ttfb:
    first_ms: float
    gap_ms: float
    total_ms: float


# --- processes ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a server in its own process group (so its workers can be stopped with it)."""
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s:\n{log.read_text()[-2000:]}")


def start_upstream(tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = tmp / "upstream.log"
    proc = spawn([sys.executable, "tests/e2e/upstream.py", "--port", str(port)], log)
    wait_ready(f"http://127.0.0.1:{port}/v1/models", proc, log)
    return proc, f"http://127.0.0.1:{port}"


def start_gateway(tmp: Path, upstream: str, workers: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = tmp / "pointsman.yaml"
    config.write_text("models:\n  - {id: bench-model, backend: openai, "
                      f'base_url: "{upstream}/v1", upstream_model: mock-model}}\n')
    log = tmp / f"gateway-w{workers}.log"
    # upper case: the CLI lower-cases it for uvicorn, while gateway/asgi.py hands it to logging as is
    env = {**os.environ, "POINTSMAN_LOG_LEVEL": "WARNING"}
    pointsman = str(Path(sys.executable).with_name("pointsman"))
    argv = [pointsman, "serve", "--config", str(config), "--port", str(port), "--workers", str(workers)]
    proc = spawn(argv, log, env)
    wait_ready(f"http://127.0.0.1:{port}/ready", proc, log)
    return proc, f"http://127.0.0.1:{port}"


# --- wrk ---------------------------------------------------------------------------------------------------


def body(mode: str, content: str = "fixed") -> dict[str, Any]:
    payload: dict[str, Any] = {"model": "bench-model", "messages": [{"role": "user", "content": content}]}
    if mode == "SSE":
        payload["stream"] = True
    return payload


def lua_script(tmp: Path, mode: str) -> Path:
    path = tmp / f"{mode.lower()}.lua"
    encoded = json.dumps(json.dumps(body(mode), separators=(",", ":")))  # a JSON string is a valid Lua string
    path.write_text(f'wrk.method = "POST"\nwrk.body = {encoded}\n'
                    'wrk.headers["Content-Type"] = "application/json"\n')
    return path


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def to_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match[1]) * _UNITS_MS[match[2]]


def parse_wrk(output: str) -> WrkResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (rps and p50 and p99):
        raise RuntimeError(f"cannot parse wrk output:\n{output}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors += int(non2xx[1]) if non2xx else 0
    return WrkResult(float(rps[1]), to_ms(p50[1]), to_ms(p99[1]), errors)


def wrk(url: str, script: Path, connections: int, duration_s: int) -> str:
    argv = [WRK, "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency", "--timeout", "5s",
            "-s", str(script), url + "/v1/chat/completions"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 30, check=True)
    return done.stdout


def measure(url: str, script: Path, connections: int, duration_s: int, warmup_s: int) -> WrkResult:
    wrk(url, script, connections, warmup_s)
    return parse_wrk(wrk(url, script, connections, duration_s))


# --- functional sanity and TTFB (aiohttp) ------------------------------------------------------------------


async def sanity(session: aiohttp.ClientSession, url: str, mode: str) -> None:
    async with session.post(url + "/v1/chat/completions", json=body(mode)) as response:
        raw = await response.read()
    if response.status != 200:
        raise RuntimeError(f"{url} {mode}: HTTP {response.status}: {raw[:300]!r}")
    if mode == "SSE":
        if not raw.rstrip().endswith(b"data: [DONE]"):
            raise RuntimeError(f"{url} SSE does not end with data: [DONE]: {raw[-300:]!r}")
    elif json.loads(raw)["choices"][0]["message"]["content"] != FIXED:
        raise RuntimeError(f"{url} plain: unexpected answer {raw[:300]!r}")


async def check_all(urls: list[str]) -> None:
    async with aiohttp.ClientSession() as session:
        for url in urls:
            for mode in MODES:
                await sanity(session, url, mode)


async def one_ttfb(session: aiohttp.ClientSession, url: str) -> Ttfb:
    """Time to the first `data:` line, the median gap between the content chunks, and the time to [DONE]."""
    stamps: list[float] = []
    start = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", json=body("SSE", TTFB_PROMPT)) as response:
        response.raise_for_status()
        async for line in response.content:
            if line.startswith(b"data:"):
                stamps.append(time.perf_counter())
    if len(stamps) < 4:
        raise RuntimeError(f"{url}: only {len(stamps)} SSE events")
    # events: role, one per word (each after the 50 ms gap), stop, [DONE]; the word gaps are stamps[1:-2]
    gaps = [b - a for a, b in zip(stamps[:-3], stamps[1:-2], strict=True)]
    return Ttfb((stamps[0] - start) * 1e3, statistics.median(gaps) * 1e3, (stamps[-1] - start) * 1e3)


async def ttfb_all(urls: list[str], count: int) -> dict[str, Ttfb]:
    """Interleave the targets request by request; median of each figure per target."""
    samples: dict[str, list[Ttfb]] = {url: [] for url in urls}
    async with aiohttp.ClientSession() as session:
        for url in urls:  # warm-up: open the connections
            await one_ttfb(session, url)
        for _ in range(count):
            for url in urls:
                samples[url].append(await one_ttfb(session, url))
    figures = ("first_ms", "gap_ms", "total_ms")
    return {url: Ttfb(*(statistics.median(getattr(s, f) for s in runs) for f in figures))
            for url, runs in samples.items()}


# --- report ------------------------------------------------------------------------------------------------


def fmt_ms(value: float) -> str:
    return f"{value:.2f} ms"


def overhead_table(cells: dict[tuple[str, str, int], Cell], gateway: str) -> list[str]:
    lines = ["| mode | conc. | direct RPS | gateway RPS | gateway/direct | direct p50 | gateway p50 "
             "| added p50 | direct p99 | gateway p99 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in MODES:
        for conc in CONCURRENCIES:
            d, g = cells["direct", mode, conc], cells[gateway, mode, conc]
            ratio = g.median("rps") / d.median("rps")
            added = g.median("p50_ms") - d.median("p50_ms")
            lines.append(f"| {mode} | {conc} | {d.median('rps'):,.0f} | {g.median('rps'):,.0f} | {ratio:.0%} "
                         f"| {fmt_ms(d.median('p50_ms'))} | {fmt_ms(g.median('p50_ms'))} | {added:+.2f} ms "
                         f"| {fmt_ms(d.median('p99_ms'))} | {fmt_ms(g.median('p99_ms'))} |")
    return lines


def targets(cells: dict[tuple[str, str, int], Cell], gateways: list[str]) -> tuple[list[str], bool]:
    """One line per target and worker count; the measured gap where one is missed."""
    lines, missed = [], False
    for gateway in gateways:
        for mode in MODES:
            d1, g1 = cells["direct", mode, 1], cells[gateway, mode, 1]
            added = g1.median("p50_ms") - d1.median("p50_ms")
            ok = added <= TARGET_ADDED_P50_MS
            gap = "" if ok else f" (missed by {added - TARGET_ADDED_P50_MS:.2f} ms)"
            lines.append(f"- {gateway}, {mode}: added p50 at c1 {added:+.2f} ms, target at most "
                         f"{TARGET_ADDED_P50_MS:g} ms: {'met' if ok else 'MISSED'}{gap}")
            d16, g16 = cells["direct", mode, 16], cells[gateway, mode, 16]
            ratio = g16.median("rps") / d16.median("rps")
            ok16 = ratio >= TARGET_RPS_RATIO
            short = TARGET_RPS_RATIO * d16.median("rps") - g16.median("rps")
            points = (TARGET_RPS_RATIO - ratio) * 100
            gap16 = "" if ok16 else f" (missed by {points:.0f} points, {short:,.0f} RPS)"
            lines.append(f"- {gateway}, {mode}: gateway RPS at c16 {ratio:.0%} of direct, target at least "
                         f"{TARGET_RPS_RATIO:.0%}: {'met' if ok16 else 'MISSED'}{gap16}")
            missed |= not (ok and ok16)
    return lines, missed


def litellm_line(cells: dict[tuple[str, str, int], Cell], gateways: list[str]) -> str:
    parts = []
    for gateway in gateways:
        rps = cells[gateway, "plain", 16].median("rps")
        added = cells[gateway, "plain", 1].median("p50_ms") - cells["direct", "plain", 1].median("p50_ms")
        workers = gateway.removeprefix("gateway ")
        parts.append(f"pointsman {workers} {rps:,.0f} RPS ({rps / LITELLM_C16_RPS:.0f}x) and {added:+.2f} ms")
    return (f"Reference: LiteLLM 1.106, measured on this machine the same way (plain): {LITELLM_C16_RPS} RPS "
            f"at c16 and +{LITELLM_C1_ADDED_MS} ms added p50 at c1; here " + "; ".join(parts) + ".")


def ttfb_table(ttfb: dict[str, Ttfb], names: dict[str, str]) -> list[str]:
    lines = ["| target | TTFB (first `data:`) | inter-chunk (median) | last event |", "|---|---:|---:|---:|"]
    for url, t in ttfb.items():
        lines.append(f"| {names[url]} | {fmt_ms(t.first_ms)} | {fmt_ms(t.gap_ms)} | {fmt_ms(t.total_ms)} |")
    return lines


def relay_verdict(ttfb: dict[str, Ttfb], names: dict[str, str]) -> str:
    """Relayed: the first event comes before the upstream's first 50 ms wait ends, and the spacing is kept."""
    direct = next(t for url, t in ttfb.items() if names[url] == "direct")
    relayed = all(t.first_ms < 25 and abs(t.gap_ms - direct.gap_ms) < 10 for t in ttfb.values())
    if relayed:
        return ("Through the gateway the first event arrives well before the upstream's first 50 ms wait "
                "ends and the chunks keep the upstream's spacing: relayed as they arrive, not buffered.")
    return "WARNING: the gateway's TTFB or chunk spacing differs from the upstream's: it looks buffered."


def existing_why(text: str) -> str | None:
    start, end = text.find(WHY_START), text.find(WHY_END)
    return text[start + len(WHY_START):end].strip() if 0 <= start < end else None


def write_results(section_body: list[str], missed: bool) -> None:
    lines = list(section_body)
    if missed:  # the "why" paragraph is hand-edited: kept across runs
        lines += ["", WHY_START, existing_why(read_section(SECTION)) or DEFAULT_WHY, WHY_END]
    write_section(SECTION, [*lines, "", TRANSPORT_TABLE])


# --- main --------------------------------------------------------------------------------------------------


def run_wrk_matrix(targets_: dict[str, str], scripts: dict[str, Path], args: argparse.Namespace,
                   ) -> dict[tuple[str, str, int], Cell]:
    """Every cell: each target in turn (order rotated per repeat) so noise hits all of them alike."""
    cells: dict[tuple[str, str, int], Cell] = {}
    names = list(targets_)
    for mode in MODES:
        for conc in CONCURRENCIES:
            for rep in range(args.repeats):
                order = names[rep % len(names):] + names[:rep % len(names)]
                for name in order:
                    result = measure(targets_[name], scripts[mode], conc, args.duration, args.warmup)
                    cells.setdefault((name, mode, conc), Cell()).runs.append(result)
                    print(f"  {mode:5} c{conc:<2} rep {rep + 1}  {name:20} {result.rps:9,.0f} RPS  "
                          f"p50 {fmt_ms(result.p50_ms):>9}  p99 {fmt_ms(result.p99_ms):>9}"
                          + (f"  errors {result.errors}" if result.errors else ""), flush=True)
    return cells


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=5, help="seconds per timed wrk run (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of wrk warm-up before each run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell; the median is reported")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="gateway worker counts")
    parser.add_argument("--ttfb-requests", type=int, default=30, help="SSE requests per target for TTFB")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    return parser.parse_args()


def bench(args: argparse.Namespace, tmp: Path, procs: list[subprocess.Popen]) -> None:
    upstream_proc, upstream = start_upstream(tmp)
    procs.append(upstream_proc)
    targets_ = {"direct": upstream}
    for workers in args.workers:
        proc, url = start_gateway(tmp, upstream, workers)
        procs.append(proc)
        targets_[f"gateway ({workers} worker{'s' if workers > 1 else ''})"] = url
    gateways = [name for name in targets_ if name != "direct"]
    asyncio.run(check_all(list(targets_.values())))
    print("sanity: plain and SSE answer 200 (SSE ends with data: [DONE]) on every target", flush=True)
    runs = len(MODES) * len(CONCURRENCIES) * args.repeats * len(targets_)
    minutes = runs * (args.warmup + args.duration) / 60
    print(f"wrk: {runs} runs of {args.warmup}+{args.duration} s, about {minutes:.1f} min", flush=True)
    scripts = {mode: lua_script(tmp, mode) for mode in MODES}
    cells = run_wrk_matrix(targets_, scripts, args)
    print(f"TTFB: {args.ttfb_requests} SSE requests per target, prompt {TTFB_PROMPT!r}", flush=True)
    ttfb = asyncio.run(ttfb_all(list(targets_.values()), args.ttfb_requests))
    report(args, cells, gateways, ttfb, {url: name for name, url in targets_.items()})


def report(args: argparse.Namespace, cells: dict[tuple[str, str, int], Cell], gateways: list[str],
           ttfb: dict[str, Ttfb], names: dict[str, str]) -> None:
    body_lines = [stamp(), "",
                  f"wrk -t1, -c1 and -c16, {args.duration} s runs after {args.warmup} s warm-up, POST "
                  "/v1/chat/completions with the upstream's fixed answer; direct (tests/e2e/upstream.py, "
                  f"aiohttp + uvloop) and gateway runs interleaved, median of {args.repeats}."]
    for gateway in gateways:
        body_lines += ["", f"### {gateway.capitalize()}", "", *overhead_table(cells, gateway)]
    errors = {k: c.errors for k, c in cells.items() if c.errors}
    if errors:
        body_lines += ["", "wrk errors (socket or non-2xx): "
                       + ", ".join(f"{n} {m} c{c}: {e}" for (n, m, c), e in errors.items())]
    body_lines += ["", f"### SSE time to first byte ({TTFB_PROMPT!r}, 50 ms between chunks, median of "
                   f"{args.ttfb_requests})", "", *ttfb_table(ttfb, names), "", relay_verdict(ttfb, names)]
    target_lines, missed = targets(cells, gateways)
    body_lines += ["", "### Targets", "", *target_lines, "", litellm_line(cells, gateways)]
    print("\n" + "\n".join(body_lines), flush=True)
    if not args.no_write:
        write_results(body_lines, missed)
        print(f"\nwrote the '{SECTION}' section of {RESULTS.relative_to(ROOT)}")


def interrupt(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so main's finally stops every server."""
    raise KeyboardInterrupt


def main() -> int:
    args = parse_args()
    procs: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="pointsman-bench-") as tmp:
            try:
                bench(args, Path(tmp), procs)
            finally:
                for proc in reversed(procs):
                    stop(proc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
