"""Machine instructions a chat request costs in process, counted by valgrind's callgrind: bench/policy_chain.py's
variants through the whole app to the mock upstream (another process, not counted), instrumentation on only while
the counted requests run. The count repeats within ~0.2% from run to run whatever else the machine does, where CPU
time moves by 5-40% here, and unlike bench/instructions.py's bytecode count it sees what C does for the code: an
exception formatted and cleared inside a lookup, a generator made per call, a str.encode. Instructions are not
time (they differ in cost, and cache misses are not in the count), so a change it favours is confirmed by timing.
At sample_ratio 0.1 the count also moves by ~1% with how many requests the sampler picks (the trace ids draw from
the same random stream as its decisions, so a change there picks others); 0.0 has no such spread.

Needs valgrind (`apt-get install valgrind`). Each variant runs in its own process under `valgrind --tool=callgrind
--instr-atstart=no`; the constant cost of switching the instrumentation on and off is measured by a run of no
requests and taken off."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from app_drive import BASE, CONFIGS, drive, lifespan  # noqa: E402
from report import added_table, stamp, write_section  # noqa: E402

SECTION = "## Machine instructions a request"
VARIANTS = {
    "no policies": "none",
    "rate limit + budget + exact cache": "chain",
    "the chain + metrics": "metrics",
    "the chain + metrics + traces, sample_ratio 0.0": "traces0",
    "the chain + metrics + traces, sample_ratio 0.1": "traces0.1",
}
_TOGGLE = ["callgrind_control", "-i"]


def _instrument(on: bool) -> None:
    subprocess.run([*_TOGGLE, "on" if on else "off", str(os.getpid())], check=True, capture_output=True)


async def _counted(name: str, n: int, upstream: str) -> None:
    """Inside valgrind: the app with `name`'s config, warmed up, then `n` requests with instrumentation on."""
    from config.loader import parse_config
    from gateway import responses
    from gateway.app import create_app

    responses.WATCH_AFTER_S = 3600.0  # under valgrind a request takes milliseconds: no disconnect watch starts
    # health checks run by the clock, not per request: off (see bench/instructions.py)
    app = create_app(parse_config(BASE % upstream + "routing: {health_check_s: 0}\n" + CONFIGS[name]))
    inbox, task = await lifespan(app)
    try:
        await drive(app, 400, "warm")
        random.seed(0)  # the same requests sampled for tracing, run after run
        _instrument(True)
        await drive(app, n, "counted")
        _instrument(False)
    finally:
        inbox.put_nowait({"type": "lifespan.shutdown"})
        await task


def _collected(name: str, n: int, upstream: str) -> int:
    """The instructions callgrind collected for `n` requests of variant `name`, in a process of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        run = subprocess.run(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", sys.executable,
             __file__, "--inside", name, str(n), upstream], capture_output=True, text=True, check=True)
    for line in run.stderr.splitlines():
        if "Collected :" in line:
            return int(line.rsplit(":", 1)[1].replace(",", "").strip())
    raise RuntimeError(f"callgrind printed no total:\n{run.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="requests counted per variant")
    parser.add_argument("--write", action="store_true", help="write the figures into bench/RESULTS.md")
    parser.add_argument("--inside", nargs=3, help=argparse.SUPPRESS)  # NAME N UPSTREAM: the run under valgrind
    args = parser.parse_args()
    if args.inside:
        import uvloop

        name, n, upstream = args.inside
        uvloop.run(_counted(name, int(n), upstream))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind: apt-get install valgrind")
    from tests.conftest import start_upstream

    upstream = start_upstream(Path(tempfile.mkdtemp(prefix="machine-instructions-")))
    url = upstream.url.removesuffix("/v1")
    totals: dict[str, float] = {}
    try:
        switching = _collected("none", 0, url)  # the instrumentation's own on and off
        for label, name in VARIANTS.items():
            totals[label] = (_collected(name, args.n, url) - switching) / args.n
            print(f"{label:50} {totals[label]:10,.0f} machine instructions a request", flush=True)
    finally:
        upstream.stop()
    lines = added_table("chat request through the app to the mock upstream", "machine instructions a request", totals)
    print("\n".join(lines))
    if args.write:
        note = f"{args.n} requests counted per variant, 16 at a time, after a warm-up of 400."
        write_section(SECTION, [stamp(), "", __doc__.replace("\n", " ").strip(), note, "", *lines])
        print(f"wrote the '{SECTION}' section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
