"""Per-sequence decoding: sampling, grammar masks, logprobs, stop strings, incremental detokenization, and a
one-sequence decode loop."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = [
    "DecodeResult",
    "IncrementalDetokenizer",
    "OnText",
    "SampledLogprob",
    "SamplingParams",
    "SequenceDecoder",
    "StopChecker",
    "TokenConstraint",
    "decode",
    "draw",
    "sample_next",
]


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
    # stop strings apply only to text before this one, where a grammar takes hold (tool_choice auto's call
    # trigger): a stop string never cuts grammar-held output short (a grammar held from the first token: no stop)
    stop_until: str | None = None
    seed: int | None = None
    logprobs: int | None = None  # None: off; k: each sampled token's logprob and the k most likely (0-20)


@dataclass(frozen=True, slots=True)
class SampledLogprob:
    """A sampled token's log-probability and the `top` (token id, logprob) alternatives, most likely first.

    These are the model's own distribution (log-softmax of its logits), before temperature, penalties and
    grammar masks change what is sampled from: the figures OpenAI and vLLM (`raw_logprobs`) report."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


# gets each piece of released text with the logprobs of the tokens that made it (empty when not asked for)
OnText = Callable[[str, list[SampledLogprob]], None]


class TokenConstraint(Protocol):
    """A grammar holding one sequence's tokens (backends/constrained.py's Constraint)."""

    def mask(self, logits: torch.Tensor) -> None: ...

    def accept(self, token: int) -> None: ...

    @property
    def done(self) -> bool: ...


@dataclass(slots=True)
class DecodeResult:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    completion_tokens: int
    logprobs: list[SampledLogprob] | None = None  # when asked for: every sampled token but a final eos


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
    """Cuts the output before the first stop string; holds back text that may be a stop string's beginning.

    With `until`, stop strings apply only to the text before its first occurrence (where a grammar takes hold
    of the output); from there on all text passes."""

    def __init__(self, stops: Sequence[str], until: str | None = None) -> None:
        self._stops = [s for s in stops if s]
        self._until = until or None
        self._pending = ""  # text seen but not yet released
        self._tail = ""  # the end of the released text: `until` may have begun there

    def push(self, text: str, active: bool = True) -> tuple[str, bool]:
        """Returns (text safe to release, whether a stop string matched); `active` False: stop strings do not
        count yet (min_tokens), but `until` is still looked for."""
        if not self._stops:
            return text, False
        self._pending += text
        limit = len(self._pending) + 1  # stop strings may start before this index of the pending text
        if self._until is not None:
            at = (self._tail + self._pending).find(self._until)
            if at >= 0:
                limit = at - len(self._tail)
        hits = [i for i in (self._pending.find(s) for s in self._stops) if 0 <= i < limit] if active else []
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
            return out, True
        if limit <= len(self._pending) or not active:
            if limit <= len(self._pending):
                self._stops = []  # the grammar holds the rest: no stop string applies any more
            out, self._pending = self._pending, ""
        else:
            cut = len(self._pending) - self._held_back()
            out, self._pending = self._pending[:cut], self._pending[cut:]
        if self._until is not None:
            self._tail = (self._tail + out)[-len(self._until):]
        return out, False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out

    def _held_back(self) -> int:
        # the longest suffix of the pending text that is a proper prefix of some stop string (or of `until`)
        best = 0
        for stop in [*self._stops, self._until] if self._until else self._stops:
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
        penalised = torch.where(scores > 0, scores / penalty, scores * penalty)
        # a tiny or huge penalty must not push a finite score to +-inf (the softmax would then hold NaN);
        # a score already -inf (masked by a grammar or min_tokens) stays so
        big = torch.finfo(penalised.dtype).max
        logits.scatter_(0, seen, torch.where(scores.isinf(), scores, penalised.clamp(-big, big)))
    if params.temperature <= 0:
        return int(logits.argmax())
    # shifted so the largest logit is 0 before dividing (the softmax is the same): however small the
    # temperature, no logit overflows to +inf, and as it goes to 0 the draw goes to the argmax (greedy)
    logits = (logits - logits.max()) / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # drop a token when the tokens ranked above it already cover top_p (the first one always stays)
        drop = (sorted_probs.cumsum(0) - sorted_probs) > params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        return int(order[draw(sorted_probs, generator)])
    return draw(probs, generator)


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn with probability proportional to `weights` (non-negative, one row; a zero is never drawn),
    by inverse transform: the first index whose running total passes a uniform draw over the total. One random
    number, where torch.multinomial draws an exponential for every entry: ~0.1 against ~1.6 ms over SmolLM2's
    49k vocabulary, each token of each sampled sequence (bench/sampling.py)."""
    totals = weights.cumsum(0, dtype=torch.float64)  # float64: late small weights still move a 49k-term total
    total = totals[-1]
    if not total > 0:  # NaN too: as torch.multinomial, refuse rather than pick an arbitrary index
        raise RuntimeError(f"invalid distribution to sample from (weights sum to {float(total)})")
    # a uniform in [0, 1) times the total stays below it (round to nearest never reaches it), so a running total
    # passes it; the first to pass it has weight of its own (a zero weight repeats the total before it)
    point = torch.rand((), generator=generator, dtype=torch.float64, device=totals.device) * total
    return int(torch.searchsorted(totals, point, right=True))


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


class SequenceDecoder:
    """One sequence's decoding state: fed one row of logits per step, it samples, detokenizes and checks stops.

    It owns everything per sequence (sampling parameters, its torch.Generator, stop strings, detokenizer, its
    grammar constraint), so sequences decoded together in one batch stay independent. The eos token counts as
    a completion token (as vLLM counts it) but adds no text. Under a grammar the grammar decides when eos may
    come: `min_tokens` and `ignore_eos` give way to it.
    """

    __slots__ = ("_constraint", "_detok", "_eos", "_eos_ids", "_generator", "_logprobs", "_on_text", "_parts",
                 "_pending", "_produced", "_released", "_seen", "_stops", "count", "finish_reason", "params",
                 "token")

    def __init__(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        eos_ids: frozenset[int],
        detokenizer: IncrementalDetokenizer,
        on_text: OnText | None = None,
        device: torch.device | str = "cpu",
        constraint: TokenConstraint | None = None,
    ) -> None:
        device = torch.device(device)
        self.params = params
        self._generator = _make_generator(params, device)
        self._stops = StopChecker(params.stop, params.stop_until)
        self._detok = detokenizer
        self._on_text = on_text
        self._constraint = constraint
        self._eos_ids = eos_ids
        self._eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
        # only the repetition penalty reads the tokens seen so far
        self._seen = (
            torch.tensor(list(prompt_ids), dtype=torch.long, device=device)
            if params.repetition_penalty != 1.0 else None
        )
        self._parts: list[str] = []
        self._logprobs: list[SampledLogprob] | None = [] if params.logprobs is not None else None
        # logprobs of tokens whose text is not released yet, each with where its text ends in the output
        self._pending: list[tuple[SampledLogprob, int]] = []
        self._produced = 0  # characters of output text detokenized so far
        self._released = 0  # characters of output text released so far
        self.count = 0
        self.token = -1  # the last sampled token: the next step's input while the sequence goes on
        self.finish_reason: str | None = None  # set once finished: "stop" | "length" | "cancelled"

    def _release(self, text: str, final: bool = False, cut: bool = False) -> None:
        # logprobs go out with the piece that completes their token's text (a token whose end is still held back
        # as a possible stop string waits: the stop string may yet cut it); at the end, whatever is left goes
        # with the last piece, but cut by a stop string, only the tokens whose text lies wholly in the output
        if text or (final and self._pending):
            self._parts.append(text)
            self._released += len(text)
            whole = [p for p, end in self._pending if end <= self._released]
            pending = [p for p, _ in self._pending] if final and not cut else whole
            self._pending = [] if final else self._pending[len(whole):]
            if self._logprobs is not None:
                self._logprobs.extend(pending)
            if self._on_text is not None:
                self._on_text(text, pending)

    def push(self, logits: torch.Tensor) -> bool:
        """Samples the next token from `logits` [vocab] (modified in place); True while the sequence goes on."""
        params = self.params
        logits = logits.float()
        raw = torch.log_softmax(logits, dim=-1) if params.logprobs is not None else None
        if self._constraint is not None:
            self._constraint.mask(logits)
        elif self.count < params.min_tokens and self._eos.numel():
            logits[self._eos] = float("-inf")  # min_tokens: eos may not come yet
        token = sample_next(logits, params, self._generator, self._seen)
        if self._constraint is not None:
            self._constraint.accept(token)
        self.token = token
        self.count += 1
        if self._seen is not None:
            self._seen = torch.cat([self._seen, torch.tensor([token], device=self._seen.device)])
        if token in self._eos_ids and (not params.ignore_eos or self._constraint is not None):
            return self._end("stop")
        text = self._detok.push(token)
        self._produced += len(text)
        if raw is not None:
            self._pending.append((_logprob(raw, token, params.logprobs or 0), self._produced))
        # like vLLM, stop strings count only once min_tokens are out
        piece, matched = self._stops.push(text, active=self.count > params.min_tokens)
        self._release(piece, final=matched, cut=matched)
        if matched:
            self.finish_reason = "stop"
            return False
        if self.count >= params.max_new_tokens:
            return self._end("length")
        return True

    def _end(self, reason: str) -> bool:
        # the detokenizer's held-back tail (an unfinished character) and text held for a possible stop string
        text = self._detok.flush()
        self._produced += len(text)
        if text and self._pending:  # the held-back tail belongs to the last tokens
            self._pending[-1] = (self._pending[-1][0], self._produced)
        piece, matched = self._stops.push(text)
        self._release(piece if matched else piece + self._stops.flush(), final=True, cut=matched)
        self.finish_reason = "stop" if matched else reason
        return False

    def cancel(self) -> None:
        """Ends the sequence early (the client left, or the engine stops): nothing more is released."""
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    def result(self) -> DecodeResult:
        return DecodeResult("".join(self._parts), self.finish_reason or "cancelled", self.count, self._logprobs)


def _logprob(raw: torch.Tensor, token: int, top: int) -> SampledLogprob:
    if top <= 0:
        return SampledLogprob(token, float(raw[token]), ())
    values, ids = torch.topk(raw, top)
    return SampledLogprob(token, float(raw[token]), tuple(zip(ids.tolist(), values.tolist(), strict=True)))


def decode(
    forward: Callable[[torch.Tensor, Any], torch.Tensor],
    new_cache: Callable[[], Any],
    prompt_ids: Sequence[int],
    params: SamplingParams,
    eos_ids: frozenset[int],
    detokenizer: IncrementalDetokenizer,
    cancel: threading.Event,
    on_text: OnText | None = None,
    device: torch.device | str = "cpu",
    constraint: TokenConstraint | None = None,
) -> DecodeResult:
    """One sequence alone: prefill, then one forward per token over a KV cache, until it ends or `cancel` is set.

    `forward(input_ids[1, T], cache)` returns the last position's logits [vocab]. The batched engine
    (backends/batching.py) must give the same tokens as this loop: it is the reference the tests compare with.
    """
    device = torch.device(device)
    sequence = SequenceDecoder(prompt_ids, params, eos_ids, detokenizer, on_text, device, constraint)
    cache = new_cache()
    with torch.inference_mode():
        logits = forward(torch.tensor([list(prompt_ids)], dtype=torch.long, device=device), cache)
        while not cancel.is_set() and sequence.push(logits):
            logits = forward(torch.tensor([[sequence.token]], dtype=torch.long, device=device), cache)
        sequence.cancel()  # a no-op unless `cancel` ended the loop
    return sequence.result()
