"""The rate-limit policy: requests and tokens per minute per scope member, as GCRA buckets in the state store."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from config.schema import RateLimitConfig
from policies.base import COMPLETIONS, STAGES, no_op
from policies.context import Outcome, Reply, RequestContext, embedding_tokens, scope_member
from policies.state import RateCharge, RateResult, StateStore, StoreUnavailable
from protocol.errors import RateLimited, ServiceUnavailable
from protocol.openai import ChatCompletionRequest, ParsedEmbeddings, ParsedRequest, message_text

__all__ = ["RateLimitPolicy", "estimate_tokens", "reset_text"]

log = logging.getLogger("pointsman.policies")

_UNIT = {"rpm": "requests", "tpm": "tokens"}  # OpenAI's names, in its x-ratelimit-*-{unit} headers


@dataclass(frozen=True, slots=True)  # built once per (limit, member, kind) and kept: see RateLimitPolicy._members
class _Bucket:
    """One GCRA bucket a request is charged to: `kind` per minute of one limit, for one member of its scope."""

    limit: RateLimitConfig
    member: str
    kind: Literal["rpm", "tpm"]
    key: str
    per_minute: int
    limit_text: str  # per_minute as the x-ratelimit-limit-* header's value
    one: RateCharge  # the charge of one unit: what each request costs an rpm bucket, built once

    def charge(self, cost: int, *, partial: bool = False) -> RateCharge:
        """`cost` units (an estimate or an excess: never negative) to this bucket."""
        return self.one.costing(cost, partial)

    def refund(self, cost: int) -> RateCharge:
        """`cost` units given back (a negative charge: GCRA moves the bucket's TAT back, and a TAT before now counts
        as a full bucket, so no refund fills it past its burst)."""
        return self.one.costing(-cost)


@dataclass(slots=True)
class _Charged:
    """What admit charged the tpm buckets, kept in ctx.state so that settle charges only the difference."""

    estimate: int
    buckets: tuple[_Bucket, ...]


_MEMBERS = 4096  # (limit, member) bucket pairs kept; past that the table starts again (members are open-ended)


def estimate_tokens(request: ParsedRequest | ParsedEmbeddings) -> int:
    """A cheap estimate of what a request will cost in tokens: its text at 4 characters a token (token ids
    count one each) plus what it may generate (`max_tokens` per choice, 0 when unset)."""
    if isinstance(request, ParsedEmbeddings):
        return embedding_tokens(request)
    body = request.body
    if isinstance(body, ChatCompletionRequest):
        chars = 0
        for message in body.messages:  # a loop, not sum() over a generator: this runs on every request
            chars += len(message_text(message.content))
        prompt = chars // 4
    elif isinstance(body.prompt, str):
        prompt = len(body.prompt) // 4
    else:
        prompt = sum(len(p) // 4 if isinstance(p, str) else 1 if isinstance(p, int) else len(p) for p in body.prompt)
    return prompt + (request.max_new_tokens or 0) * body.n


def reset_text(seconds: float) -> str:
    """A duration in OpenAI's x-ratelimit-reset-* style: "0.5s", "12s", "6m0s", "1h2m3s"."""
    if seconds < 60:
        ms = int(seconds * 1000 + 0.5) if seconds > 0 else 0  # whole milliseconds, rounded half up
        text = _RESET_TEXT.get(ms)
        if text is None:
            if len(_RESET_TEXT) >= 60_001:  # every millisecond of a minute, at most
                _RESET_TEXT.clear()
            text = _RESET_TEXT[ms] = f"{ms / 1000:g}s"
        return text
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


_RESET_TEXT: dict[int, str] = {}  # reset_text under a minute, by the millisecond: formatted once


class RateLimitPolicy:
    """Requests (rpm) and tokens (tpm) per minute, each limit per member of its scope (`match`: only that member),
    one GCRA bucket per (limit, member, kind) in the state store, so that every replica shares it.

    admit charges every applicable bucket in one `rate_many` call (one round trip): 1 to each rpm bucket, and to
    each tpm bucket the request's estimate (`estimate_tokens`). A bucket that cannot take its charge refuses the
    request with a 429 (`RateLimited`, retry-after and OpenAI's x-ratelimit-* headers); a request whose estimate
    exceeds a tpm limit outright can never pass and is refused with `x-should-retry: false` instead of a
    retry-after. The charges are not all or nothing: when one bucket refuses, the others have already been
    charged (an rpm unit spent on a request a tpm bucket refused), as OpenAI does too. Admitted requests get the
    x-ratelimit-* headers of the most constraining bucket of each unit.

    settle charges the tpm buckets what the actual usage exceeded the estimate by (a smaller usage is no refund),
    in one `rate_many` call of partial charges: an excess the bucket cannot hold drains it to empty, and later
    requests wait for it to refill; usage beyond an empty bucket is forgiven, not carried as debt. A request no
    model ran (answered by the cache, whose usage is the stored answer's, or refused by a later policy such as a
    budget, or by routing, before any model was tried) gets its estimate back: tpm counts the tokens models read
    and wrote. Its rpm unit stays spent.

    A store that cannot be reached lets requests through under `on_store_error: allow` (a warning once per
    outage) and refuses them with a 503 under `deny`.

    An API key's own limit (`Principal.rate_limit`, scope `key`) applies beside the config's, as bucket "key".
    """

    __slots__ = ("_down", "_members", "_model_of", "_numbered", "limits", "store")

    name: ClassVar[str] = "rate_limit"
    stage: ClassVar[int] = STAGES["rate_limit"]
    endpoints: ClassVar[frozenset[str]] = COMPLETIONS | {"embeddings"}

    def __init__(self, limits: Sequence[RateLimitConfig], store: StateStore,
                 model_of: Callable[[str], str] | None = None) -> None:
        self.limits = tuple(limits)
        # the configured id a model name counts as (an alias, a chain's first model): one bucket per model
        self._model_of = model_of
        self._numbered: tuple[tuple[int | str, RateLimitConfig], ...] = tuple(enumerate(self.limits))
        self.store = store
        self._down = False  # the store failed and has not answered since: warned once already
        # (limit index, member) -> its rpm and tpm buckets: the same few serve request after request
        self._members: dict[tuple[int | str, str], tuple[_Bucket, ...]] = {}

    async def admit(self, ctx: RequestContext) -> Reply | None:
        buckets = self._buckets(ctx)
        if not buckets:
            return None
        estimate: int | None = None
        charges: list[RateCharge] = []
        tpm: list[_Bucket] = []
        for bucket in buckets:  # 1 to each rpm bucket, the request's estimate to each tpm one
            if bucket.kind == "rpm":
                charges.append(bucket.one)
            else:
                if estimate is None:
                    estimate = estimate_tokens(ctx.request)
                charges.append(bucket.charge(estimate))
                tpm.append(bucket)
        try:
            results = await self.store.rate_many(charges)
        except StoreUnavailable as exc:
            self._store_failed(exc)
            denying = next((bucket for bucket in buckets if bucket.limit.on_store_error == "deny"), None)
            if denying is not None:
                raise ServiceUnavailable(
                    "rate limiting is unavailable (its state store cannot be reached) and this "
                    f"{denying.limit.scope} limit refuses requests then (on_store_error: deny); try again shortly"
                ) from exc
            return None
        if self._down:
            self._down = False
            log.warning("rate limits enforced again: the state store answers")
        headers = _headers(buckets, results)
        for outcome in results:
            if not outcome.allowed:  # the refusal of the bucket that frees up last speaks for the request
                refused = [(bucket, result, charge.cost)
                           for bucket, result, charge in zip(buckets, results, charges, strict=True)
                           if not result.allowed]
                raise _refusal(*max(refused, key=lambda refusal: refusal[1].retry_after_s), headers)
        ctx.headers.update(headers)
        if estimate is not None:
            ctx.state[self.name] = _Charged(estimate, tuple(tpm))
        return None

    @no_op
    async def approve(self, ctx: RequestContext, decision: Any) -> None:
        return None

    async def settle(self, ctx: RequestContext, outcome: Outcome) -> None:
        """Charge the tpm buckets the usage the estimate did not cover, or give the estimate back when no model
        ran (a cache hit, a later policy's refusal); never raises (the response is out)."""
        charged = ctx.state.get(self.name)
        if not isinstance(charged, _Charged):
            return
        if outcome.status == "answered" or (outcome.status == "error" and not ctx.attempts):  # no model ran
            if charged.estimate:
                await self._charge([bucket.refund(charged.estimate) for bucket in charged.buckets], "refunding")
            return
        if ctx.prompt_tokens is None and ctx.completion_tokens is None:
            return
        excess = (ctx.prompt_tokens or 0) + (ctx.completion_tokens or 0) - charged.estimate
        if excess > 0:  # what a bucket cannot take whole it takes as far as it holds (partial): never in debt
            await self._charge([bucket.charge(excess, partial=True) for bucket in charged.buckets], "charging")

    async def _charge(self, charges: list[RateCharge], doing: str) -> None:
        """Settle's charges (or refunds) of tokens: logged, never raised."""
        try:
            await self.store.rate_many(charges)
        except StoreUnavailable as exc:
            self._store_failed(exc)
        except Exception:
            log.exception("rate limit: %s %s tokens failed", doing, abs(charges[0].cost))

    async def remaining(self, ctx: RequestContext) -> list[dict[str, Any]]:
        """Each limit that applies to the caller, the key's own too (not `model` limits: they count the model asked
        for): scope, member, its rpm and tpm, and the requests and tokens left now, read with charges of 0 (a GCRA
        step that moves no bucket). Raises ServiceUnavailable when the store cannot be reached."""
        buckets = [bucket for bucket in self._buckets(ctx) if bucket.limit.scope != "model"]
        if not buckets:
            return []
        try:
            results = await self.store.rate_many([bucket.charge(0) for bucket in buckets])
        except StoreUnavailable as exc:
            self._store_failed(exc)
            raise ServiceUnavailable("rate limit usage is unavailable: the state store cannot be reached; "
                                     "try again shortly") from exc
        rows: dict[str, dict[str, Any]] = {}  # one per limit and member (its buckets' key less the kind)
        for bucket, result in zip(buckets, results, strict=True):
            row = rows.setdefault(bucket.key.rpartition(":")[0],
                                  {"scope": bucket.limit.scope, "member": bucket.member})
            row[bucket.kind] = bucket.per_minute
            row[f"remaining_{_UNIT[bucket.kind]}"] = result.remaining
        return list(rows.values())

    def _buckets(self, ctx: RequestContext) -> list[_Bucket]:
        buckets: list[_Bucket] = []
        own = ctx.principal.rate_limit  # the API key's own limit, beside the config's
        asked = ctx.request.body.model
        for index, limit in (self._numbered if own is None else (*self._numbered, ("key", own))):
            # model scope: the model asked for (its alias, or a chain, as the model it routes to first); a request
            # that names none (automatic routing) is not counted
            model = asked
            if limit.scope == "model" and model is not None and self._model_of is not None:
                model = self._model_of(model)
            member = scope_member(limit.scope, limit.match, ctx, model)
            if member is None:
                continue
            made = self._members.get((index, member))
            if made is None or (made and made[0].limit is not limit):  # a key's own limit may have changed since
                made = self._new_member(index, member, limit)
            buckets += made
        return buckets

    def _new_member(self, index: int | str, member: str, limit: RateLimitConfig) -> tuple[_Bucket, ...]:
        if len(self._members) >= _MEMBERS:
            self._members.clear()
        made: list[_Bucket] = []
        for kind, per_minute in (("rpm", limit.rpm), ("tpm", limit.tpm)):
            if per_minute is not None:
                key = f"rl:{index}:{member}:{kind}"
                one = RateCharge(key, per_minute / 60, per_minute)
                made.append(_Bucket(limit, member, kind, key, per_minute, str(per_minute), one))
        self._members[(index, member)] = bucket_tuple = tuple(made)
        return bucket_tuple

    def _store_failed(self, exc: StoreUnavailable) -> None:
        if not self._down:
            self._down = True
            log.warning("rate limits not enforced while the state store is unreachable "
                        "(limits with on_store_error: deny refuse requests): %s", exc)


def _headers(buckets: Sequence[_Bucket], results: Sequence[RateResult]) -> dict[str, str]:
    """OpenAI's x-ratelimit-{limit,remaining,reset}-{requests,tokens}, each from its unit's tightest bucket (the
    fewest units left, then the longest to refill)."""
    headers: dict[str, str] = {}
    tightest: dict[str, RateResult] = {}
    for bucket, result in zip(buckets, results, strict=True):
        held = tightest.get(bucket.kind)
        if held is None or (result.remaining, -result.reset_s) < (held.remaining, -held.reset_s):
            tightest[bucket.kind] = result
            limit_name, remaining_name, reset_name = _HEADER_NAMES[bucket.kind]
            headers[limit_name] = bucket.limit_text
            headers[remaining_name] = str(result.remaining)
            headers[reset_name] = reset_text(result.reset_s)
    return headers


_HEADER_NAMES = {kind: tuple(f"x-ratelimit-{what}-{unit}" for what in ("limit", "remaining", "reset"))
                 for kind, unit in _UNIT.items()}


def _refusal(bucket: _Bucket, result: RateResult, cost: float, headers: dict[str, str]) -> RateLimited:
    unit = _UNIT[bucket.kind]
    who = "global" if bucket.limit.scope == "global" else f"{bucket.limit.scope} {bucket.member!r}"
    if math.isinf(result.retry_after_s):
        error = RateLimited(
            f"Request too large for the {who} rate limit of {bucket.per_minute} tokens per minute: it needs an "
            f"estimated {cost} tokens (prompt plus max_tokens); shorten the prompt or lower max_tokens"
        )
        error.headers = {**headers, "x-should-retry": "false"}
    else:
        retry = max(1, math.ceil(result.retry_after_s))
        requested = "" if bucket.kind == "rpm" else f" (this request: an estimated {cost} tokens)"
        error = RateLimited(
            f"Rate limit reached for {who}: {bucket.per_minute} {unit} per minute{requested}; "
            f"try again in {retry} s"
        )
        error.headers = {**headers, "retry-after": str(retry)}
    error.type = unit
    return error
