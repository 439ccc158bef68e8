"""The routing decision: expand a parsed `model` chain into the ordered models to try, and explain why."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from config.schema import Config, EmbeddingModel, ModelConfig
from protocol.errors import BadRequest, RateLimited
from protocol.openai import ChatCompletionRequest, ParsedRequest, message_text
from routing.classifier import PromptAnalysis
from routing.live import ModelLive
from routing.resolve import ModelTable, Plan
from routing.scoring import RATE_LIMITED, UNAVAILABLE, Candidate, Need, score_models

__all__ = ["Attempt", "Decision", "Router", "auto_excluded", "rough_prompt_tokens"]

_PREFER = {"quality": "quality", "cost": "cheap", "speed": "fast"}


@dataclass(frozen=True, slots=True)
class Attempt:
    model: ModelConfig
    route: str  # manual | auto | fallback: how this model came to serve


@dataclass(slots=True)
class Decision:
    attempts: list[Attempt]
    chain: list[str]
    analysis: PromptAnalysis | None = None
    candidates: list[Candidate] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    # filled in by the service for explanations: each chain model's deployments and their breaker states
    deployments: dict[str, list[dict]] = field(default_factory=dict)
    # the models' live state, set by the Router: read only when it is explained or nothing could be tried
    live: Mapping[str, ModelLive] | None = field(default=None, repr=False)

    @property
    def mode(self) -> str:
        return self.attempts[0].route if self.attempts else "none"

    def _waits(self) -> dict[str, float]:
        """The attempts' models that no deployment of takes requests now (every breaker refuses), with how
        soon one may: a request skips them (DeploymentPool.attempts)."""
        if not self.live:
            return {}
        waits = {}
        for attempt in self.attempts:
            live = self.live.get(attempt.model.id)
            wait = live.retry_in_s() if live is not None else None
            if wait is not None:
                waits[attempt.model.id] = wait
        return waits

    def retry_after(self) -> int | None:
        """Whole seconds (at least 1) until a deployment of one of the attempts' models may take requests again,
        when their breakers refuse them now: a Retry-After. None when one takes them now, or nothing is known."""
        wait = min(self._waits().values(), default=None)
        return None if wait is None else max(1, math.ceil(wait))

    def rate_limited(self) -> RateLimited | None:
        """A 429 with `retry-after` when rate-limit holds are what keep every model that would serve out (each
        deployment got a 429 with a Retry-After lately): the client should slow down, as the upstream asked; else
        None. Those models are the attempts', or, when automatic routing found none eligible, the candidates it
        set aside as held, provided none was set aside as down (then the 503 says so)."""
        if not self.live:
            return None
        if self.attempts:
            models = [a.model.id for a in self.attempts]
        elif any(c.reason == UNAVAILABLE for c in self.candidates):
            return None
        else:
            models = [c.model for c in self.candidates if c.reason == RATE_LIMITED]
        lives = [self.live.get(model_id) for model_id in models]
        if not lives or any(live is None or not live.rate_limited() for live in lives):
            return None
        error = RateLimited(f"Every deployment of {', '.join(models)} is rate limited by its upstream (HTTP 429); "
                            "retry after the time it asked for.")
        waits = [wait for live in lives if live is not None and (wait := live.retry_in_s()) is not None]
        if waits:
            error.headers = {"retry-after": str(max(1, math.ceil(min(waits))))}
        return error

    def exclude(self, reasons: Mapping[str, str]) -> None:
        """Take these models out of the attempts, as skipped and ineligible candidates, each with its reason."""
        if not reasons:
            return
        self.attempts[:] = [a for a in self.attempts if a.model.id not in reasons]
        self.skipped.update(reasons)
        self.candidates = [replace(c, eligible=False, reason=reasons[c.model]) if c.eligible and c.model in reasons
                           else c for c in self.candidates]

    def _wait_reason(self, model_id: str, wait: float) -> str:
        live = self.live.get(model_id) if self.live else None
        why = ("rate limited by the upstream (HTTP 429 with a Retry-After)" if live is not None and live.rate_limited()
               else "circuit breakers open after repeated failures")
        return f"no deployment takes requests now: {why} (retry in {max(1, math.ceil(wait))} s)"

    def explain(self) -> dict:
        """As a request would go now: a model whose breakers all refuse is skipped (with when it may take
        requests again), the next one serves."""
        analysis = self.analysis
        attempts, skipped, candidates = self.attempts, self.skipped, self.candidates
        if waits := self._waits():
            attempts = [a for a in attempts if a.model.id not in waits]
            reasons = {model_id: self._wait_reason(model_id, wait) for model_id, wait in waits.items()}
            skipped = {**skipped, **reasons}
            candidates = [replace(c, eligible=False, reason=reasons[c.model]) if c.eligible and c.model in reasons
                          else c for c in candidates]
        return {
            "model": attempts[0].model.id if attempts else None,
            "mode": attempts[0].route if attempts else "none",
            "task": analysis.task if analysis else None,
            "task_confidence": round(analysis.confidence, 4) if analysis else None,
            "complexity": round(analysis.complexity, 4) if analysis else None,
            "prompt_tokens": analysis.tokens if analysis else None,
            "candidates": [
                {"model": c.model, "score": c.score, "components": c.components, "eligible": c.eligible,
                 "reason": c.reason}
                for c in candidates
            ],
            "chain": [a.model.id for a in attempts],
            "requested": self.chain,
            "skipped": skipped,
            "deployments": self.deployments,
        }


def rough_prompt_tokens(request: ParsedRequest) -> int:
    """A cheap upper-ish token estimate (4 characters a token) for context-window checks on the hot path."""
    body = request.body
    if isinstance(body, ChatCompletionRequest):
        chars = 0
        for m in body.messages:
            content = m.content
            chars += len(content) if type(content) is str else len(message_text(content))
        return chars // 4 + 4 * len(body.messages)
    prompt = body.prompt
    return len(prompt) // 4 if isinstance(prompt, str) else len(str(prompt)) // 4


def auto_excluded(config: Config) -> dict[str, str]:
    """Models automatic selection may not choose, with the reason: an embeddings model, `auto: false`, or outside
    routing.auto_pool."""
    excluded = {}
    for model in config.models:
        if isinstance(model, EmbeddingModel):
            excluded[model.id] = "an embeddings model: it serves /v1/embeddings only"
        elif not model.auto:
            excluded[model.id] = "excluded from automatic selection (auto: false)"
        elif not any(fnmatch.fnmatchcase(model.id, p) for p in config.routing.auto_pool):
            excluded[model.id] = "not in routing.auto_pool"
    return excluded


class Router:
    """Pure decisions over a snapshot of live figures; the service supplies them and executes the attempts."""

    def __init__(self, config: Config, table: ModelTable, live: Mapping[str, ModelLive],
                 available: Callable[[str], bool]) -> None:
        self.config = config
        self.table = table
        self.live = live
        self.available = available
        self.excluded = auto_excluded(config)

    def _need(self, request: ParsedRequest, analysis: PromptAnalysis | None) -> Need:
        limit = request.max_new_tokens
        output = limit or self.config.routing.expected_output_tokens
        route = request.body.route
        if analysis is None:
            return Need("chat", 0.0, 0.0, rough_prompt_tokens(request), output, limit, route)
        return Need(analysis.task, analysis.confidence, analysis.complexity, analysis.tokens, output, limit, route)

    def _score(self, profile_name: str, need: Need) -> list[Candidate]:
        prefer = need.requirements.prefer if need.requirements else None
        profile = self.table.profiles[_PREFER[prefer] if prefer else profile_name]
        availability = {m.id: self.available(m.id) for m in self.table.models}
        return score_models(self.table.models, profile, need, self.live, availability, self.excluded)

    def decide(self, plan: Plan, request: ParsedRequest, analysis: PromptAnalysis | None = None) -> Decision:
        # the request's needs are worked out only when something reads them: a manual request to a model with
        # no context_window (the hot path) never does
        need: Need | None = None
        decision = Decision([], list(plan.names), analysis, live=self.live)
        seen: set[str] = set()
        for position, element in enumerate(plan.chain):
            label = "fallback" if position else ("manual" if element.model is not None else "auto")
            if element.model is not None:
                model = element.model
                if isinstance(model, EmbeddingModel):
                    raise BadRequest(f"The model '{model.id}' is an embeddings model: use POST /v1/embeddings, or "
                                     "name a chat model.", param="model", code="model_not_supported")
                window = model.context_window
                if window is not None:
                    need = need or self._need(request, analysis)
                    if need.context_needed > window:
                        decision.skipped[model.id] = f"context window {window} too small"
                        continue
                if model.id not in seen:
                    seen.add(model.id)
                    decision.attempts.append(Attempt(model, label))
                continue
            need = need or self._need(request, analysis)
            candidates = self._score(element.profile or self.config.routing.default_profile, need)
            if not decision.candidates:
                decision.candidates = candidates
            for candidate in candidates:
                if candidate.eligible and candidate.model not in seen:
                    seen.add(candidate.model)
                    decision.attempts.append(Attempt(self.table.get(candidate.model), label))
        if decision.skipped and need is not None and request.body.fallback_mode != "none":  # none: no fallback
            self._fall_back_to_larger_context(decision, need, seen)
        return decision

    def _fall_back_to_larger_context(self, decision: Decision, need: Need, seen: set[str]) -> None:
        """A prompt too long for the requested model goes to one whose context fits, best scored first."""
        for candidate in self._score(self.config.routing.default_profile, need):
            if candidate.eligible and candidate.model not in seen:
                seen.add(candidate.model)
                decision.attempts.append(Attempt(self.table.get(candidate.model), "fallback"))
