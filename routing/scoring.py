"""Score models for automatic selection: quality for the task, cost, latency and load, each in [0, 1]."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from config.schema import ModelConfig, Profile
from protocol.openai import RouteRequirements
from routing.live import ModelLive

__all__ = ["CONTEXT_TOO_SMALL", "RATE_LIMITED", "UNAVAILABLE", "Candidate", "Need", "score_models"]


@dataclass(frozen=True, slots=True)
class Need:
    """What the request needs: its task, complexity and size (prompt tokens, expected completion tokens)."""

    task: str
    confidence: float
    complexity: float
    prompt_tokens: int
    output_tokens: int  # expected completion length, for the cost estimate
    max_tokens: int | None = None  # the request's own limit: prompt + this must fit the context window
    requirements: RouteRequirements | None = None

    @property
    def context_needed(self) -> int:
        return self.prompt_tokens + (self.max_tokens or 1)


@dataclass(frozen=True, slots=True)
class Candidate:
    model: str
    score: float
    components: dict[str, float] = field(default_factory=dict)
    eligible: bool = True
    reason: str = ""
    unmet: str | None = None  # the request's own `route` requirement it fails, whatever else keeps it out


def _quality(model: ModelConfig, need: Need) -> float:
    # a task left out of `capabilities` scores 0.5; an unsure classifier leans toward that neutral value
    capability = model.capabilities.get(need.task, 0.5)
    fit = need.confidence * capability + (1 - need.confidence) * 0.5
    base = 0.6 * fit + 0.4 * model.quality
    # a complex prompt leans on the model's overall tier
    lean = 0.5 * need.complexity
    return (1 - lean) * base + lean * model.quality


def _expected_latency(live: ModelLive | None) -> float | None:
    """Observed whole-request latency (EWMA), else time to first token; None until the model has served."""
    if live is None:
        return None
    latency = live.latency_s
    return latency if latency is not None else live.ttft_s


def _cost(model: ModelConfig, need: Need) -> float | None:
    """Expected USD for this request, or None when the model's price is unknown."""
    price = model.known_pricing
    if price is None:
        return None
    return (need.prompt_tokens * price.input_per_mtok + need.output_tokens * price.output_per_mtok) / 1e6


UNAVAILABLE = "no deployment available (circuit open or unhealthy)"
CONTEXT_TOO_SMALL = "context window"  # how the reason of a candidate whose window the prompt overruns begins
RATE_LIMITED = "every deployment rate limited by its upstream (HTTP 429 with a Retry-After)"


def _ineligible(model: ModelConfig, need: Need, available: bool, excluded: str, held: bool) -> str:
    if excluded:
        return excluded
    if not available:
        return RATE_LIMITED if held else UNAVAILABLE
    window = model.context_window
    needed = need.context_needed
    if window is not None and needed > window:
        return f"{CONTEXT_TOO_SMALL} {window} < {needed} tokens needed"
    return ""


def _unmet(model: ModelConfig, need: Need, latency: float | None) -> str:
    """The request's own `route` requirement the model fails, "" when none."""
    req = need.requirements
    if req is not None:
        if req.min_quality is not None and model.quality < req.min_quality:
            return f"quality {model.quality} < min_quality {req.min_quality}"
        if req.max_latency_s is not None and latency is not None and latency > req.max_latency_s:
            return f"expected latency {latency:.2f}s > max_latency_s {req.max_latency_s}"
    return ""


def score_models(
    models: Sequence[ModelConfig],
    profile: Profile,
    need: Need,
    live: Mapping[str, ModelLive],
    available: Mapping[str, bool],
    excluded: Mapping[str, str] | None = None,
) -> list[Candidate]:
    """Every model scored; eligible ones first by score (ties: config order), then the ineligible with a reason.

    `excluded` maps models kept out of automatic selection to the reason. An unknown price scores a neutral
    0.5 on cost (neither free nor the dearest), and the candidate's reason says so. Pure: the same models,
    state and need always give the same order.
    """
    excluded = excluded or {}
    costs = [_cost(m, need) for m in models]
    latencies = [_expected_latency(live.get(m.id)) for m in models]
    max_cost = max((c for c in costs if c is not None), default=0.0)
    known = [x for x in latencies if x is not None and x > 0]
    fastest = min(known, default=None)
    weights = (profile.quality, profile.cost, profile.latency, profile.load)
    total = sum(weights) or 1.0
    scored: list[tuple[bool, float, int, Candidate]] = []
    for index, (model, cost, latency) in enumerate(zip(models, costs, latencies, strict=True)):
        state = live.get(model.id)
        components = {
            "quality": round(_quality(model, need), 4),
            "cost": 0.5 if cost is None else round(1.0 - cost / max_cost, 4) if max_cost > 0 else 1.0,
            # unknown latency is neutral until the model has served something
            "latency": round(fastest / latency, 4) if fastest and latency else 0.5,
            "load": round(1.0 - state.load, 4) if state is not None else 1.0,
        }
        score = sum(w * c for w, c in zip(weights, components.values(), strict=True)) / total
        unmet = _unmet(model, need, latency)  # kept on the candidate also when another reason comes first
        usable = available.get(model.id, True)
        held = not usable and state is not None and state.rate_limited()
        reason = _ineligible(model, need, usable, excluded.get(model.id, ""), held) or unmet
        if not reason:
            reason = "eligible" if cost is not None else "eligible; price unknown (no pricing), cost scored 0.5"
        candidate = Candidate(model.id, round(score, 4), components, reason.startswith("eligible"), reason,
                              unmet or None)
        scored.append((not candidate.eligible, -score, index, candidate))
    scored.sort(key=lambda row: row[:3])
    return [row[3] for row in scored]
