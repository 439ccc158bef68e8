"""The Litestar app factory: OpenAI-compatible routes, health/readiness, one OpenAI-shaped error handler."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import msgspec
from litestar import Litestar, MediaType, Request, Response, Router, get, post
from litestar.exceptions import HTTPException, ValidationException
from litestar.params import FromPath
from litestar.routes import HTTPRoute
from litestar.types import ASGIApp, Receive, Scope

from backends.base import Backend
from config.schema import Config
from gateway.admin import admin_router
from gateway.admin_analytics import analytics_router
from gateway.admin_experiments import experiments_router
from gateway.admin_keys import keys_router
from gateway.admin_templates import templates_router
from gateway.anthropic import anthropic_error, anthropic_router, under_messages
from gateway.auth import ANALYTICS, READ, USE, Authenticator, principal_of
from gateway.dashboard import dashboard_router
from gateway.drain import Drain
from gateway.generate import generate, request_context
from gateway.hot_routes import document, hot_route, route_directly
from gateway.metrics import CONTENT_TYPE_LATEST, Metrics, observe_policies
from gateway.openapi import (
    CHAT,
    CHAT_OK,
    COMPLETION,
    COMPLETION_OK,
    EMBEDDINGS,
    EMBEDDINGS_ERRORS,
    EMBEDDINGS_OK,
    GENERATE_ERRORS,
    ROUTE,
    ROUTE_ERRORS,
    add_schemas,
    document_errors,
    documented,
    openapi_config,
    takes,
)
from gateway.pipeline import Pipeline
from gateway.request_id import request_id_of, request_ids
from gateway.responses import JSONBody, Watches
from gateway.responses_api import responses_router
from gateway.service import Gateway, restart_required
from gateway.storage import Storage
from gateway.websocket import websocket_router
from policies.api_keys import KeyStore
from policies.base import Policy, PolicyChain
from policies.context import Outcome, RequestContext
from policies.experiments import Feedback, add_feedback, decode_feedback
from policies.model_versions import VersionRegistry
from protocol.errors import INTERNAL_ERROR_BODY, BadRequest, GatewayError, http_error_body
from protocol.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    ParsedRequest,
    decode_embedding_request,
    decode_object,
    decode_request,
)

if TYPE_CHECKING:
    from gateway.tracing import Tracing  # imported (with OpenTelemetry) only when tracing is enabled

__all__ = ["create_app"]

log = logging.getLogger("pointsman")


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def _chat(scope: Scope, receive: Receive, body: bytes) -> ASGIApp:
    return await generate(scope, receive, decode_request(body, ChatCompletionRequest))


async def _completion(scope: Scope, receive: Receive, body: bytes) -> ASGIApp:
    return await generate(scope, receive, decode_request(body, CompletionRequest))


async def _embeddings(scope: Scope, receive: Receive, body: bytes) -> ASGIApp:
    parsed = decode_embedding_request(body)
    # `or`, as Litestar's request.headers.get did here before: an empty `user` takes the header's
    user = parsed.body.user or next(
        (v.decode("latin-1") for k, v in scope["headers"] if k == b"x-pointsman-user"), None)
    ctx = RequestContext(parsed, principal_of(scope), request_id_of(scope), user)  # type: ignore[arg-type]
    pipeline: Pipeline = scope["litestar_app"].state["pipeline"]  # type: ignore[typeddict-item]
    if pipeline.tracing is not None:  # the client's traceparent: the request span becomes its child
        pipeline.tracing.accept(ctx, scope["headers"])
    served = await pipeline.embed(ctx)
    if not pipeline.embedding_policies:
        return JSONBody(served.body, served.headers)
    return JSONBody(served.body, served.headers,
                    after=lambda: pipeline.settle_embedding(ctx, Outcome("ok", body=served.body)))


# the hottest routes: Litestar ASGI handlers (gateway/hot_routes.py), documented under the names Litestar gave them
HOT_ROUTES = (
    hot_route("/chat/completions", "V1ChatCompletionsChatCompletions", "Create a chat completion (OpenAI)",
              documented(CHAT, GENERATE_ERRORS, CHAT_OK), _chat),
    hot_route("/completions", "V1CompletionsCompletions", "Create a text completion (OpenAI, legacy)",
              documented(COMPLETION, GENERATE_ERRORS, COMPLETION_OK), _completion),
    hot_route("/embeddings", "V1EmbeddingsEmbeddings", "Create embeddings (OpenAI)",
              documented(EMBEDDINGS, EMBEDDINGS_ERRORS, EMBEDDINGS_OK), _embeddings),
)


async def _explain(request: Request) -> dict:
    """The routing decision for a chat request (or `{"prompt": ...}`); `model` defaults to `auto`."""
    data = await request.body()
    raw = decode_object(data) if data else {}
    if "messages" not in raw:
        prompt = raw.pop("prompt", None)
        if not isinstance(prompt, str):  # the field at fault: a 'prompt' sent that is no string, else 'messages'
            raise BadRequest("Send a chat request's 'messages', or a 'prompt' string.",
                             param="messages" if prompt is None else "prompt")
        raw["messages"] = [{"role": "user", "content": prompt}]
    if not any(k in raw for k in ("model", "auto_select", "preferred_model", "models")):
        raw["model"] = "auto"
    parsed = decode_request(raw, ChatCompletionRequest)
    decision = await _gateway(request).decide(parsed, True, principal_of(request.scope))
    budgets = request.app.state.storage.budgets
    if budgets is not None:  # models whose budgets this request would overrun are not tried: say so
        spent = await budgets.spent(request_context(request.scope, parsed, True), [a.model for a in decision.attempts])
        decision.exclude(spent)
    return _gateway(request).explain(decision)


@post("/route", status_code=200, summary="Explain the routing decision for a chat request, without calling a model",
      operation_class=documented(ROUTE, ROUTE_ERRORS))
async def explain_route(request: Request) -> dict:
    return await _explain(request)


@post(["/models/recommend"], status_code=200, summary="Recommend a model for a prompt (earlier prototype's shape)",
      operation_class=documented(ROUTE, ROUTE_ERRORS))
async def recommend(request: Request) -> dict:
    explanation = await _explain(request)
    eligible = [c for c in explanation["candidates"] if c["eligible"]]
    chosen = explanation["model"]
    best = next((c for c in eligible if c["model"] == chosen), None)
    task = explanation["task"]
    reasoning = (
        f"task '{task}' (confidence {explanation['task_confidence']}), complexity {explanation['complexity']}, "
        f"~{explanation['prompt_tokens']} prompt tokens; "
        + (f"{chosen} scored {best['score']} ({', '.join(f'{k} {v}' for k, v in best['components'].items())})"
           if best else f"{chosen} chosen by {explanation['mode']} routing")
    )
    return {
        "recommended_model": chosen,
        "confidence": best["score"] if best else 1.0,
        "alternatives": [{"model": c["model"], "score": c["score"]} for c in eligible if c["model"] != chosen],
        "reasoning": reasoning,
        "task": task,
        "mode": explanation["mode"],
    }


@get("/usage", summary="The caller's budgets (used and remaining in each period, when it resets) and rate limits "
                        "(requests and tokens left this minute)")
async def usage(request: Request) -> dict:
    storage: Storage = request.app.state.storage
    if storage.budgets is None and storage.rate_limits is None:
        return {"object": "usage", "budgets": [], "rate_limits": []}
    parsed = ParsedRequest(CompletionRequest(prompt=""), {})
    user = request.headers.get("x-pointsman-user")
    ctx = RequestContext(parsed, principal_of(request.scope), request_id_of(request.scope), user)
    return {"object": "usage", "budgets": [] if storage.budgets is None else await storage.budgets.remaining(ctx),
            "rate_limits": [] if storage.rate_limits is None else await storage.rate_limits.remaining(ctx)}


@post("/feedback", status_code=201, summary="Attach a score to an answer, by its completion id (experiments)",
      operation_class=takes(Feedback))
async def feedback(request: Request) -> dict:
    storage: Storage = request.app.state.storage
    if storage.engine is None:
        raise BadRequest("Feedback is kept in the database: set storage.database_url.")
    score = decode_feedback(await request.body())
    return await add_feedback(storage.engine, score, storage.usage.flush if storage.usage is not None else None,
                              principal_of(request.scope))


def _routable(gateway: Gateway, name: str) -> bool:
    """Whether `name` routes on its own (a model, alias, profile or chain), so an experiment may leave it be."""
    try:
        gateway.table.plan(name)
    except GatewayError:
        return False
    return True


@get("/models", summary="List the served models")
async def list_models(request: Request) -> ModelList:
    return _gateway(request).model_list(principal_of(request.scope))


@get("/models/{model_id:path}", summary="Retrieve one model (ids may contain '/')")
async def retrieve_model(request: Request, model_id: FromPath[str]) -> ModelCard:
    return _gateway(request).model_card(model_id.lstrip("/"), principal_of(request.scope))


@get("/health", summary="Liveness: the process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/metrics", summary="Prometheus metrics (metrics.enabled)", include_in_schema=False)
async def metrics_page(request: Request) -> Response:
    metrics: Metrics | None = request.app.state.metrics
    extra: Callable[[], bytes] | None = request.app.state.extra_metrics  # `pointsman engine`'s load gauges
    if metrics is None and extra is None:
        raise HTTPException(status_code=404, detail="Metrics are off: set metrics.enabled in the config.")
    page = await metrics.render() if metrics is not None else b""
    return Response(page + (extra() if extra is not None else b""), media_type=CONTENT_TYPE_LATEST)


@get("/ready", summary="Readiness: every eager model loaded or its upstream reachable")
async def ready(request: Request) -> Response:
    if request.app.state.drain.draining:  # SIGTERM: out of the load balancer first, then shut down
        return Response({"ready": False, "draining": True}, status_code=503)
    states = await _gateway(request).ready()
    status = 200 if all(states.values()) else 503
    return Response({"ready": status == 200, "models": states}, status_code=status)


def _render_gateway_error(request: Request, exc: GatewayError) -> Response:
    return Response(exc.body(), status_code=exc.status, media_type=MediaType.JSON,
                    headers={**exc.headers, "x-request-id": request_id_of(request.scope)})


def _render_http_error(request: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    message = exc.detail if status != 404 else f"Unknown route: {request.method} {request.url.path}"
    param = None
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list) and exc.extra:
        first = exc.extra[0]  # a query or path parameter Litestar could not convert: say which, as OpenAI does
        if isinstance(first, dict) and isinstance(first.get("key"), str):
            param = first["key"]
            message = f"Invalid value for '{param}': {first.get('message') or 'not accepted'}."
    path = request.url.path
    if under_messages(path):  # a wrong method or path under it
        return anthropic_error(request, status, str(message), getattr(exc, "headers", None))
    return Response(
        http_error_body(status, str(message), param),
        status_code=status,
        media_type=MediaType.JSON,
        headers={**(getattr(exc, "headers", None) or {}), "x-request-id": request_id_of(request.scope)},
    )


def _render_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return Response(
        INTERNAL_ERROR_BODY,
        status_code=500,
        media_type=MediaType.JSON,
        headers={"x-request-id": request_id_of(request.scope)},
    )


def create_app(config: Config, backends: Mapping[str, Backend] | None = None,
               policies: Iterable[Policy] = (), reload_from: Callable[[], Config] | None = None,
               tracing: Tracing | None = None, extra_metrics: Callable[[], bytes] | None = None) -> Litestar:
    """The app for one config. `backends` replaces the ones the config would build; `policies` run on every
    completion request in their fixed stage order; `reload_from` reads the config again for POST /admin/reload
    and SIGHUP (its models are reloaded; see Gateway.reload). `tracing` replaces the one `config.tracing` would
    build (tests hand one with an in-memory exporter)."""
    if tracing is None and config.tracing.enabled:
        from gateway.tracing import Tracing

        tracing = Tracing(config.tracing)
    gateway = Gateway(config, backends)
    storage = Storage(config.storage)
    versions = VersionRegistry(storage.engine, storage.state, {m.id: m.versions for m in config.models})
    drain = Drain(config.server.drain_s)
    auth = Authenticator(config.auth, KeyStore(storage.engine) if storage.engine is not None else None,
                         storage.state)

    reloading = asyncio.Lock()  # one reload at a time: a SIGHUP beside a POST never applies the older read last

    async def reload() -> dict:
        """Apply the config file's models and routing (Gateway.reload); name the sections that differ from the
        ones in force but wait for a restart (restart_required): in the answer, and in a warning."""
        if reload_from is None:
            raise BadRequest("This gateway was not started from a config file: there is nothing to reload.")
        async with reloading:
            try:
                fresh = await asyncio.to_thread(reload_from)  # reads and validates the file off the loop
            except Exception as exc:
                raise BadRequest(f"The config cannot be reloaded, nothing changed: {exc}") from exc
            try:
                summary = gateway.reload(fresh)
            except ValueError as exc:  # a model's backend cannot be built (a CA bundle not there): nothing switched
                raise BadRequest(f"The config cannot be reloaded, nothing changed: {exc}") from exc
            await versions.reconfigure({m.id: m.versions for m in fresh.models})
        # `config`: what the policies, auth, storage, metrics, tracing, logging and server were built from
        pending = restart_required(config, fresh)
        if pending:
            log.warning("config reload: %s changed but not applied; a restart applies them (SIGHUP restarts the "
                        "workers when there are several)", ", ".join(pending))
        return {"object": "reload", **summary, "restart_required": pending}

    def on_sighup() -> None:
        task = asyncio.get_running_loop().create_task(reload())
        task.add_done_callback(_log_reload)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await storage.start()
        await versions.start(gateway.apply_versions)  # the stages the database keeps, then followed
        auth.start()  # hears revocations from the other replicas
        drain.install()  # SIGTERM: /ready 503, then the server's shutdown after server.drain_s
        gateway.start()
        if reload_from is not None:
            with contextlib.suppress(RuntimeError, ValueError, NotImplementedError):  # main thread, POSIX only
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
        # what start-up built (the classifier's vocabulary, the app) lives as long as the process: out of the
        # collector's sight, a full collection no longer stalls requests for ~25 ms (bench/RESULTS.md)
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            drain.uninstall()
            await auth.aclose()
            await versions.aclose()
            await gateway.aclose()
            await storage.aclose()  # after the last request: its usage row is written too
            if tracing is not None:
                await asyncio.to_thread(tracing.shutdown)  # flushes the spans still batched

    # each family of routes admits its roles (gateway/auth.py); with auth off the public ones carry no guard
    use, read = auth.guards(USE), auth.guards(READ)
    # the completion routes add x-request-id themselves; Litestar's own responses get it from the middleware
    hot = Router(path="/v1", route_handlers=[route.handler for route in HOT_ROUTES], guards=use)
    v1_use = Router(path="/v1", route_handlers=[explain_route, recommend, feedback], guards=use,
                    middleware=[request_ids])
    v1_read = Router(path="/v1", route_handlers=[list_models, retrieve_model, usage], guards=read,
                     middleware=[request_ids])
    # the earlier prototype served /models/recommend without the /v1 prefix; keep that path working
    legacy = Router(path="/", route_handlers=[recommend], guards=use, middleware=[request_ids])
    probes = Router(path="/", route_handlers=[health, ready], middleware=[request_ids])
    scrape = Router(path="/", route_handlers=[metrics_page], guards=auth.guards(ANALYTICS), middleware=[request_ids])
    admin = admin_router(auth.admin_guard(), [request_ids])
    experiments_admin = experiments_router(auth.admin_guard(), [request_ids])
    templates_admin = templates_router(auth.admin_guard(), [request_ids])
    keys_admin = keys_router(auth.admin_guard(), [request_ids])
    # aggregates for admin and readonly keys, the rows themselves for admins only
    analytics_admin = analytics_router(auth.admin_guard(ANALYTICS), auth.admin_guard(), [request_ids])
    app = Litestar(
        route_handlers=[hot, v1_use, v1_read, legacy, probes, scrape, admin, experiments_admin, templates_admin,
                        keys_admin, analytics_admin,
                        websocket_router(use),  # /v1/chat/completions/ws, as the completions
                        responses_router(use),  # /v1/responses (OpenAI Responses API), as the completions
                        anthropic_router(use),  # /v1/messages (Anthropic), as the completions
                        dashboard_router([request_ids])],  # /dashboard: the page asks no key, its script sends one
        lifespan=[lifespan],
        exception_handlers={
            GatewayError: _render_gateway_error,
            HTTPException: _render_http_error,
            Exception: _render_unexpected,
        },
        openapi_config=openapi_config(read, [request_ids]),  # /openapi, as /v1/models: a key of any role
        request_max_body_size=int(config.server.max_body_mb * 2**20),  # 413 past it, sized or chunked
        type_encoders={msgspec.Struct: msgspec.to_builtins},
        logging_config=None,
    )
    add_schemas(app.openapi_schema.components)
    document(app.openapi_schema, "/v1", HOT_ROUTES)
    document_errors(app.openapi_schema)
    route_directly(app, HOT_ROUTES)
    _allow_every_method(app)
    app.state.gateway = gateway
    app.state.storage = storage
    app.state.auth = auth
    app.state.drain = drain
    app.state.reload = reload
    app.state.versions = versions
    # through the gateway: a reload replaces its model table
    keyed = auth.enabled and auth.keys is not None  # database keys, each with its own budget and rate limit
    own = storage.policies(config.policies, lambda name: gateway.table.resolve(name), keyed,
                           lambda name: gateway.table.first_id(name))
    own += storage.template_policy(config.templates)
    own += storage.experiment_policy(config.experiments, lambda name: _routable(gateway, name),
                                     lambda name: gateway.table.ids_of(name))
    app.state.metrics, observing = observe_policies(config, gateway, storage.budgets)  # metrics and JSON request lines
    app.state.extra_metrics = extra_metrics
    own += observing
    app.state.pipeline = Pipeline(gateway, PolicyChain([*policies, *own]), tracing)
    app.state.watches = Watches()
    return app


_DEFAULT_OPTIONS = "HTTPRoute.create_options_handler.<locals>.options_handler"


def _allow_every_method(app: Litestar) -> None:
    """Litestar 2 answers OPTIONS on a path with several handlers (GET and POST /admin/keys) with the methods of
    the first one registered (litestar-org/litestar#4169, fixed only in v3): its default handler reads the route
    it was made for, which the next handler on the path replaced. Each is pointed at the route serving its path."""
    for route in app.routes:
        if isinstance(route, HTTPRoute):
            for handler in route.route_handlers:
                fn = handler.fn
                if fn.__qualname__ == _DEFAULT_OPTIONS and fn.__closure__:
                    fn.__closure__[fn.__code__.co_freevars.index("self")].cell_contents = route


def _log_reload(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("SIGHUP: %s", task.exception())
