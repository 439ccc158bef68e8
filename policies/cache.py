"""The exact response cache: a request identical to one already answered gets the stored answer back."""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import msgspec

from config.schema import CacheConfig
from policies.base import STAGES, no_op
from policies.context import Outcome, Principal, Reply, RequestContext
from policies.state import StateStore, StoreUnavailable
from protocol.openai import GATEWAY_FIELDS, ChatCompletionRequest, new_id

__all__ = ["CacheLookup", "ExactCache", "answer_from", "cache_key", "replay_chunks", "storable", "usable"]

log = logging.getLogger("pointsman.policies.cache")

# fields that change how an answer is delivered or who asked, never what it says: left out of the key
_UNKEYED = frozenset({"stream", "stream_options", "user"}) | GATEWAY_FIELDS
_TTL_HEADER = "x-pointsman-cache-ttl"
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.encode


@dataclass(slots=True)  # not frozen: built on every request, and frozen ones cost 4x to build
class CacheLookup:
    """What `admit` leaves in `ctx.state["cache"]` for `settle`: the store key, the model the entry belongs to,
    whether to store the answer, and for how long."""

    key: str
    model: str
    store: bool
    ttl_s: float


def tenant_of(principal: Principal, shared: bool) -> str:
    """Whose entries these are: one cache for all when shared, else the caller's team, else its key (kinds
    prefixed, so a team can never share entries with a key that happens to have its name)."""
    if shared:
        return "shared"
    if principal.team:
        return f"team={principal.team}"
    return f"key={principal.key_id}" if principal.key_id else "anonymous"


def cache_key(raw: dict[str, Any], model: str, endpoint: str, tenant: str) -> str:
    """`cache:{tenant}:{sha256}` of the endpoint and the raw body, keys sorted at every depth, without the
    delivery and routing fields and with `model` replaced by the configured id it resolved to."""
    if _UNKEYED.isdisjoint(raw):  # the usual body: copied in C, not filtered key by key (-0.6 us here)
        canonical = {**raw, "model": model}
    else:
        canonical = {k: v for k, v in raw.items() if k not in _UNKEYED}
        canonical["model"] = model
    digest = _SHA256.copy()  # an empty hash copied: 0.4 us, where sha256() looks OpenSSL's digest up again (1.1)
    digest.update(endpoint.encode() + b"\n" + _encode(canonical, order="sorted"))
    return f"cache:{tenant}:{digest.hexdigest()}"


_SHA256 = hashlib.sha256()  # never updated itself: each key starts from a copy


def _single_model(name: str) -> bool:
    """A configured model id: not a chain (`a:b`) nor an automatic choice (`auto`, `auto-*`)."""
    return bool(name) and ":" not in name and not name.startswith("auto")


_NO_CONTROL: frozenset[str] = frozenset()


def _cache_control(headers: dict[str, str] | None) -> frozenset[str] | set[str]:
    """The `cache-control` directives, lowercased; `headers` is None when the client sent none a cache reads."""
    if not headers:
        return _NO_CONTROL
    return {d.strip().lower() for d in headers.get("cache-control", "").split(",") if d.strip()}


def _ttl_override(headers: dict[str, str] | None) -> float | None:
    """The `x-pointsman-cache-ttl` header in seconds, at most `_MAX_TTL_S`; anything but a finite positive number
    is ignored."""
    value = headers.get(_TTL_HEADER) if headers else None
    if value is None:
        return None
    try:
        ttl = float(value)
    except ValueError:
        return None
    return min(ttl, _MAX_TTL_S) if math.isfinite(ttl) and ttl > 0 else None


# the longest TTL `x-pointsman-cache-ttl` sets: a state store keeps whole milliseconds in 64 bits (Redis refused
# 1e20 s and 1e308 s overflowed to infinity: the answer was not stored and a traceback logged on every request)
_MAX_TTL_S = 10 * 365 * 86400.0


class ExactCache:
    """Answers repeated requests from the state store, scoped per tenant unless `shared`.

    Cacheable: `mode: always`, or `mode: deterministic` with `temperature: 0` or a `seed` (any `n`); `mode: off`
    does nothing. Only requests for one configured model are cached: a `model` that resolves to an automatic
    choice (`auto`, `auto-*`), a chain (`a:b`) or nothing at all (routing fields only, `auto_select`) bypasses,
    since the model that will serve is not known before routing. Plain answers are stored, and streamed ones as
    the gateway puts them back together (`Outcome.body`: one choice, streamed to its finish_reason; with usage
    only when the client asked for it); a stored answer is replayed to plain and streamed requests alike (a
    replayed stream carries no logprobs: a stream asking for them is a miss, see `usable`). An answer served by
    another model than the one requested (a fallback) is not stored.

    Request headers (from `ctx.state["request_headers"]`): `cache-control: no-cache` skips the lookup,
    `no-store` skips storing, `x-pointsman-cache-ttl: SECONDS` sets this entry's TTL. The outcome goes to
    `ctx.cache` (hit | miss | bypass) and the `x-pointsman-cache` response header. An unreachable store makes
    the cache bypass, with one warning per outage."""

    name: ClassVar[str] = "cache"
    stage: ClassVar[int] = STAGES["cache"]

    def __init__(self, config: CacheConfig, store: StateStore, resolve: Callable[[str], str]) -> None:
        self.config = config
        self.store = store
        self.resolve = resolve
        self._max_bytes = config.max_entry_kb * 1024
        self._down = False

    def cacheable(self, ctx: RequestContext) -> str | None:
        """The configured model id the request is for when its answer may be cached, else None. A model the
        caller's key may not use is never answered from the cache (another key's answer): routing refuses it."""
        body = ctx.request.body
        if self.config.mode == "off" or body.model is None or body.auto_select:
            return None
        if self.config.mode == "deterministic" and body.temperature != 0 and body.seed is None:
            return None
        model = self.resolve(body.model)
        return model if _single_model(model) and ctx.principal.may_use(model) else None

    async def admit(self, ctx: RequestContext) -> Reply | None:
        if self.config.mode == "off":
            return None
        model = self.cacheable(ctx)
        if model is None:
            return self._bypass(ctx)
        headers: dict[str, str] | None = ctx.state.get("request_headers")  # only when the client sent some
        control = _cache_control(headers)
        endpoint = "chat" if isinstance(ctx.request.body, ChatCompletionRequest) else "completion"
        key = cache_key(ctx.request.raw, model, endpoint, tenant_of(ctx.principal, self.config.shared))
        ttl_s = _ttl_override(headers) or self.config.ttl_s
        ctx.state["cache"] = CacheLookup(key, model, "no-store" not in control, ttl_s)
        if "no-cache" in control:
            return self._bypass(ctx)
        try:
            stored = await self.store.get(key)
        except StoreUnavailable as exc:
            self._store_down(exc)
            ctx.state["cache"] = CacheLookup(key, model, False, ttl_s)  # no point storing into a dead store
            return self._bypass(ctx)
        if self._down:
            self._store_up()
        entry = _entry(stored) if stored is not None else None
        if entry is None or not usable(entry, ctx):
            ctx.cache = "miss"
            ctx.headers["x-pointsman-cache"] = "miss"
            return None
        return self._hit(ctx, model, entry)

    @no_op
    async def approve(self, ctx: RequestContext, decision: Any) -> None:
        return None

    async def settle(self, ctx: RequestContext, outcome: Outcome) -> None:
        """Stores a plain answer that decodes as a JSON object with `choices`, within `max_entry_kb`. Never raises."""
        lookup = ctx.state.get("cache")
        if not isinstance(lookup, CacheLookup):
            return
        body = storable(ctx, outcome, lookup.store, lookup.model, self._max_bytes)
        if body is None:
            return
        try:
            await self.store.set(lookup.key, body, lookup.ttl_s)
        except StoreUnavailable as exc:
            self._store_down(exc)
            return
        except Exception:
            log.exception("cache: storing the answer to request %s failed", ctx.request_id)
            return
        if self._down:
            self._store_up()

    def _hit(self, ctx: RequestContext, model: str, entry: dict[str, Any]) -> Reply:
        return answer_from(ctx, model, entry, "hit")

    @staticmethod
    def _bypass(ctx: RequestContext) -> None:
        ctx.cache = "bypass"
        ctx.headers["x-pointsman-cache"] = "bypass"
        return None

    def _store_down(self, exc: StoreUnavailable) -> None:
        if not self._down:
            self._down = True
            log.warning("cache: state store unavailable, bypassing the cache until it is back: %s", exc)

    def _store_up(self) -> None:
        """The store answered after an outage (callers check `_down` first: a check, not a call, a request)."""
        self._down = False
        log.info("cache: state store back, caching again")


def usable(entry: dict[str, Any], ctx: RequestContext) -> bool:
    """Whether a stored answer can answer this request: one without `usage` (put together from a stream whose
    client did not ask for usage) only answers streams that do not ask for it either. A plain answer always
    carries `usage`, and `stream_options.include_usage` promises a last chunk with it; such a request is a miss,
    and its answer, usage included, takes the entry's place. So is a request for logprobs that the entry cannot
    give: a stream's (a replay has none), or a plain one's when the entry has none (kept from a stream)."""
    body = ctx.request.body
    if body.logprobs is not None and body.logprobs is not False and (body.stream or not _has_logprobs(entry)):
        return False
    if isinstance(entry.get("usage"), dict):
        return True
    return body.stream and not ctx.request.include_usage


def _has_logprobs(entry: dict[str, Any]) -> bool:
    choices = entry.get("choices")
    return isinstance(choices, list) and bool(choices) and all(
        isinstance(c, dict) and c.get("logprobs") is not None for c in choices)


def answer_from(ctx: RequestContext, model: str, entry: dict[str, Any], kind: str) -> Reply:
    """A stored answer as this request's reply, with a fresh id and time: the JSON body for a plain request, a
    replayed stream for a streamed one. Notes `kind` (hit, semantic-hit), the model, the usage and a cost of 0 in
    ctx."""
    chat = isinstance(ctx.request.body, ChatCompletionRequest)
    fresh_id, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
    usage = entry.get("usage")
    ctx.cache = kind
    ctx.model = model
    ctx.cost_usd = 0.0  # no model ran: the usage row's tokens are the stored answer's, its cost nothing
    if isinstance(usage, dict):
        ctx.prompt_tokens, ctx.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    headers = {"x-pointsman-cache": kind, "x-pointsman-model": model}
    if not ctx.request.body.stream:
        return Reply(body=_encode({**entry, "id": fresh_id, "created": created}), headers=headers)
    chunks = replay_chunks(entry, fresh_id, created, chat=chat, include_usage=ctx.request.include_usage)
    return Reply(chunks=tuple(_encode(chunk) for chunk in chunks), headers=headers)


def storable(ctx: RequestContext, outcome: Outcome, store: bool, model: str, max_bytes: int) -> bytes | None:
    """The answer to keep, or None: an `ok` outcome with a body of at most `max_bytes` that decodes as an entry,
    when storing was allowed (`store`) and the model asked for served it (not a fallback)."""
    body = outcome.body
    if (
        outcome.status != "ok"
        or body is None
        or not store
        or len(body) > max_bytes
        or (ctx.model is not None and ctx.model != model)
        or not _is_answer(body)
    ):
        return None
    return body


class _Answer(msgspec.Struct):
    """What an entry must be: a JSON object with a `choices` list (checked without decoding the choices)."""

    choices: list[msgspec.Raw]


_check_answer = msgspec.json.Decoder(_Answer).decode


def _is_answer(data: bytes) -> bool:
    """Whether `data` would be an entry (see `_entry`), at a third of the cost of decoding it."""
    try:
        _check_answer(data)
    except (msgspec.DecodeError, RecursionError):
        return False
    return True


def _entry(data: bytes) -> dict[str, Any] | None:
    """A stored answer: a JSON object with a `choices` list, else None."""
    try:
        entry = _decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("choices"), list) else None


def replay_chunks(
    entry: dict[str, Any], chunk_id: str, created: int, *, chat: bool, include_usage: bool
) -> list[dict[str, Any]]:
    """A stored answer as a stream: (chat only) a role chunk, one chunk with every choice's whole content, one
    with every choice's finish_reason, and with `include_usage` a last chunk of usage and no choices (the
    others then carry `usage: null` in chat, as OpenAI sends them; a text_completion's `usage` is never null in
    OpenAI's spec, so there the others leave it out)."""
    choices = [c for c in entry["choices"] if isinstance(c, dict)]
    head: dict[str, Any] = {
        "id": chunk_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": entry.get("model", ""),
    }
    if include_usage and chat:
        head["usage"] = None

    def chunk(parts: list[dict[str, Any]]) -> dict[str, Any]:
        return {**head, "choices": parts}

    def part(choice: dict[str, Any], finish_reason: str | None = None, **fields: Any) -> dict[str, Any]:
        return {"index": choice.get("index", 0), **fields, "logprobs": None, "finish_reason": finish_reason}

    if chat:
        chunks = [chunk([part(c, delta={"role": "assistant", "content": ""}) for c in choices])]
        content = [part(c, delta=delta) for c in choices if (delta := _content_delta(c.get("message") or {}))]
        if content:
            chunks.append(chunk(content))
        chunks.append(chunk([part(c, c.get("finish_reason") or "stop", delta={}, **_stop_reason(c)) for c in choices]))
    else:
        chunks = [
            chunk([part(c, text=c.get("text") or "") for c in choices]),
            chunk([part(c, c.get("finish_reason") or "stop", text="", **_stop_reason(c)) for c in choices]),
        ]
    usage = entry.get("usage")
    if include_usage and isinstance(usage, dict):
        chunks.append({**head, "choices": [], "usage": usage})
    return chunks


def _stop_reason(choice: dict[str, Any]) -> dict[str, Any]:
    """vLLM's `stop_reason` (the stop string that ended the choice) when the answer had one: /v1/messages reads it
    for its `stop_sequence`."""
    reason = choice.get("stop_reason")
    return {} if reason is None else {"stop_reason": reason}


def _content_delta(message: dict[str, Any]) -> dict[str, Any]:
    """A chat message's content, refusal and tool calls as one delta (tool calls gain their `index`)."""
    delta: dict[str, Any] = {}
    if message.get("content"):
        delta["content"] = message["content"]
    if message.get("refusal"):
        delta["refusal"] = message["refusal"]
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls:
        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls) if isinstance(call, dict)]
    return delta
