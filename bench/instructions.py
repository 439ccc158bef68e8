"""Bytecode instructions a chat request executes, by module and function: bench/policy_chain.py's variants through
the whole app to the mock upstream, counted with sys.settrace's opcode events. On this shared machine CPU time moves
by 5-40% between runs; the count moves by well under 1% (only what the event loop happens to batch differs), so a
change too small for wrk's noise still shows here. It counts interpreted instructions only: time in C (msgspec,
httptools, uvloop) and in the kernel is not in it, and instructions differ in cost (a call costs more than a local
load), so a count that falls is a candidate, confirmed by timing it."""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import policy_chain  # noqa: E402
from app_drive import BASE, CONFIGS, drive, lifespan  # noqa: E402
from report import added_table, stamp, write_section  # noqa: E402

from config.loader import parse_config  # noqa: E402
from gateway import responses  # noqa: E402
from gateway.app import create_app  # noqa: E402
from tests.conftest import start_upstream  # noqa: E402

SECTION = "## Instructions a request"
VARIANTS = {
    policy_chain.NONE: CONFIGS["none"],
    "rate limit + budget + exact cache": CONFIGS["chain"],
    "the chain + metrics": CONFIGS["metrics"],
    "the chain + metrics + traces, sample_ratio 0.0": CONFIGS["traces0"],
    "the chain + metrics + traces, sample_ratio 0.1": CONFIGS["traces0.1"],
}
_HARNESS = str(ROOT / "bench")  # the drive's own frames are not the app's
# the upstreams' health checks run by the clock, not per request: off, so that a variant's count does not depend on
# how long its traced requests took (with them on, the first policy variant counted ~1,000 instructions a request
# more than a second run of itself, nearly all of it a module import inside the count)
_NO_CLOCK = "routing: {health_check_s: 0}\n"


def counting(counts: Counter[CodeType]) -> Callable[[FrameType, str, Any], Any]:
    """A trace function that counts each frame's instructions by code object."""

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            counts[frame.f_code] += 1
        elif event == "call":
            frame.f_trace_opcodes = True
        return trace

    return trace


async def count(upstream: str, extra: str, n: int) -> Counter[CodeType]:
    """Instructions by code object over `n` requests with `extra` config, after a warm-up of n/5."""
    app = create_app(parse_config(BASE % upstream + _NO_CLOCK + extra))
    inbox, task = await lifespan(app)
    counts: Counter[CodeType] = Counter()
    try:
        await drive(app, n // 5, "warm")
        random.seed(0)  # the same requests sampled for tracing, run after run
        sys.settrace(counting(counts))
        try:
            await drive(app, n, "counted")
        finally:
            sys.settrace(None)
    finally:
        inbox.put_nowait({"type": "lifespan.shutdown"})
        await task
    return Counter({code: c for code, c in counts.items() if not code.co_filename.startswith(_HARNESS)})


def where(code: CodeType) -> str:
    """A code object's file, relative to the checkout or to site-packages."""
    name = code.co_filename
    if "site-packages/" in name:
        return name.split("site-packages/", 1)[1]
    return name.removeprefix(str(ROOT) + "/")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="requests counted per variant")
    parser.add_argument("--top", type=int, default=15, help="functions listed for the last variant")
    parser.add_argument("--write", action="store_true", help="write the figures into bench/RESULTS.md")
    args = parser.parse_args()
    # traced, a request takes tens of milliseconds: past the disconnect watch's delay, which would then start
    # watching (and count its sweeps) where an untraced request ends first
    responses.WATCH_AFTER_S = 3600.0
    upstream = start_upstream(Path(tempfile.mkdtemp(prefix="instructions-")))
    url = upstream.url.removesuffix("/v1")
    totals: dict[str, float] = {}
    last: Counter[CodeType] = Counter()
    try:
        for label, extra in VARIANTS.items():
            last = uvloop.run(count(url, extra, args.n))
            totals[label] = sum(last.values()) / args.n
            print(f"{label:50} {totals[label]:8.0f} instructions a request", flush=True)
    finally:
        upstream.stop()
    table = added_table("chat request through the app to the mock upstream", "instructions a request", totals)
    modules: Counter[str] = Counter()
    for code, c in last.items():
        modules[where(code)] += c
    label = list(VARIANTS)[-1]
    by_module = [f"| {name} | {c / args.n:,.0f} |" for name, c in modules.most_common(args.top)]
    by_function = [f"| {where(code)}:{code.co_firstlineno} {code.co_qualname} | {c / args.n:,.0f} |"
                   for code, c in last.most_common(args.top)]
    lines = [*table, "", f"{label}, the {args.top} largest:", "", "| module | instructions a request |",
             "|---|---:|", *by_module, "", "| function | instructions a request |", "|---|---:|", *by_function]
    print("\n".join(lines))
    if args.write:
        note = f"{args.n} requests counted per variant, 16 at a time, after a warm-up of {args.n // 5}."
        write_section(SECTION, [stamp(), "", __doc__.replace("\n", " ").strip(), note, "", *lines])
        print(f"wrote the '{SECTION}' section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
