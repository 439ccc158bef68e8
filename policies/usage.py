"""The usage policy: one usage row per request, whatever its ending, handed to the batched usage log."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import msgspec

from policies.base import COMPLETIONS, STAGES, no_op
from policies.context import Outcome, Reply, RequestContext
from policies.usage_log import UsageLog, UsageRow

__all__ = ["UsagePolicy"]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


class UsagePolicy:
    """Observes only: refuses nothing, and its settle costs one O(1) append (the log writes in batches)."""

    name: ClassVar[str] = "usage"
    stage: ClassVar[int] = STAGES["observe"]
    endpoints: ClassVar[frozenset[str]] = COMPLETIONS | {"embeddings"}

    def __init__(self, log: UsageLog) -> None:
        self.log = log

    @no_op
    async def admit(self, ctx: RequestContext) -> Reply | None:
        return None

    @no_op
    async def approve(self, ctx: RequestContext, decision: Any) -> None:
        return None

    async def settle(self, ctx: RequestContext, outcome: Outcome) -> None:
        self.log.add(row_of(ctx, outcome))


def row_of(ctx: RequestContext, outcome: Outcome) -> UsageRow:
    error = outcome.error
    experiment, _, variant = ctx.experiment.partition("=") if ctx.experiment else (None, "", None)
    return UsageRow(
        request_id=ctx.request_id,
        status=outcome.status,
        key_id=ctx.principal.key_id,
        user=ctx.user,
        team=ctx.principal.team,
        model_requested=ctx.request.body.model,
        model_served=ctx.model,
        route=ctx.route,
        task=ctx.task,
        prompt_tokens=ctx.prompt_tokens,
        completion_tokens=ctx.completion_tokens,
        cost_usd=ctx.cost_usd,
        latency_ms=_ms(time.monotonic() - ctx.started),
        ttft_ms=_ms(ctx.ttft_s),
        cache=ctx.cache,
        http_status=None if outcome.status == "cancelled" else (error.status if error is not None else 200),
        error_code=error.code if error is not None else None,
        experiment=experiment,
        variant=variant,
        completion_id=_completion_id(ctx, outcome, experiment),
    )


class _IdView(msgspec.Struct):
    id: str | None = None


_id_view = msgspec.json.Decoder(_IdView).decode


def _completion_id(ctx: RequestContext, outcome: Outcome, experiment: str | None) -> str | None:
    """The answer's id, for feedback. A plain answer's is read from its body (every other field skipped); a
    stream's answer is put together only for experiment requests, where feedback is what the results need."""
    if outcome.status != "ok" or (getattr(ctx.request.body, "stream", False) and experiment is None):
        return None
    body = outcome.body
    if not body:
        return None
    try:
        return _id_view(body).id
    except msgspec.DecodeError:
        return None
