"""The reliability suite from one command: load, faults, soak, bad input, rolling restart; one table of figures.

Run: .venv/bin/python -m bench.reliability [--load-s 60] [--concurrency 64] [--soak-s 600] [--quick] [--write]
Exits 1 when any figure missed its target.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.reliability import faults, load, soak
from bench.reliability.figures import Figure, table
from bench.report import stamp, write_section

SECTION = "## Reliability"
ABOUT = ("Real parts on free ports: an own redis-server (append-only, fsync always) and PostgreSQL cluster, two "
         "mock upstreams as two deployments of one model, one `pointsman serve` with rate limits, the exact "
         "cache, budgets, usage rows, metrics and tracing (exporter none). Load: aiohttp, half streaming. Faults "
         "during load: an upstream killed (-9) and restarted, Redis killed (-9) and restarted, PostgreSQL "
         "restarted (-m fast); lost rows compare the x-request-ids the client got with the usage rows after "
         "the gateway's SIGTERM flush; overspend is the capped user's spend in its usage rows over its budget.")


def _others(name: str) -> Callable[..., list[Figure]] | None:
    """bad_input.run / rolling.run, written by others: None while the module is not there yet."""
    try:
        return importlib.import_module(f"bench.reliability.{name}").run
    except ModuleNotFoundError as exc:
        if exc.name != f"bench.reliability.{name}":
            raise
        return None


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__.splitlines()[0])
    parser.add_argument("--load-s", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--soak-s", type=float, default=600.0)
    parser.add_argument("--quick", action="store_true", help="a short run: a few seconds of each")
    parser.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    args = parser.parse_args()
    quick = args.quick
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="pointsman-reliability-") as tmp:
        workdir = Path(tmp)
        sections: list[tuple[str, Callable[[], list[Figure]]]] = [
            ("load", lambda: load.run(workdir, quick=quick, seconds=None if quick else args.load_s,
                                      concurrency=16 if quick else args.concurrency)),
            ("faults", lambda: faults.run(workdir, quick=quick, concurrency=16 if quick else args.concurrency)),
            ("soak", lambda: soak.run(workdir, quick=quick, seconds=None if quick else args.soak_s)),
        ]
        for name in ("bad_input", "rolling"):
            other = _others(name)
            if other is None:
                print(f"bench/reliability/{name}.py is missing: its section is left out", flush=True)
            else:
                sections.append((name, lambda other=other: other(workdir, quick=quick)))
        for name, section in sections:
            print(f"running {name} ...", flush=True)
            done = section()
            figures += done
            print(table(done), flush=True)
    print("\n" + table(figures))
    missed = [f for f in figures if f.ok is False]
    if args.write:
        write_section(SECTION, [stamp(), "", ABOUT, "", table(figures)])
        print(f"wrote the '{SECTION}' section of bench/RESULTS.md")
    if missed:
        print(f"{len(missed)} figure(s) MISSED: " + "; ".join(f"{f.section}: {f.name}" for f in missed))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
