"""Continuous batching for the local engine: one thread steps every running sequence through shared forwards."""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from backends.generation import DecodeResult, OnText, SamplingParams, SequenceDecoder
from protocol.errors import EngineOverloaded

__all__ = ["Group", "Job", "KVBatch", "Scheduler", "StepModel"]

# EWMA weight of the newest step's rate / the newest queue wait
_ALPHA = 0.2
# newcomers prefill together while padding stays under this share of the padded batch's positions
_MAX_PAD_SHARE = 0.5


@dataclass(slots=True)
class Job:
    """One sequence to generate: a choice of a request (n > 1 and prompt lists make several)."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams
    echo: str
    grammar: Any = None  # a compiled grammar (backends/constrained.py): each sequence gets its own matcher
    grammar_prefix: str = ""  # text the grammar has already seen (continue_final_message's assistant prefix)


class StepModel(Protocol):
    """What the scheduler needs from a loaded model; every method runs in the scheduler's thread."""

    batchable: bool  # False: the model's cache cannot be left-padded (sliding windows), one sequence at a time

    def prefill(self, prompts: list[list[int]]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Prompts together, left-padded -> (their DynamicCache, mask [k, T], last positions' logits [k, vocab])."""

    def decode(self, cache: Any, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per row: tokens [B], mask [B, L+1], positions [B] -> logits [B, vocab]."""

    def decoder(self, job: Job, on_text: OnText | None) -> SequenceDecoder: ...


class KVBatch:
    """The running sequences' KV caches as one left-padded DynamicCache.

    Row i holds sequence i's keys/values right-aligned; `mask` [B, L] is 1 on real positions and 0 on padding
    (zeros, so masked attention weights of exactly 0 never meet a NaN); `positions` [B] is each row's next
    position id, its own token count, whatever the padding. Joining pads the shorter side on the left; leaving
    drops rows and then the columns that only padding still uses.
    """

    __slots__ = ("cache", "mask", "positions")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Back to no rows; the cache's memory goes with it."""
        self.cache: Any = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.positions = torch.zeros(0, dtype=torch.long)

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    def add(self, cache: Any, mask: torch.Tensor) -> None:
        """Append the rows of `cache`, left-padded as `mask` [k, T] says, padding the shorter side to the other."""
        if self.cache is None:  # an empty batch adopts the newcomers' cache as it is: no copy
            self.cache, self.mask, self.positions = cache, mask, mask.sum(1)
            return
        width = max(self.length, int(mask.shape[1]))
        grow, pad = width - self.length, width - int(mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, grow), _pad_left(theirs.keys, pad)])
            mine.values = torch.cat([_pad_left(mine.values, grow), _pad_left(theirs.values, pad)])
        self.mask = torch.cat([F.pad(self.mask, (grow, 0)), F.pad(mask, (pad, 0))])
        self.positions = torch.cat([self.positions, mask.sum(1)])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order); trims the left columns that no remaining row uses."""
        if len(rows) == self.rows:
            return
        if not rows:
            self.clear()
            return
        index = torch.tensor(rows, dtype=torch.long)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(0).to(torch.int8).argmax())  # the first column some row still uses
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, index)

    def step(self, model: StepModel, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row -> logits [B, vocab]; the cache, mask and positions advance by one."""
        self.mask = torch.cat([self.mask, torch.ones(self.rows, 1, dtype=torch.long)], dim=1)
        logits = model.decode(self.cache, torch.tensor(tokens, dtype=torch.long), self.mask, self.positions)
        self.positions = self.positions + 1
        return logits


def _pad_left(tensor: torch.Tensor, pad: int) -> torch.Tensor:
    # [B, heads, T, head_dim]: zeros before the T axis
    return F.pad(tensor, (0, 0, pad, 0)) if pad else tensor


class Group:
    """One request's sequences and how the scheduler reports back.

    `on_event(kind, index, value)` gets ("start", i, echo), ("text", i, (text, logprobs)), ("end", i,
    finish_reason) from the scheduler thread; `on_done()` is called there once, after every sequence ended, was
    cancelled or failed (`error` then says why). `cancelled` is set from the event loop and read by the thread
    before each step.
    """

    __slots__ = ("cancelled", "error", "jobs", "left", "on_done", "on_event", "queued", "results", "submitted")

    def __init__(self, jobs: Sequence[Job], on_event: Callable[[str, int, Any], None] | None,
                 on_done: Callable[[], None]) -> None:
        self.jobs = list(jobs)
        self.on_event, self.on_done = on_event, on_done
        self.cancelled = False
        self.error: BaseException | None = None
        self.results: dict[int, DecodeResult] = {}
        self.left = len(self.jobs)  # sequences not yet ended
        self.queued = 0  # sequences still waiting for a place in the batch
        self.submitted = 0.0

    def event(self, kind: str, index: int, value: Any) -> None:
        if self.on_event is not None and not self.cancelled:
            self.on_event(kind, index, value)

    def ordered_results(self) -> list[DecodeResult]:
        return [self.results.get(job.index, DecodeResult("", "cancelled", 0)) for job in self.jobs]


@dataclass(eq=False, slots=True)
class _Seq:
    job: Job
    group: Group
    decoder: SequenceDecoder | None = None


class Scheduler:
    """Continuous batching over one model: sequences join and leave the running batch at step boundaries.

    Each step (in one thread): admit waiting sequences while the batch has room (prefill them, sample their
    first tokens, pad their caches into the batch), drop cancelled rows, then one batched decode forward for all
    running rows, each sampled with its own parameters; finished rows leave at once. At most `max_concurrency`
    sequences run; up to `max_queue` requests wait beyond that, and the next one gets EngineOverloaded (429).
    Counters (`running`, `waiting`) change under the lock and are read without it from the event loop.
    """

    def __init__(self, model: StepModel, max_concurrency: int, max_queue: int, name: str = "engine") -> None:
        self.model = model
        self.max_concurrency = max_concurrency if model.batchable else 1
        self.max_queue = max_queue
        self.running = 0  # sequences in the batch, including those being prefilled
        self.waiting = 0  # requests with a sequence still queued
        self.tokens_per_s: float | None = None  # EWMA of tokens produced per second of step time
        self.queue_wait_s: float | None = None  # EWMA of the time from submit to admission
        self.steps = 0  # batched decode forwards so far
        self._queue: deque[_Seq] = deque()
        self._rows: list[_Seq] = []  # the batch, row by row (only the thread touches it)
        self._batch = KVBatch()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"{name}-batch", daemon=True)
        self._thread.start()

    # ---- event-loop side

    def check(self, sequences: int) -> None:
        """Raise EngineOverloaded if a request of `sequences` would be refused now (before tokenizing it): it
        neither fits the free slots nor finds a place in the queue. An idle engine takes any request, even one
        with more choices than max_concurrency (they run as slots free up)."""
        with self._cond:  # the queue is read through: the thread must not admit meanwhile
            queued = len(self._queue)
            if self.running + queued + sequences <= self.max_concurrency or (self.running == 0 and not queued):
                return
            held = self._held_back()
            if held >= self.max_queue:
                raise self._overloaded(held)

    def _held_back(self) -> int:
        """The requests waiting for a place: those with a sequence queued beyond the free slots (the queue is
        admitted in order). One submitted a moment ago that fits a free slot waits only for the thread, not for
        a place, and does not count against max_queue."""
        free = max(0, self.max_concurrency - self.running)
        return len({id(seq.group) for seq in itertools.islice(self._queue, free, None)})

    def submit(self, group: Group) -> None:
        """Queue a request's sequences; EngineOverloaded when the batch is full and so is the queue."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self.check(len(group.jobs))
            group.submitted = time.perf_counter()
            group.queued = len(group.jobs)
            self._queue.extend(_Seq(job, group) for job in group.jobs)
            self.waiting += 1
            self._cond.notify()

    def cancel(self, group: Group) -> None:
        """The client left: its queued sequences go now, its running ones before the next decode step."""
        if group.cancelled:
            return
        group.cancelled = True
        with self._cond:
            if group.queued:
                self._queue = deque(s for s in self._queue if s.group is not group)
                group.queued = 0
                self.waiting -= 1
            self._cond.notify()

    def close(self) -> None:
        """Stop the thread; every request still queued or running ends as cancelled. Blocks until it stopped."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _overloaded(self, waiting: int) -> EngineOverloaded:
        wait = self.queue_wait_s or 1.0
        return EngineOverloaded(
            f"The local model is at capacity: {self.running} sequences running (max_concurrency "
            f"{self.max_concurrency}) and {waiting} requests queued (max_queue {self.max_queue}). "
            "Retry later.",
            retry_after_s=wait,
        )

    # ---- the thread

    def _run(self) -> None:
        with torch.inference_mode():
            while (admitted := self._admit()) is not None:
                try:
                    self._step(admitted)
                except Exception as exc:  # a model failure ends what runs now; the engine goes on
                    self._fail([*admitted, *self._rows], exc)
        with self._cond:
            left, self._queue = [*self._queue, *self._rows], deque()
            self.waiting = 0
        for seq in left:
            self._end(seq, cancelled=True)
        self._rows = []
        self._batch.clear()
        self._set_running(0)

    def _admit(self) -> list[_Seq] | None:
        """Blocks while idle; returns the sequences to admit now (maybe none), or None once closed."""
        with self._cond:
            while not self._closed and not self._queue and not self._rows:
                self._cond.wait()
            if self._closed:
                return None
            admitted: list[_Seq] = []
            now = time.perf_counter()
            while self._queue and len(self._rows) + len(admitted) < self.max_concurrency:
                seq = self._queue.popleft()
                seq.group.queued -= 1
                if seq.group.queued == 0:
                    self.waiting -= 1
                self.queue_wait_s = _ewma(self.queue_wait_s, now - seq.group.submitted)
                admitted.append(seq)
            self.running = len(self._rows) + len(admitted)
            return admitted

    def _step(self, admitted: list[_Seq]) -> None:
        started = time.perf_counter()
        produced = 0
        newcomers = []
        for seq in admitted:
            if seq.group.cancelled:
                self._end(seq, cancelled=True)
                continue
            if seq.group.error is not None:  # a sibling's decoder failed just now
                continue
            seq.group.event("start", seq.job.index, seq.job.echo)
            on_text = ((lambda text, logprobs, s=seq: s.group.event("text", s.job.index, (text, logprobs)))
                       if seq.group.on_event else None)
            try:
                seq.decoder = self.model.decoder(seq.job, on_text)
            except Exception as exc:  # this request's own (its grammar): it alone fails
                seq.group.error = exc
                continue
            newcomers.append(seq)
        self._abort({id(s.group): s.group for s in admitted if s.group.error is not None})
        newcomers = [seq for seq in newcomers if seq.group.error is None]
        for part in _prefill_parts(newcomers):
            part = [seq for seq in part if seq.group.error is None]  # a sibling in an earlier part may have failed
            if not part:  # (its group is over: a row of it would never be sampled, and feed -1 to the next step)
                continue
            cache, mask, logits = self._prefill(part)
            produced += len(part)
            self._rows.extend(part)
            self._batch.add(cache, mask)
            # each newcomer's first token comes from its prefill; those already done leave at once
            self._advance(part, logits)
        self._leave([i for i, seq in enumerate(self._rows) if seq.group.cancelled], cancelled=True)
        if self._rows:
            logits = self._batch.step(self.model, [seq.decoder.token for seq in self._rows])  # type: ignore[union-attr]
            self.steps += 1
            produced += len(self._rows)
            self._advance(list(self._rows), logits)
        elapsed = time.perf_counter() - started
        if produced and elapsed > 0:
            self.tokens_per_s = _ewma(self.tokens_per_s, produced / elapsed)

    def _prefill(self, part: list[_Seq]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """One forward for the part's prompts -> (cache, mask, logits), a row per sequence; a prompt that several
        sequences share (a request's n choices) is computed once and its row copied."""
        unique: dict[tuple[int, ...], int] = {}
        rows = [unique.setdefault(tuple(seq.job.prompt_ids), len(unique)) for seq in part]
        cache, mask, logits = self.model.prefill([list(prompt) for prompt in unique])
        if len(unique) == len(part):
            return cache, mask, logits
        index = torch.tensor(rows, dtype=torch.long)
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))
            layer.values = layer.values.index_select(0, index.to(layer.values.device))
        return cache, mask.index_select(0, index), logits.index_select(0, index.to(logits.device))

    def _advance(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Feed each of `seqs` (rows of the batch) its row of `logits`; those finished leave. A failure inside
        one sequence's own decoding (sampling, stop strings, its grammar, its callback) ends its request alone:
        the request's other rows leave with it, and every other request goes on."""
        done: set[_Seq] = set()
        for seq, row in zip(seqs, logits, strict=True):
            if seq.group.error is not None:
                continue
            try:
                if not seq.decoder.push(row):  # type: ignore[union-attr]
                    done.add(seq)
            except Exception as exc:
                seq.group.error = exc
        self._leave([i for i, seq in enumerate(self._rows) if seq in done])
        self._abort({id(s.group): s.group for s in seqs if s.group.error is not None})

    def _leave(self, rows: list[int], cancelled: bool = False) -> None:
        if not rows:
            self._set_running(len(self._rows))
            return
        gone, leaving = [self._rows[i] for i in rows], set(rows)
        keep = [i for i in range(len(self._rows)) if i not in leaving]
        self._batch.keep(keep)
        self._rows = [self._rows[i] for i in keep]
        self._set_running(len(self._rows))  # before the callbacks: a client told "done" sees its slot free
        for seq in gone:
            if seq.group.error is None:  # a failed request ends once, in _abort
                self._end(seq, cancelled=cancelled)

    def _set_running(self, running: int) -> None:
        with self._cond:
            self.running = running

    def _end(self, seq: _Seq, cancelled: bool = False) -> None:
        group = seq.group
        if seq.decoder is None:
            result = DecodeResult("", "cancelled", 0)
        else:
            if cancelled:
                seq.decoder.cancel()
            result = seq.decoder.result()
        group.results[seq.job.index] = result
        if result.finish_reason != "cancelled":
            group.event("end", seq.job.index, result.finish_reason)
        group.left -= 1
        if group.left == 0:
            group.on_done()

    def _fail(self, seqs: list[_Seq], exc: Exception) -> None:
        """A shared forward failed: every request in it ends with the error."""
        groups = {id(s.group): s.group for s in seqs if s.group.left > 0}
        self._rows = []
        self._batch.clear()
        self._set_running(0)
        for group in groups.values():
            group.error = group.error or exc
        self._abort(groups)

    def _abort(self, groups: dict[int, Group]) -> None:
        """End failed requests (their `error` set): the rest of each, in the batch or queued, does not run."""
        groups = {key: group for key, group in groups.items() if group.left > 0}
        if not groups:
            return
        self._leave([i for i, seq in enumerate(self._rows) if id(seq.group) in groups])
        with self._cond:
            self._queue = deque(s for s in self._queue if id(s.group) not in groups)
            self.waiting -= sum(1 for g in groups.values() if g.queued)
        for group in groups.values():
            group.queued, group.left = 0, 0
            group.on_done()


def _prefill_parts(seqs: list[_Seq]) -> Iterator[list[_Seq]]:
    """Newcomers in prefill batches, by prompt length: one forward for many prompts, unless padding a short
    one to a long one would waste more than _MAX_PAD_SHARE of the work."""
    part: list[_Seq] = []
    real = 0
    for seq in sorted(seqs, key=lambda s: len(s.job.prompt_ids)):
        n = len(seq.job.prompt_ids)  # the longest so far: the padded width
        if part and (real + n) < (1 - _MAX_PAD_SHARE) * n * (len(part) + 1):
            yield part
            part, real = [], 0
        part.append(seq)
        real += n
    if part:
        yield part


def _ewma(old: float | None, sample: float) -> float:
    return sample if old is None else old + _ALPHA * (sample - old)
