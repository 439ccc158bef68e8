"""The policy chain's own cost: a chat request through Pipeline.complete in process, with a backend that answers at
once, without policies and with the rate limit, budget and exact cache (each request a cache miss), then with
metrics and tracing on too. No HTTP, no upstream: what is left is the gateway's own time per request."""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from report import stamp, write_section  # noqa: E402

from config.loader import parse_config  # noqa: E402
from gateway.app import create_app  # noqa: E402
from policies.context import Outcome, RequestContext  # noqa: E402
from protocol.openai import ChatCompletionRequest, decode_request  # noqa: E402

SECTION = "## Policy chain in process"
BODY = (b'{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":'
        b'{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,'
        b'"completion_tokens":1,"total_tokens":4}}')
BASE = """
models:
  - {id: m, backend: openai, base_url: "http://127.0.0.1:9/v1", pricing: {input_per_mtok: 1, output_per_mtok: 2}}
storage: {database_url: ""}
"""
CHAIN = """
policies:
  rate_limits: [{scope: key, rpm: 100000000, tpm: 100000000000}]
  budgets: [{scope: global, period: day, max_tokens: 100000000000}]
  cache: {mode: deterministic, ttl_s: 3600}
"""
METRICS = "metrics: {enabled: true}\n"
TRACING = "tracing: {enabled: true, exporter: none, sample_ratio: %s}\n"
VARIANTS = [
    ("no policies", BASE),
    ("rate limit + budget + exact cache (miss)", BASE + CHAIN),
    ("the chain + metrics", BASE + CHAIN + METRICS),
    ("the chain + metrics + traces, sample_ratio 0.1", BASE + CHAIN + METRICS + TRACING % 0.1),
    ("the chain + metrics + traces, sample_ratio 1.0", BASE + CHAIN + METRICS + TRACING % 1.0),
]


class _Answer:
    """A backend that answers at once."""

    async def complete(self, request, index=0, headers=None) -> bytes:  # noqa: ANN001
        return BODY

    async def aclose(self) -> None: ...


async def run(config_text: str, n: int) -> list[float]:
    app = create_app(parse_config(config_text), backends={"m": _Answer()})  # type: ignore[dict-item]
    pipeline = app.state.pipeline
    times = []
    gc.collect()
    for i in range(n + n // 10):
        raw = (b'{"model":"m","temperature":0,"max_tokens":5,"messages":[{"role":"user","content":"hello %d"}]}'
               % i)  # a new prompt each time: every request misses the cache and is stored
        t0 = time.perf_counter()
        ctx = RequestContext(decode_request(raw, ChatCompletionRequest), request_id=str(i))
        served = await pipeline.complete(ctx)
        await pipeline.settle(ctx, Outcome("ok", body=served.body))
        if i >= n // 10:  # the first tenth warms up
            times.append((time.perf_counter() - t0) * 1e6)
    tracing = pipeline.tracing
    if tracing is not None:
        tracing.shutdown()
    await app.state.storage.aclose()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of every variant, interleaved; each figure is its best round (this machine is "
                             "shared: a round that others' load slowed down is not the code's cost)")
    parser.add_argument("--write", action="store_true", help="write the figures into bench/RESULTS.md")
    args = parser.parse_args()
    best: dict[str, tuple[float, float, float]] = {}
    for round_ in range(args.rounds):
        for label, text in VARIANTS:
            times = asyncio.run(run(text, args.n))
            q = statistics.quantiles(times, n=100)
            figures = (statistics.median(times), statistics.fmean(times), q[98])
            held = best.get(label)
            best[label] = figures if held is None else tuple(map(min, held, figures))  # type: ignore[assignment]
            print(f"round {round_ + 1}  {label:55} p50 {figures[0]:7.1f} us  mean {figures[1]:7.1f} us  "
                  f"p99 {figures[2]:7.1f} us", flush=True)
    base = best[VARIANTS[0][0]][1]
    table = ["| pipeline.complete + settle, in process, instant backend | p50 us | mean us | p99 us | mean added |",
             "|---|---:|---:|---:|---:|",
             *(f"| {label} | {p50:.1f} | {mean:.1f} | {p99:.1f} | {mean - base:+.1f} |"
               for label, (p50, mean, p99) in best.items())]
    print("\n".join(table))
    if args.write:
        note = f"Each figure is the best of {args.rounds} interleaved rounds of {args.n} requests."
        write_section(SECTION, [stamp(), "", __doc__.replace("\n", " ").strip(), note, "", *table])
        print(f"wrote the '{SECTION}' section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
