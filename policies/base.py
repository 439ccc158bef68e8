"""The Policy protocol (admit / approve / settle) and the chain that runs policies in their fixed order."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ClassVar, Protocol, runtime_checkable

from policies.context import Outcome, Reply, RequestContext

__all__ = ["COMPLETIONS", "STAGES", "Policy", "PolicyChain", "no_op"]

log = logging.getLogger("pointsman.policies")

# The fixed order: a policy's stage comes from its class, never from config. Cheap refusals first (a rate limit
# costs nothing to check), rewrites before the cache (the cache keys on what is actually routed), budgets last.
STAGES: dict[str, int] = {
    "rate_limit": 10,
    "template": 20,
    "version": 30,
    "experiment": 40,
    "cache": 50,
    "budget": 60,
    "observe": 90,  # usage rows, metrics: see every outcome, refuse nothing
}


# the endpoints a policy runs on unless it says otherwise (`endpoints`): the ones whose requests every policy reads
COMPLETIONS = frozenset({"chat", "completion"})


def no_op(hook: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Marks a hook that does nothing, so the chain never calls it (a coroutine less per request and hook)."""
    hook.no_op = True  # type: ignore[attr-defined]
    return hook


def _uses(policy: Policy, hook: str) -> bool:
    return not getattr(getattr(type(policy), hook, None), "no_op", False)


@runtime_checkable
class Policy(Protocol):
    """One policy. Every hook may raise a GatewayError to refuse the request (a 429, a 402...).

    - `admit(ctx)` runs before routing: return a Reply to answer the request here (a cache hit), or rewrite
      `ctx.request` (a template, an experiment arm); None lets the request go on.
    - `approve(ctx, decision)` runs after routing, before any model runs (reserve budget at the chosen price).
    - `settle(ctx, outcome)` runs exactly once per request however it ended: after a plain response, after a
      stream's last chunk, when the client left, when it failed, and when an earlier hook refused it.

    A hook that does nothing is marked `@no_op`: the chain then skips it. A policy runs on chat and text
    completions; one that also understands other requests lists every endpoint
    it runs on in a class attribute `endpoints` (e.g. `COMPLETIONS | {"embeddings"}`).
    """

    name: ClassVar[str]
    stage: ClassVar[int]

    async def admit(self, ctx: RequestContext) -> Reply | None: ...

    async def approve(self, ctx: RequestContext, decision: Any) -> None: ...

    async def settle(self, ctx: RequestContext, outcome: Outcome) -> None: ...


class PolicyChain:
    """The configured policies sorted by stage (ties keep registration order); empty costs one branch. Each
    hook runs over the policies that use it (see `no_op`)."""

    __slots__ = ("_admit", "_approve", "_settle", "policies")

    def __init__(self, policies: Iterable[Policy] = ()) -> None:
        self.policies: tuple[Policy, ...] = tuple(sorted(policies, key=lambda p: p.stage))
        self._admit = tuple(p for p in self.policies if _uses(p, "admit"))
        self._approve = tuple(p for p in self.policies if _uses(p, "approve"))
        self._settle = tuple(p for p in self.policies if _uses(p, "settle"))

    def __bool__(self) -> bool:
        return bool(self.policies)

    def for_endpoint(self, endpoint: str) -> PolicyChain:
        """The policies that run on `endpoint` (see Policy), in the same order."""
        return PolicyChain(p for p in self.policies if endpoint in getattr(p, "endpoints", COMPLETIONS))

    async def admit(self, ctx: RequestContext) -> Reply | None:
        for policy in self._admit:
            reply = await policy.admit(ctx)
            if reply is not None:
                return reply
        return None

    async def approve(self, ctx: RequestContext, decision: Any) -> None:
        for policy in self._approve:
            await policy.approve(ctx, decision)

    async def settle(self, ctx: RequestContext, outcome: Outcome) -> None:
        """Every policy's settle, once per request: a failing settle is logged and does not stop the others."""
        if ctx.settled:
            return
        ctx.settled = True
        for policy in self._settle:
            try:
                await policy.settle(ctx, outcome)
            except Exception:
                log.exception("policy %s failed to settle request %s", policy.name, ctx.request_id)
