"""A token-by-token decode loop over a KV cache: sampling, stop strings, incremental detokenization."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DecodeResult", "IncrementalDetokenizer", "SamplingParams", "StopChecker", "decode", "sample_next"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 -> greedy (argmax)
    top_p: float = 1.0
    top_k: int = 0  # <= 0 -> off
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(slots=True)
class DecodeResult:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    completion_tokens: int


class IncrementalDetokenizer:
    """Emits only each token's new text, decoding a short window so multi-token characters come out whole.

    Two offsets (as in TGI/vLLM): the text of ids[prefix:read] was already emitted; ids[prefix:] decodes to it
    plus the new suffix. While the tail is an incomplete UTF-8 sequence ("\\ufffd") nothing is emitted.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        done = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done) :]


class StopChecker:
    """Cuts the output before the first stop string; holds back text that may be a stop string's beginning."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""  # text seen but not yet released

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to release, whether a stop string matched)."""
        if not self._stops:
            return text, False
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
            return out, True
        hold = self._held_back()
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out

    def _held_back(self) -> int:
        # the longest suffix of the pending text that is a proper prefix of some stop string
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:k]):
                    best = k
                    break
        return best


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None, seen: torch.Tensor | None
) -> int:
    """Picks the next token id from one row of logits (float32, modified in place)."""
    if params.repetition_penalty != 1.0 and seen is not None and seen.numel():
        # HF/vLLM style: positive logits shrink, negative grow, for every token already in prompt or output
        scores = logits.gather(0, seen)
        penalty = params.repetition_penalty
        scores = torch.where(scores > 0, scores / penalty, scores * penalty)
        logits.scatter_(0, seen, scores)
    if params.temperature <= 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # drop a token when the tokens ranked above it already cover top_p (the first one always stays)
        drop = (sorted_probs.cumsum(0) - sorted_probs) > params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def _make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    # a per-request generator: the same seed replays the same tokens, whatever else runs in the process
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def decode(
    forward: Callable[[torch.Tensor, Any], torch.Tensor],
    new_cache: Callable[[], Any],
    prompt_ids: Sequence[int],
    params: SamplingParams,
    eos_ids: frozenset[int],
    detokenizer: IncrementalDetokenizer,
    cancel: threading.Event,
    on_text: Callable[[str], None] | None = None,
    device: torch.device | str = "cpu",
) -> DecodeResult:
    """Runs prefill then one forward per token over a KV cache, until eos, a stop string, the limit or cancel.

    `forward(input_ids[1, T], cache)` returns the last position's logits [vocab]. The eos token counts as a
    completion token (as vLLM counts it) but adds no text. `cancel` is checked before every step.
    """
    device = torch.device(device)
    generator = _make_generator(params, device)
    stops = StopChecker(params.stop)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    seen = torch.tensor(list(prompt_ids), dtype=torch.long, device=device)
    track_seen = params.repetition_penalty != 1.0
    parts: list[str] = []

    def release(text: str) -> None:
        if text:
            parts.append(text)
            if on_text is not None:
                on_text(text)

    cache = new_cache()
    count, finish, stopped = 0, "length", False
    with torch.inference_mode():
        logits = forward(torch.tensor([list(prompt_ids)], dtype=torch.long, device=device), cache)
        while True:
            if cancel.is_set():
                finish = "cancelled"
                break
            logits = logits.float()
            if count < params.min_tokens and eos.numel():
                logits[eos] = float("-inf")  # min_tokens: eos may not come yet
            token = sample_next(logits, params, generator, seen if track_seen else None)
            count += 1
            if track_seen:
                seen = torch.cat([seen, torch.tensor([token], device=device)])
            if token in eos_ids and not params.ignore_eos:
                finish = "stop"
                break
            piece = detokenizer.push(token)
            if count <= params.min_tokens:
                release(piece)  # like vLLM, stop strings count only once min_tokens are out
                matched = False
            else:
                piece, matched = stops.push(piece)
                release(piece)
            if matched:
                finish, stopped = "stop", True
                break
            if count >= params.max_new_tokens:
                break
            logits = forward(torch.tensor([[token]], dtype=torch.long, device=device), cache)
    if not stopped:
        # the detokenizer's held-back tail (an unfinished character) and text held for a possible stop string
        piece, matched = stops.push(detokenizer.flush())
        release(piece if matched else piece + stops.flush())
        if matched and finish != "cancelled":
            finish = "stop"
    return DecodeResult("".join(parts), finish, count)
