"""What one request carries through the pipeline: the caller, the request, the decision, attempts, usage."""

from __future__ import annotations

import fnmatch
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from config.schema import BudgetConfig, ModelConfig, RateLimitConfig
from protocol.errors import GatewayError
from protocol.openai import ParsedEmbeddings, ParsedRequest

__all__ = ["ANONYMOUS", "AttemptRecord", "Outcome", "Principal", "Reply", "RequestContext", "Role",
           "embedding_tokens", "scope_member"]


Role = Literal["admin", "user", "readonly"]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: built once per API key and cached. The static `auth.api_keys` and POINTSMAN_ADMIN_KEY map
    to admin principals; with auth off everyone is ANONYMOUS. `budget` and `rate_limit` are the key's own (scope
    `key`, matching its id), applied beside the config's."""

    key_id: str | None
    role: Role = "admin"
    team: str | None = None
    allowed_models: tuple[str, ...] = ("*",)
    budget: BudgetConfig | None = None
    rate_limit: RateLimitConfig | None = None

    @property
    def restricted(self) -> bool:
        """Whether some models are off limits to this caller."""
        return "*" not in self.allowed_models

    def may_use(self, model_id: str) -> bool:
        """Whether the key's model globs allow `model_id`: a version, `id@1.2.0`, counts as its model, and a glob
        may also name versions (`id@2.0.0`, `id@*`)."""
        if "*" in self.allowed_models:
            return True
        base = model_id.partition("@")[0]
        return _allowed(self.allowed_models, base) or (base != model_id and _allowed(self.allowed_models, model_id))


@functools.lru_cache(maxsize=4096)
def _allowed(patterns: tuple[str, ...], model_id: str) -> bool:
    return any(fnmatch.fnmatchcase(model_id, p) for p in patterns)


ANONYMOUS = Principal(key_id=None)


@dataclass(slots=True)
class AttemptRecord:
    """One try of one deployment: filled in by the deployment pool's lease."""

    model: str
    deployment: str
    started: float
    ended: float | None = None
    ok: bool | None = None
    error: str | None = None  # the error's code, or "cancelled"
    ttft_s: float | None = None


@dataclass(slots=True)
class Reply:
    """A policy's own answer from `admit` (a cache hit): `body` for a plain request, `chunks` (JSON payloads,
    unframed) for a streamed one."""

    body: bytes = b""
    chunks: tuple[bytes, ...] = ()
    headers: dict[str, str] = field(default_factory=dict)


class Outcome:
    """How the request ended, handed to every policy's `settle` exactly once.

    status: `ok` (served), `answered` (a policy's Reply), `error` (a GatewayError reached the client, `error`
    says which), `cancelled` (the client left first). `body` is the answer as plain JSON when there is one: a
    plain response's, or a finished stream's put back together. The gateway hands the latter as a callable, so
    it is put together only if a policy reads it (the cache does; the usage row does not), and then once.
    """

    __slots__ = ("_body", "error", "status")

    def __init__(self, status: Literal["ok", "answered", "error", "cancelled"], error: GatewayError | None = None,
                 body: bytes | Callable[[], bytes | None] | None = None) -> None:
        self.status, self.error, self._body = status, error, body

    @property
    def body(self) -> bytes | None:
        body = self._body
        if callable(body):
            body = self._body = body()
        return body

    def __repr__(self) -> str:
        return f"Outcome({self.status!r}, error={self.error!r})"


@dataclass(slots=True)
class RequestContext:
    """Created per request by the handler; policies read it and write their findings into it."""

    request: ParsedRequest
    principal: Principal = ANONYMOUS
    request_id: str = ""
    user: str | None = None  # the request's `user` field or x-pointsman-user
    started: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() after which no new attempt starts
    decision: Any = None  # routing.router.Decision, once routed
    attempts: list[AttemptRecord] = field(default_factory=list)
    model: str | None = None  # the model that served
    route: str | None = None  # how it came to serve: manual | auto | fallback
    task: str | None = None  # the classifier's task, when the prompt was classified
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    cache: str | None = None  # hit | miss | bypass, set by a cache policy
    experiment: str | None = None  # NAME=VARIANT, set by an experiment policy
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers
    state: dict[str, Any] = field(default_factory=dict)  # per-policy scratch space, keyed by policy name
    settled: bool = False

    @property
    def ttft_s(self) -> float | None:
        """The time to the first token the client got: the last attempt's that has one. A stream continued on
        another deployment keeps its broken deployment's (booked when it failed); the continuation's has none."""
        for attempt in reversed(self.attempts):
            if attempt.ttft_s is not None:
                return attempt.ttft_s
        return None

    def record_usage(self, model: ModelConfig, prompt_tokens: int | None, completion_tokens: int | None) -> None:
        """The served model, its token counts and their cost (None while the model's price is unknown)."""
        self.model = model.id
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens
        price = model.known_pricing
        if price is not None and (prompt_tokens is not None or completion_tokens is not None):
            self.cost_usd = ((prompt_tokens or 0) * price.input_per_mtok
                             + (completion_tokens or 0) * price.output_per_mtok) / 1e6


def scope_member(scope: str, match: str | None, ctx: RequestContext, model: str | None) -> str | None:
    """Who in a budget's or a limit's scope (global, key, user, team, model) this request counts against: "*"
    for global, the caller's key ("anonymous" without one), user, team, or `model`; None when the scope does not
    apply to it (no user, no team, no model) or `match` names someone else. A model's versions are the model."""
    if scope == "global":
        return "*"
    if scope == "key":
        member: str | None = ctx.principal.key_id or "anonymous"
    elif scope == "user":
        member = ctx.user
    elif scope == "team":
        member = ctx.principal.team
    else:  # every version of a model (id@1.2.0) counts as the model
        member = model.partition("@")[0] if model else model
    if member is None or (match is not None and member != match):
        return None
    return member


def embedding_tokens(request: ParsedEmbeddings) -> int:
    """An embeddings request's input in tokens: text at 4 characters a token, token ids one each."""
    return sum(len(item) // 4 + 1 if isinstance(item, str) else len(item) for item in request.inputs)
