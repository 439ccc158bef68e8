"""The policy chain's cost in context: chat requests through the whole app (its ASGI callable, as uvicorn calls it:
Litestar, the pipeline, the real upstream client) to the mock upstream, 16 at a time, without policies and with
each policy, the chain (rate limit, budget, exact cache; every request a cache miss), then metrics and tracing.
The figure is this process's CPU time per request: no server socket and no load generator share the measurement,
so its best of a few rounds moves by about 5% between runs, where wrk's RPS on this machine moves by tens of
percent (bench/gateway.py). A warm loop around Pipeline.complete alone, as this script measured before, found half
of what the same code costs here."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from app_drive import BASE, CONFIGS, cpu_us, drive, lifespan  # noqa: E402
from report import added_table, stamp, write_section  # noqa: E402

from config.loader import parse_config  # noqa: E402
from gateway.app import create_app  # noqa: E402
from tests.conftest import start_upstream  # noqa: E402

SECTION = "## Policy chain in process"
NONE = "no policies"
VARIANTS = [
    (NONE, CONFIGS["none"]),
    ("rate limit", CONFIGS["rate"]),
    ("budget", CONFIGS["budget"]),
    ("exact cache (miss)", CONFIGS["cache"]),
    ("rate limit + budget + exact cache", CONFIGS["chain"]),
    ("the chain + metrics", CONFIGS["metrics"]),
    ("the chain + metrics + traces, sample_ratio 0.1", CONFIGS["traces0.1"]),
    ("the chain + metrics + traces, sample_ratio 1.0", CONFIGS["traces1"]),
]


async def cpu_per_request(upstream: str, extra: str, n: int, tag: str) -> float:
    """CPU microseconds this process spends per request with `extra` config, after a warm-up of n/5 requests."""
    app = create_app(parse_config(BASE % upstream + extra))
    inbox, task = await lifespan(app)
    try:
        await drive(app, n // 5, f"warm {tag}")
        return await cpu_us(app, n, tag)
    finally:
        inbox.put_nowait({"type": "lifespan.shutdown"})
        await task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=4000, help="requests per variant and round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of every variant, interleaved; each figure is its best round (this machine is "
                             "shared: a round that others' load slowed down is not the code's cost)")
    parser.add_argument("--write", action="store_true", help="write the figures into bench/RESULTS.md")
    args = parser.parse_args()
    upstream = start_upstream(Path(tempfile.mkdtemp(prefix="policy-chain-")))
    url = upstream.url.removesuffix("/v1")
    best: dict[str, float] = {}
    try:
        for round_ in range(args.rounds):
            for label, extra in VARIANTS:
                cpu = uvloop.run(cpu_per_request(url, extra, args.n, f"r{round_} {label}"))
                best[label] = min(best.get(label, cpu), cpu)
                print(f"round {round_ + 1}  {label:50} {cpu:7.1f} us CPU per request", flush=True)
    finally:
        upstream.stop()
    table = added_table("chat request through the app to the mock upstream, c16", "CPU us per request", best, ".1f")
    print("\n".join(table))
    if args.write:
        note = f"Each figure is the best of {args.rounds} interleaved rounds of {args.n} requests."
        write_section(SECTION, [stamp(), "", __doc__.replace("\n", " ").strip(), note, "", *table])
        print(f"wrote the '{SECTION}' section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
