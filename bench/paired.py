"""Two builds of the gateway compared by the CPU time a chat request costs in each, closely enough to see a change of
2%: each side's app, built in its own process from a checkout (this one, or a copy of an older commit) and one of the
configs below, takes the same requests as bench/policy_chain.py sends (through its ASGI callable and the real
upstream client to the mock upstream, 16 at a time, each a cache miss) in bursts, the two processes taking turns
pinned to one core and the mock upstream pinned to the other, with the hash seed fixed. Each pair of processes gives
the median of its bursts' paired ratios; the pair is started again with the sides swapped, and the ratio reported is
the mean over the pairs. On this shared machine a process's CPU time a request moves by 5-40% from run to run, and
between two processes of one build by up to 4% (hash seeds, memory layout); two processes of one build compared this
way read 1.00 (0.99-1.02 over four pairs).

  .venv/bin/python bench/paired.py --compare none chain --compare /tmp/base@traces0.1 traces0.1 [--write]

A side is `[CHECKOUT@]CONFIG`; CONFIG is one of bench/app_drive.py's CONFIGS. A checkout of an older commit:
`git worktree add` or `mkdir /tmp/base && git archive HEAD | tar -x -C /tmp/base`."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from app_drive import BASE, CONFIGS, cpu_us, drive, lifespan  # this script's own directory: imports no gateway code

ROOT = Path(__file__).resolve().parent.parent
BENCH = str(ROOT / "bench")

SECTION = "## Paired comparisons"
APP_CORE, UPSTREAM_CORE = 0, 1


@dataclass(frozen=True)
class Side:
    checkout: Path
    config: str

    @classmethod
    def parse(cls, text: str) -> Side:
        checkout, _, config = text.rpartition("@")
        if config not in CONFIGS:
            raise SystemExit(f"unknown config {config!r} in {text!r}: one of {', '.join(CONFIGS)}")
        path = Path(checkout).resolve() if checkout else ROOT
        if not (path / "gateway" / "app.py").is_file():
            raise SystemExit(f"{path} is not a pointsman checkout (no gateway/app.py)")
        return cls(path, config)

    def __str__(self) -> str:
        return self.config if self.checkout == ROOT else f"{self.checkout}@{self.config}"


def pin(pid: int, core: int) -> None:
    """Every thread of process `pid` onto `core`."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), {core})


# ---- the child: one side's app, answering "N" on stdin with its CPU microseconds a request over N requests


def child(checkout: str, config: str, upstream: str) -> None:
    pin(os.getpid(), APP_CORE)
    sys.path[:0] = [checkout]  # the side's own gateway; the drive is this checkout's (it imports no gateway)
    import uvloop

    from config.loader import parse_config
    from gateway.app import create_app

    async def serve() -> None:
        app = create_app(parse_config(BASE % upstream + CONFIGS[config]))
        inbox, task = await lifespan(app)
        await drive(app, 1000, f"warm {time.time()}")
        loop = asyncio.get_running_loop()
        burst = 0
        while (line := await loop.run_in_executor(None, sys.stdin.readline)).strip():
            n, burst = int(line), burst + 1
            # a new tag each burst: every request a cache miss
            print(f"{await cpu_us(app, n, f'{burst} {time.time()}'):.3f}", flush=True)
        inbox.put_nowait({"type": "lifespan.shutdown"})
        await task

    uvloop.run(serve())


# ---- the parent


@dataclass
class Comparison:
    a: Side
    b: Side
    a_us: list[float]  # each pair's median CPU us a request
    b_us: list[float]
    ratios: list[float]  # each pair's median of B/A over its bursts


def compare(a: Side, b: Side, upstream: str, pairs: int, bursts: int, n: int) -> Comparison:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    result = Comparison(a, b, [], [], [])
    for index in range(pairs):
        sides = (a, b) if index % 2 == 0 else (b, a)  # which one starts (and is built first) alternates
        procs = [subprocess.Popen([sys.executable, __file__, "--child", str(side.checkout), side.config, upstream],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
                 for side in sides]
        times: list[list[float]] = [[], []]
        try:
            for burst in range(bursts):
                for which in (0, 1) if burst % 2 == 0 else (1, 0):
                    procs[which].stdin.write(f"{n}\n")  # type: ignore[union-attr]
                    procs[which].stdin.flush()  # type: ignore[union-attr]
                    line = procs[which].stdout.readline()  # type: ignore[union-attr]
                    if not line:
                        raise SystemExit(f"the {sides[which]} side's process ended: its error is above")
                    times[which].append(float(line))
        finally:
            for proc in procs:
                proc.communicate("\n", timeout=60)
        a_times, b_times = times if index % 2 == 0 else times[::-1]
        result.a_us.append(statistics.median(a_times))
        result.b_us.append(statistics.median(b_times))
        result.ratios.append(statistics.median(y / x for x, y in zip(a_times, b_times, strict=True)))
        print(f"  {a} vs {b}, pair {index + 1}: {result.a_us[-1]:.1f} / {result.b_us[-1]:.1f} us a request, "
              f"B/A {result.ratios[-1]:.3f}", flush=True)
    return result


def table(results: list[Comparison]) -> list[str]:
    lines = ["| A | B | A: CPU us a request | B: CPU us a request | B / A (pairs' range) |", "|---|---|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r.a} | {r.b} | {statistics.median(r.a_us):.1f} | {statistics.median(r.b_us):.1f} | "
                     f"{statistics.mean(r.ratios):.3f} ({min(r.ratios):.3f}-{max(r.ratios):.3f}) |")
    return lines


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", nargs=2, action="append", required=True, metavar=("A", "B"),
                        help="two sides, [CHECKOUT@]CONFIG each; repeat for more comparisons")
    parser.add_argument("--pairs", type=int, default=4, help="process pairs per comparison, sides swapped in turn")
    parser.add_argument("--bursts", type=int, default=40, help="bursts each side runs per pair")
    parser.add_argument("-n", type=int, default=400, help="requests a burst")
    parser.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT), BENCH]
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("bench/paired.py needs two cores: the apps on one, the mock upstream on the other")
    sides = [(Side.parse(a), Side.parse(b)) for a, b in args.compare]
    from tests.conftest import start_upstream

    upstream = start_upstream(Path(tempfile.mkdtemp(prefix="paired-")))
    try:
        pin(upstream.proc.pid, UPSTREAM_CORE)
        url = upstream.url.removesuffix("/v1")
        results = [compare(a, b, url, args.pairs, args.bursts, args.n) for a, b in sides]
    finally:
        upstream.stop()
    lines = table(results)
    print("\n".join(lines))
    if args.write:
        from report import stamp, write_section

        note = (f"{args.pairs} process pairs a comparison, {args.bursts} bursts of {args.n} requests a side and "
                "pair. Configs (bench/app_drive.py's): `none`; `rate`, `budget`, `cache` alone; `chain`, the three; "
                "`metrics`, the chain with metrics; `traces0`, `traces0.1`, `traces1`, with traces at that ratio too.")
        write_section(SECTION, [stamp(), "", __doc__.split("\n\n")[0].replace("\n", " "), note, "", *lines])
        print(f"wrote the '{SECTION}' section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
