"""Resolve the `model` field: an id or alias (manual), `id@version`, a profile (`auto`, `auto-fast`...), or an
`a:b:c` chain of them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from config.schema import Config, ModelConfig, Profile
from protocol.errors import BadRequest, GatewayError, ModelNotFound
from protocol.openai import ChatCompletionRequest, CompletionRequest

__all__ = ["Element", "ModelArchived", "ModelTable", "Plan", "Versions", "requested_chain"]


class ModelArchived(GatewayError):
    """`id@version` names a version that was archived: gone for good (410)."""

    status = 410
    type = "invalid_request_error"
    code = "model_archived"


@dataclass(frozen=True, slots=True)
class Versions:
    """A model's versions as routing sees them: every version's stage, the served ones' configs (id@version),
    and the version `id` resolves to (None: no version is in production, `id` serves the model's own config)."""

    stages: Mapping[str, str]
    configs: Mapping[str, ModelConfig] = field(default_factory=dict)
    serving: str | None = None


@dataclass(frozen=True, slots=True)
class Element:
    """One element of a chain: a configured model (manual) or a routing profile (automatic selection)."""

    name: str  # as the client wrote it
    model: ModelConfig | None = None
    profile: str | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    chain: tuple[Element, ...]
    # worked out once, where a known name's plan is kept: whether an element is a profile (automatic selection),
    # and the names as the client wrote them
    automatic: bool = field(init=False)
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "automatic", any(e.profile is not None for e in self.chain))
        object.__setattr__(self, "names", tuple(e.name for e in self.chain))


class ModelTable:
    """Every routable name, built once from the config: ids, aliases, `auto` and `auto-<profile>`."""

    def __init__(self, config: Config, versions: Mapping[str, Versions] | None = None) -> None:
        self.versions: Mapping[str, Versions] = versions or {}
        # what each id serves: its production version's config, else its own
        self.models: tuple[ModelConfig, ...] = tuple(self._served(m) for m in config.models)
        self.base_ids: tuple[str, ...] = tuple(m.id for m in config.models)
        self.profiles: dict[str, Profile] = config.routing.all_profiles
        self.by_name: dict[str, Element] = {}
        for name in self.profiles:
            routable = name if name.startswith("auto") else f"auto-{name}"
            self.by_name[routable] = Element(routable, profile=name)
        self.by_name["auto"] = Element("auto", profile=config.routing.default_profile)
        # models last: a configured id or alias always wins over a profile name
        for base, model in zip(config.models, self.models, strict=True):
            for name in (base.id, *base.aliases):
                self.by_name[name] = Element(name, model=model)
            versions = self.versions.get(base.id)
            for version_config in versions.configs.values() if versions else ():
                self.by_name[version_config.id] = Element(version_config.id, model=version_config)
        # longest first, so an id that itself contains ':' matches before its prefix does
        self._names = sorted(self.by_name, key=len, reverse=True)
        self._plans: dict[str, Plan] = {name: Plan((e,)) for name, e in self.by_name.items()}

    def _served(self, model: ModelConfig) -> ModelConfig:
        versions = self.versions.get(model.id)
        return versions.configs[versions.serving] if versions and versions.serving else model

    @property
    def ids(self) -> list[str]:
        return list(self.base_ids)

    def get(self, name: str) -> ModelConfig:
        element = self.by_name.get(name)
        if element is None or element.model is None:
            raise self.not_found(name)
        return element.model

    def ids_of(self, name: str) -> tuple[str, ...]:
        """The ids of the models `name` names: a model's or alias's own, a chain's elements' (an automatic element
        names none: it chooses among the models the caller may use); an unknown name, itself."""
        try:
            plan = self.plan(name)
        except GatewayError:
            return (name,)
        return tuple(e.model.id for e in plan.chain if e.model is not None)

    def first_id(self, name: str) -> str:
        """The id of the model `name` routes to first: a model's or alias's own, a chain's first element's; any
        other name (auto, a profile, an unknown one) unchanged."""
        try:
            plan = self.plan(name)
        except GatewayError:
            return name
        first = plan.chain[0].model if plan.chain else None
        return first.id if first is not None else name

    def resolve(self, name: str) -> str:
        """A model id or alias as its configured id; any other name (auto, a chain) unchanged."""
        element = self.by_name.get(name)
        return element.model.id if element is not None and element.model is not None else name

    def plan(self, name: str) -> Plan:
        """Parse `model`: a known name exactly (the hot path), else a ':' chain matched longest-name-first."""
        plan = self._plans.get(name)
        if plan is not None:
            return plan
        chain, i = [], 0
        while i <= len(name):
            match = next((n for n in self._names if self._matches_at(name, i, n)), None)
            if match is None:
                element_text = name[i:].split(":", 1)[0]
                raise self.not_found(element_text or name)
            chain.append(self.by_name[match])
            i += len(match) + 1
        return Plan(tuple(chain))

    @staticmethod
    def _matches_at(name: str, i: int, known: str) -> bool:
        """`known` sits at position i of `name` as a whole element: followed by the end or a ':'."""
        end = i + len(known)
        return name.startswith(known, i) and (end == len(name) or name[end] == ":")

    def plan_request(self, body: ChatCompletionRequest | CompletionRequest) -> Plan:
        if body.model and body.preferred_model is None and not body.auto_select and body.models is None:
            return self.plan(body.model)  # the hot path: one `model` name
        return Plan(tuple(e for name in requested_chain(body) for e in self.plan(name).chain))

    def not_found(self, name: str, may_use: Callable[[str], bool] | None = None) -> GatewayError:
        """The 404 for a model `name` that is not served: it lists the models there are, or with `may_use` (an API
        key's models) only those the caller may use, as OpenAI's lists only a key's own. The error keeps `name`
        (`model_name`), so that it can be worded again for a key (Gateway.decide)."""
        base, at, version = name.rpartition("@")
        versions = self.versions.get(base) if at and (may_use is None or may_use(base)) else None
        error: GatewayError
        if versions is not None and versions.stages.get(version) == "archived":
            error = ModelArchived(f"Version {version} of the model '{base}' is archived: it no longer serves. "
                                  f"Send '{base}' for its production version.", param="model")
        elif versions is not None:  # id@version, neither served nor known: say which
            known = ", ".join(f"{v} ({s})" for v, s in versions.stages.items() if s != "archived")
            error = ModelNotFound(f"The model '{base}' has no version '{version}'. Versions: {known or 'none'}.",
                                  param="model", code="model_not_found")
        else:
            ids = self.ids if may_use is None else [i for i in self.ids if may_use(i)]
            error = ModelNotFound(
                f"The model '{name}' does not exist. Available models: {', '.join(ids) or 'none'} "
                f"(or auto, {', '.join(n for n, e in self.by_name.items() if e.profile and n != 'auto')}).",
                param="model",
            )
        error.model_name = name  # type: ignore[attr-defined]
        return error

def requested_chain(body: ChatCompletionRequest | CompletionRequest) -> list[str]:
    """The names the client asked for, in order, from `model` and the fields other clients use:
    `auto_select: true`, `preferred_model` + `fallback_mode` (auto | none | a model), OpenRouter's `models`.
    Their types were checked when the body was decoded; this only orders them."""
    names: list[str] = []
    if body.auto_select:
        names.append("auto")
    elif body.preferred_model is not None:
        names.append(body.preferred_model)
        mode = body.fallback_mode or "auto"
        if mode != "none":
            names.append(mode)
    elif body.model:
        names.append(body.model)
    if body.models:
        names.extend(n for n in body.models if n not in names)
    if not names:
        raise BadRequest("You must provide a model parameter.", param="model")
    return names
