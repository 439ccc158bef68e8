"""Prompt task classifier for `auto` routing: a linear model over word and char n-grams, run in numpy."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from itertools import repeat
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from protocol.openai import ChatCompletionRequest, CompletionRequest, Message, message_text

__all__ = ["DEFAULT_ARTIFACT", "LABELS", "PromptAnalysis", "TaskClassifier", "clip_text", "edge_text",
           "estimate_tokens", "prompt_text", "request_text"]

LABELS = ("code", "reasoning", "creative", "summarization", "translation", "extraction", "qa", "chat")
DEFAULT_ARTIFACT = Path(__file__).resolve().parent / "data" / "task_classifier.npz"

# The model only ever sees the head and tail of a prompt: instructions sit at one end of pasted material,
# and the cap bounds the per-call work (n-gram extraction is the cost) whatever the prompt length.
HEAD_CHARS = 600
TAIL_CHARS = 900
EDGE_CHARS = 200  # the outermost chars also get a word block of their own, so instructions aren't diluted
TOKEN_PATTERN = r"(?u)\w+|[^\w\s]"  # words and single punctuation marks (code and "?" carry signal)


def clip_text(text: str, head: int = HEAD_CHARS, tail: int = TAIL_CHARS) -> str:
    """Lowercased head + tail of `text`; the sklearn pipeline uses this as its preprocessor too."""
    if len(text) > head + tail:
        text = text[:head] + "\n" + text[-tail:]
    return text.lower()


def edge_text(text: str, edge: int = EDGE_CHARS) -> str:
    """Lowercased first and last `edge` chars: normalised apart, a short instruction keeps its weight
    next to a long pasted document."""
    if len(text) > 2 * edge:
        text = text[:edge] + "\n" + text[-edge:]
    return text.lower()


class PromptAnalysis(msgspec.Struct, frozen=True):
    """What the router needs to know about a prompt."""

    task: str  # one of LABELS
    confidence: float  # softmax probability of `task`
    scores: dict[str, float]  # softmax probability per label
    complexity: float  # heuristic difficulty in [0, 1]
    tokens: int  # cheap token-count estimate, see estimate_tokens()


def estimate_tokens(chars: int, words: int) -> int:
    """Token estimate: mean of chars/4 (BPE on English prose) and words*4/3 (~0.75 words per token).

    Prose agrees on both; code and URLs have few spaces (chars/4 wins), short-word text has many words.
    """
    if chars == 0:
        return 0
    return max(1, round((chars / 4 + words * 4 / 3) / 2))


# ---------------------------------------------------------------- complexity heuristic
# Matched against the word unigrams/bigrams the model already computed, so the heuristic costs ~nothing.
_MARKERS = frozenset(
    "prove proof derive optimize optimise optimization algorithm algorithms complexity architecture design "
    "tradeoff tradeoffs concurrency concurrent distributed scalable scalability refactor debug analyze analyse "
    "compare evaluate justify implement implementation integral derivative theorem equation equations "
    "invariant recursion recursive performance security migrate migration benchmark asymptotic".split()
) | {"step by", "edge case", "edge cases", "trade off", "thread safe", "race condition", "big o"}
_CONSTRAINTS = frozenset(
    "must should without exactly only ensure avoid include format constraint constraints requirement "
    "requirements never always limit don".split()
) | {"at least", "at most", "no more", "do not", "make sure", "less than", "fewer than"}
_BULLET = re.compile(r"^[ \t]*(?:[-*•]|\d+[.)])[ \t]", re.MULTILINE)
_SYMBOLS = tuple("{}()[];=<>")
_TASK_PRIOR = {"reasoning": 0.7, "code": 0.6, "extraction": 0.35, "summarization": 0.3, "creative": 0.3,
               "translation": 0.2, "qa": 0.2, "chat": 0.0}


def _complexity(sample: str, grams: list[str], tokens: int, task: str) -> float:
    """Weighted blend in [0, 1] of length, reasoning/code markers, constraints (words and list items),
    questions, code-symbol density and a per-task prior."""
    length = min(1.0, math.log1p(tokens) / math.log1p(8000))
    markers = min(1.0, sum(map(_MARKERS.__contains__, grams)) / 4)
    constraints = min(1.0, (sum(map(_CONSTRAINTS.__contains__, grams)) + len(_BULLET.findall(sample))) / 6)
    questions = min(1.0, sample.count("?") / 3)
    code = min(1.0, 12 * sum(map(sample.count, _SYMBOLS)) / len(sample)) if sample else 0.0
    score = (0.35 * length + 0.25 * markers + 0.15 * constraints + 0.05 * questions + 0.1 * code
             + 0.1 * _TASK_PRIOR.get(task, 0.2))
    return round(min(1.0, max(0.0, score)), 4)


# ---------------------------------------------------------------- OpenAI messages -> text
SYSTEM_CHARS = 100  # start of the system message: enough to catch "Translate the user's text into German"
PREVIOUS_CHARS = 150  # start of each earlier user turn (two at most): follow-ups like "now in French"
CONTEXT_MAX_LAST = 1200  # a last message this long stands alone, so the clip window stays on it


def _cut(text: str, limit: int) -> str:
    """At most `limit` chars of `text`, cut at a word boundary; fragments under 12 chars are dropped."""
    if len(text) > limit:
        text = text[:limit].rsplit(None, 1)[0] if limit > 0 else ""
    return text if len(text) >= 12 else ""


def prompt_text(messages: Sequence[Message]) -> str:
    """Text to classify for a chat request: the last user message, after a little context.

    Context is the start of the system (or developer) message and of up to two earlier user turns, each
    capped and never longer than the last user message itself, so the user's own words always weigh
    most; assistant and tool turns, images and audio are ignored.
    """
    users = [m for m in messages if m.role == "user"]
    if not users:  # no user turn (legal, if odd): classify whatever came last
        return message_text(messages[-1].content).strip() if messages else ""
    last = message_text(users[-1].content).strip()
    if len(last) >= CONTEXT_MAX_LAST:
        return last
    context = []
    system = next((m for m in messages if m.role in ("system", "developer")), None)
    if system is not None:
        context.append(_cut(message_text(system.content).strip(), min(SYSTEM_CHARS, len(last))))
    for m in users[-3:-1]:
        context.append(_cut(message_text(m.content).strip(), min(PREVIOUS_CHARS, len(last))))
    return "\n\n".join([*(c for c in context if c), last])


def request_text(body: ChatCompletionRequest | CompletionRequest) -> str:
    """Text to classify for any request: prompt_text for chat, the prompt string(s) for a text completion."""
    if isinstance(body, ChatCompletionRequest):
        return prompt_text(body.messages)
    prompt = body.prompt
    return prompt if isinstance(prompt, str) else " ".join(p for p in prompt if isinstance(p, str))


# ---------------------------------------------------------------- the model
# char_wb n-grams are looked up without building Python strings: the sample is laid out as
# " w1  w2  w3 " (each word padded by one space, as char_wb does), every n-gram gets a 64-bit rolling hash
# over splitmix-scrambled codepoints, and hashes are matched in a cuckoo table built from the vocabulary.
# Windows that straddle two words contain "  ", which no vocabulary term does, so they miss.
_U64 = np.uint64
_BASE = _U64(0x9E3779B97F4A7C15)


def _scramble(cp: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: keeps the polynomial hash free of structured collisions between n-grams."""
    z = cp + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.uint64)


def _ngram_hashes(text: str, n_min: int, n_max: int) -> np.ndarray:
    """Hashes of every n-gram of `text` for n in [n_min, n_max] (uint64 arithmetic wraps by design)."""
    z = _scramble(_codepoints(text))
    h, out = z, []
    for n in range(2, n_max + 1):
        h = h[:-1] * _BASE + z[n - 1:]
        if n >= n_min:
            out.append(h)
    return np.concatenate(out) if out else h[:0]


def _term_hashes(terms: list[str]) -> np.ndarray:
    """The same hash for whole vocabulary terms, vectorised per term length."""
    out = np.zeros(len(terms), dtype=np.uint64)
    by_len: dict[int, list[int]] = {}
    for i, t in enumerate(terms):
        by_len.setdefault(len(t), []).append(i)
    for n, idx in by_len.items():
        z = _scramble(_codepoints("".join(terms[i] for i in idx))).reshape(len(idx), n)
        h = z[:, 0]
        for k in range(1, n):
            h = h * _BASE + z[:, k]
        out[idx] = h
    return out


class _HashTable:
    """Cuckoo hash table over uint64 keys: every lookup is two vectorised gathers, no probe loop."""

    _MIX = (_U64(0xD6E8FEB86659FD93), _U64(0xA0761D6478BD642F))

    def __init__(self, keys: np.ndarray) -> None:
        if len(np.unique(keys)) != len(keys) or (keys == 0).any():
            raise ValueError("vocabulary hash collision")
        bits = max(12, (2 * len(keys)).bit_length())  # each of the two tables >= 2x keys: insertion settles fast
        size = 1 << bits
        self._shift = _U64(64 - bits)
        self._keys = [np.zeros(size, dtype=np.uint64), np.zeros(size, dtype=np.uint64)]  # 0 = empty
        self._ids = [np.full(size, -1, dtype=np.int32), np.full(size, -1, dtype=np.int32)]
        pending = np.arange(len(keys))
        for t in (0, 1):  # bulk pass: each key takes its slot in table t unless another key got there first
            slots = self._slots(keys[pending], t)
            _, first = np.unique(slots, return_index=True)
            free = first[self._keys[t][slots[first]] == 0]
            self._keys[t][slots[free]], self._ids[t][slots[free]] = keys[pending[free]], pending[free]
            pending = np.setdiff1d(pending, pending[free], assume_unique=True)
        for i in pending.tolist():  # the few left: classic cuckoo eviction
            self._insert(int(keys[i]), i)

    def _slots(self, h: np.ndarray, t: int) -> np.ndarray:
        return (h * self._MIX[t]) >> self._shift

    def _insert(self, key: int, idx: int) -> None:
        t = 0
        for _ in range(1000):
            slot = int(self._slots(np.array([key], dtype=np.uint64), t)[0])
            old_key, old_idx = int(self._keys[t][slot]), int(self._ids[t][slot])
            self._keys[t][slot], self._ids[t][slot] = key, idx
            if old_key == 0:
                return
            key, idx, t = old_key, old_idx, 1 - t
        raise ValueError("cuckoo insertion failed")

    def lookup(self, h: np.ndarray) -> np.ndarray:
        """Vocabulary index of each hash, -1 where absent."""
        s0, s1 = self._slots(h, 0), self._slots(h, 1)
        miss = np.where(self._keys[1][s1] == h, self._ids[1][s1], -1)
        return np.where(self._keys[0][s0] == h, self._ids[0][s0], miss)


def _split_vocab(arr: np.ndarray) -> list[str]:
    # Terms never contain "\n": tokens and char_wb n-grams are whitespace-free (bigrams join with " ").
    return arr.tobytes().decode("utf-8").split("\n") if arr.size else []


class TaskClassifier:
    """Multinomial logistic regression over three tf-idf blocks (word 1-2 grams and char_wb n-grams of the
    clipped prompt, word 1-2 grams of its edges), as exported by training/train_classifier.py; predictions match
    the scikit-learn pipeline it was trained as."""

    def __init__(self, meta: dict[str, Any], word_terms: list[str], char_terms: list[str], edge_terms: list[str],
                 idf: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> None:
        self.labels: tuple[str, ...] = tuple(meta["labels"])
        self.head: int = meta["head_chars"]
        self.tail: int = meta["tail_chars"]
        self._token = re.compile(meta["token_pattern"])
        self._word_n: int = meta["word_ngram"][1]
        self._char_min, self._char_max = meta["char_ngram"]
        if not 2 <= self._char_min <= 3:  # padded words have >= 3 chars: char_wb then emits exactly all n-grams
            raise ValueError("char n-gram minimum must be 2 or 3")
        self._word_vocab = {t: i for i, t in enumerate(word_terms)}
        self._char_table = _HashTable(_term_hashes(char_terms))
        self._char_offset = len(word_terms)
        self.edge: int = meta["edge_chars"]
        self._edge_vocab = {t: i for i, t in enumerate(edge_terms)}
        self._edge_offset = len(word_terms) + len(char_terms)
        self._idf = idf.astype(np.float64)
        self._coef = coef  # (n_word + n_char + n_edge, n_labels): rows are gathered per prompt
        self._intercept = intercept.astype(np.float64)

    @classmethod
    def load(cls, path: str | Path | None = None) -> TaskClassifier:
        """Load an exported artifact; by default the one shipped in routing/data."""
        with np.load(Path(path) if path is not None else DEFAULT_ARTIFACT, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode("utf-8"))
            return cls(meta, _split_vocab(z["word_vocab"]), _split_vocab(z["char_vocab"]),
                       _split_vocab(z["edge_vocab"]), z["idf"], z["coef"].astype(np.float64), z["intercept"])

    def _tfidf(self, ids: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
        """Feature indices and l2-normalised sublinear tf-idf values of one vectorizer block."""
        ids = ids[ids >= 0]
        if ids.size == 0:
            return ids.astype(np.int64), np.empty(0)
        idx, tf = np.unique(ids, return_counts=True)
        idx = idx.astype(np.int64) + offset
        w = (1.0 + np.log(tf)) * self._idf[idx]
        return idx, w / math.sqrt(float(w @ w))

    def _word_grams(self, text: str) -> list[str]:
        toks = self._token.findall(text)
        grams = list(toks)
        for n in range(2, self._word_n + 1):
            grams += map(" ".join, zip(*(toks[k:] for k in range(n)), strict=False))
        return grams

    def _ids(self, grams: list[str], vocab: dict[str, int]) -> np.ndarray:
        return np.fromiter(map(vocab.get, grams, repeat(-1)), dtype=np.int32, count=len(grams))

    def _scores(self, text: str, sample: str) -> tuple[np.ndarray, list[str], int]:
        """Decision scores for a prompt and its clipped sample, plus the sample's word n-grams and
        whitespace word count."""
        grams = self._word_grams(sample)
        short = len(text) <= min(2 * self.edge, self.head + self.tail)  # then both views are text.lower()
        edges = grams if short else self._word_grams(edge_text(text, self.edge))
        words = sample.split()
        laid_out = " " + "  ".join(words) + " "
        char_ids = self._char_table.lookup(_ngram_hashes(laid_out, self._char_min, self._char_max))
        blocks = (self._tfidf(self._ids(grams, self._word_vocab), 0),
                  self._tfidf(char_ids, self._char_offset),
                  self._tfidf(self._ids(edges, self._edge_vocab), self._edge_offset))
        idx, val = np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])
        return val @ self._coef[idx] + self._intercept, grams, len(words)

    def decision(self, text: str) -> np.ndarray:
        """Raw per-label scores, equal to the sklearn pipeline's decision_function."""
        return self._scores(text, clip_text(text, self.head, self.tail))[0]

    def classify(self, text: str) -> PromptAnalysis:
        """Task label, per-label probabilities, complexity and token estimate for one prompt."""
        sample = clip_text(text, self.head, self.tail)
        raw, grams, words = self._scores(text, sample)
        p = np.exp(raw - raw.max())
        p /= p.sum()
        best = int(p.argmax())
        task = self.labels[best]
        # Word count is exact up to the clip; past it, extrapolate the sample's word density (bounded work).
        if len(text) > len(sample) and sample:
            words = round(words * len(text) / len(sample))
        tokens = estimate_tokens(len(text), words)
        return PromptAnalysis(
            task=task,
            confidence=float(p[best]),
            scores=dict(zip(self.labels, p.tolist(), strict=True)),
            complexity=_complexity(sample, grams, tokens, task),
            tokens=tokens,
        )
