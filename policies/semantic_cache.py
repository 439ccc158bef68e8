"""The semantic cache: a request close in meaning to one already answered gets the stored answer back."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import msgspec
import numpy as np

from config.schema import CacheConfig
from policies.base import STAGES, no_op
from policies.cache import (
    _UNKEYED,
    ExactCache,
    _cache_control,
    _entry,
    _ttl_override,
    answer_from,
    storable,
    tenant_of,
    usable,
)
from policies.context import Outcome, Reply, RequestContext
from policies.state import StateStore, StoreUnavailable
from protocol.openai import ChatCompletionRequest, message_text

__all__ = ["MAX_ENTRIES", "SemanticCache", "SemanticLookup", "bucket_of", "conversation_text"]

log = logging.getLogger("pointsman.policies.semantic_cache")

MAX_ENTRIES = 10_000  # per bucket: the index keeps the newest, the oldest are dropped
MAX_BUCKETS = 64  # buckets mirrored in memory per replica (least recently used dropped; ~15 MiB when full)
_ID_BYTES = 16
_encode = msgspec.json.encode


@dataclass(frozen=True, slots=True)
class SemanticLookup:
    """What `admit` leaves in `ctx.state["semantic_cache"]` for `settle`."""

    bucket: str
    vector: np.ndarray
    model: str
    store: bool
    ttl_s: float


def bucket_of(raw: dict[str, Any], model: str, endpoint: str, tenant: str) -> str:
    """sha256 of the tenant, the endpoint, the resolved model and every request field but the delivery and
    routing fields and the text `conversation_text` compares: every earlier message whole (a system prompt, the
    history, tool calls, names), and the last one but for its text (its images, its name). Only requests alike in
    all else share answers."""
    canonical = {k: v for k, v in raw.items() if k not in _UNKEYED and k != "prompt"}
    messages = canonical.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        last = messages[-1]
        content = last.get("content")
        kept = [part for part in content if part.get("type") != "text"] if isinstance(content, list) else None
        canonical["messages"] = [*messages[:-1], {**last, "content": kept}]
    canonical["model"] = model
    head = f"{tenant}\n{endpoint}\n".encode()
    return hashlib.sha256(head + _encode(canonical, order="sorted")).hexdigest()


def conversation_text(ctx: RequestContext) -> str | None:
    """What is compared by meaning: the last message's text (a user's question; everything before it must match
    exactly, see bucket_of), or a completion's one prompt. None when there is no such text to compare: a last
    message that is not a user's, a list of prompts, token ids."""
    body = ctx.request.body
    if isinstance(body, ChatCompletionRequest):
        last = body.messages[-1] if body.messages else None
        return message_text(last.content) or None if last is not None and last.role == "user" else None
    return body.prompt or None if isinstance(body.prompt, str) else None


class _Mirror:
    """One bucket's index in memory: vectors, entry ids and expiry times in rows, the log's value at position k in
    row k % capacity (the capacity grows by doubling up to MAX_ENTRIES, before any position reaches it); `total`
    is the log's total when last read. Rows never filled, or whose value did not decode, expire at 0."""

    __slots__ = ("dim", "expires", "ids", "lock", "total", "vectors")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.reset()

    def reset(self, dim: int = 0) -> None:
        self.total, self.dim = 0, dim
        self.vectors = np.zeros((0, dim), np.float32)
        self.ids: list[bytes] = []
        self.expires = np.zeros(0)

    def apply(self, total: int, values: list[bytes], dim: int) -> None:
        """Take the log's news: `values` are its kept values up to position `total`; those already held are
        skipped (a read that raced another)."""
        if total < self.total or dim != self.dim:
            self.reset(dim)
        record = np.dtype([("expires", "<f8"), ("id", f"S{_ID_BYTES}"), ("vector", "<f4", (dim,))])
        first = total - len(values)
        if min(total, MAX_ENTRIES) > len(self.ids):
            self._grow(min(total, MAX_ENTRIES))
        capacity = len(self.ids)
        for position in range(max(first, self.total), total):
            value, slot = values[position - first], position % capacity
            if len(value) != record.itemsize:
                self.expires[slot] = 0.0
                continue
            row = np.frombuffer(value, dtype=record)[0]
            self.vectors[slot], self.ids[slot], self.expires[slot] = row["vector"], bytes(row["id"]), row["expires"]
        self.total = max(self.total, total)

    def _grow(self, needed: int) -> None:
        capacity = min(MAX_ENTRIES, max(needed, 2 * len(self.ids), 64))
        held = len(self.ids)
        vectors, expires = np.zeros((capacity, self.dim), np.float32), np.zeros(capacity)
        vectors[:held], expires[:held] = self.vectors, self.expires
        self.vectors, self.expires, self.ids = vectors, expires, self.ids + [b""] * (capacity - held)

    def best(self, query: np.ndarray, now: float) -> tuple[int, float]:
        """The live row most similar to `query` (a dot product: vectors are normalised); (-1, -inf) if none."""
        held = min(self.total, len(self.ids))
        if held == 0 or self.dim != query.shape[0]:
            return -1, float("-inf")
        scores = self.vectors[:held] @ query
        scores[self.expires[:held] <= now] = -np.inf
        row = int(np.argmax(scores))
        return row, float(scores[row])


class SemanticCache:
    """Answers a request from the answer to an earlier one whose conversation embeds within `similarity`
    (cosine) of it, among requests of the same tenant, model and parameters (one bucket).

    Runs right after the exact cache (which, on a hit, answers first) and follows its rules: the same `mode`
    and cacheability (one configured model; `deterministic` needs temperature 0 or a seed), the same tenants
    (`shared`), the same headers (`cache-control: no-cache` / `no-store`, `x-pointsman-cache-ttl`), the same
    answers stored (ok, plain or a finished stream, within `max_entry_kb`, served by the model asked for) and
    replayed (fresh id and created). A hit sets `ctx.cache` and `x-pointsman-cache` to `semantic-hit`.

    Store layout, shared by replicas: each answer under `sem:{bucket}:{entry id}` (its TTL), and per bucket a
    log `sem:{bucket}:index` (StateStore.append, the newest MAX_ENTRIES kept) of records (expiry time, entry id,
    float32 vector). Each replica mirrors a bucket's log into a numpy matrix, reading only the new records
    (one small round trip when nothing changed), so a lookup is one matrix-vector product. An unreachable
    store, or an embedder that fails, makes it bypass (one warning per outage)."""

    name: ClassVar[str] = "semantic_cache"
    stage: ClassVar[int] = STAGES["cache"] + 1

    def __init__(
        self,
        config: CacheConfig,
        store: StateStore,
        embed: Callable[[str], Awaitable[np.ndarray | None]],  # None: a text longer than the embedder sees
        resolve: Callable[[str], str],
    ) -> None:
        self.config = config
        self.store = store
        self.embed = embed
        self.similarity = config.semantic.similarity
        self._rules = ExactCache(config, store, resolve)  # its cacheability rule, never its store
        self._max_bytes = config.max_entry_kb * 1024
        self._mirrors: OrderedDict[str, _Mirror] = OrderedDict()
        self._down = False

    async def admit(self, ctx: RequestContext) -> Reply | None:
        if self.config.mode == "off" or not self.config.semantic.enabled or ctx.cache == "hit":
            return None
        model = self._rules.cacheable(ctx)
        text = conversation_text(ctx) if model is not None else None
        headers: dict[str, str] | None = ctx.state.get("request_headers")  # only when the client sent some
        control = _cache_control(headers)
        if model is None or text is None or ("no-cache" in control and "no-store" in control):
            return None
        chat = isinstance(ctx.request.body, ChatCompletionRequest)
        tenant = tenant_of(ctx.principal, self.config.shared)
        bucket = bucket_of(ctx.request.raw, model, "chat" if chat else "completion", tenant)
        try:
            embedded = await self.embed(text)
        except Exception:
            log.exception("semantic cache: embedding request %s failed, bypassing", ctx.request_id)
            return None
        if embedded is None:  # compared only by its start, a long text would match others alike only there
            return None
        vector = np.asarray(embedded, dtype=np.float32)
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        ttl_s = _ttl_override(headers) or self.config.ttl_s
        ctx.state[self.name] = SemanticLookup(bucket, vector, model, "no-store" not in control, ttl_s)
        if "no-cache" in control:
            return None
        try:
            entry = await self._lookup(bucket, vector)
        except StoreUnavailable as exc:
            self._store_down(exc)
            ctx.state.pop(self.name, None)
            return None
        if self._down:
            self._store_up()
        return None if entry is None or not usable(entry, ctx) else self._hit(ctx, model, entry)

    @no_op
    async def approve(self, ctx: RequestContext, decision: Any) -> None:
        return None

    async def settle(self, ctx: RequestContext, outcome: Outcome) -> None:
        """Stores the answer and indexes its vector. Never raises."""
        lookup = ctx.state.get(self.name)
        if not isinstance(lookup, SemanticLookup):
            return
        body = storable(ctx, outcome, lookup.store, lookup.model, self._max_bytes)
        if body is None:
            return
        try:
            entry_id = os.urandom(_ID_BYTES // 2).hex().encode()
            await self.store.set(f"sem:{lookup.bucket}:{entry_id.decode()}", body, lookup.ttl_s)
            record = np.array([time.time() + lookup.ttl_s]).tobytes() + entry_id + lookup.vector.tobytes()
            await self._refresh(lookup.bucket, len(lookup.vector), record, lookup.ttl_s)
        except StoreUnavailable as exc:
            self._store_down(exc)
            return
        except Exception:
            log.exception("semantic cache: storing the answer to request %s failed", ctx.request_id)
            return
        if self._down:
            self._store_up()

    async def _lookup(self, bucket: str, vector: np.ndarray) -> dict[str, Any] | None:
        """The stored answer most similar to `vector` within `similarity`; an entry gone from the store (evicted)
        is dropped from the mirror and the next best tried, three at most."""
        mirror = await self._refresh(bucket, len(vector))
        for _ in range(3):
            row, score = mirror.best(vector, time.time())
            if row < 0 or score < self.similarity:
                return None
            stored = await self.store.get(f"sem:{bucket}:{mirror.ids[row].decode()}")
            entry = _entry(stored) if stored is not None else None
            if entry is not None:
                return entry
            mirror.expires[row] = 0.0
        return None

    async def _refresh(self, bucket: str, dim: int, record: bytes | None = None, ttl_s: float | None = None) -> _Mirror:
        """Bring the bucket's mirror up to date with its log (appending `record` first, when given)."""
        mirror = self._mirrors.get(bucket)
        if mirror is None:
            mirror = self._mirrors[bucket] = _Mirror()
            while len(self._mirrors) > MAX_BUCKETS:
                self._mirrors.popitem(last=False)
        self._mirrors.move_to_end(bucket)
        async with mirror.lock:  # one read at a time per bucket: answers apply in order
            total, values = await self.store.append(
                f"sem:{bucket}:index",
                record,
                ttl_s if record is not None else None,
                keep=MAX_ENTRIES,
                since=mirror.total,
            )
            if total < mirror.total:  # the log expired and started again: read it whole
                mirror.reset(dim)
                total, values = await self.store.append(f"sem:{bucket}:index")
            mirror.apply(total, values, dim)
        return mirror

    def _hit(self, ctx: RequestContext, model: str, entry: dict[str, Any]) -> Reply:
        ctx.headers["x-pointsman-cache"] = "semantic-hit"
        return answer_from(ctx, model, entry, "semantic-hit")

    def _store_down(self, exc: StoreUnavailable) -> None:
        if not self._down:
            self._down = True
            log.warning("semantic cache: state store unavailable, bypassing until it is back: %s", exc)

    def _store_up(self) -> None:
        """The store answered after an outage (callers check `_down` first: a check, not a call, a request)."""
        self._down = False
        log.info("semantic cache: state store back, caching again")
