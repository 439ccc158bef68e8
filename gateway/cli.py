"""The `pointsman` command: `serve` the gateway (uvicorn, httptools, uvloop), serve one model alone as an
`engine`, `check-config` a file, and `admin` a running gateway (gateway/admin_cli.py)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from config.loader import ConfigError, load_config
from config.schema import Config
from gateway.admin_cli import add_admin_parser

__all__ = ["main", "run_server"]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _load(path: str | None) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"pointsman: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _refuse_open_bind(host: str, config: Config) -> bool:
    """True (after saying why) when `host` is reachable from the network and no API key protects it."""
    if _is_loopback(host) or config.auth.enabled:
        return False
    print(
        f"pointsman: refusing to bind {host} with no auth.api_keys: anyone on the network could use it. "
        "Set auth.api_keys (e.g. api_keys: [\"${POINTSMAN_KEY}\"]) or POINTSMAN_ADMIN_KEY, or bind 127.0.0.1.",
        file=sys.stderr,
    )
    return True


def _announce_when_ready(url: str, config: Config, stop: threading.Event) -> None:
    """Print the URL once the server answers, and the served models once every eager one is ready."""
    listening = False
    while not stop.wait(0.1):
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as response:
                ready = response.status == 200
        except urllib.error.HTTPError as exc:
            ready = False
            if not listening:
                try:
                    waiting = [m for m, ok in json.loads(exc.read() or b"{}").get("models", {}).items() if not ok]
                except (ValueError, AttributeError):  # not our /ready's body
                    waiting = []
                print(f"pointsman: listening on {url}/v1, loading: {', '.join(waiting)}", flush=True)
                listening = True
        except OSError:
            continue
        if ready:
            names = ", ".join(f"{m.id} ({m.backend_kind})" for m in config.models)
            print(f"pointsman: ready at {url}/v1 serving {names}", flush=True)
            return


def serve(args: argparse.Namespace) -> int:
    path = args.config or os.environ.get("POINTSMAN_CONFIG") or None
    config = _load(path)
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    workers = args.workers if args.workers is not None else config.server.workers
    if not 1 <= port <= 65535 or not 1 <= workers <= 64:  # what the config's own server.port and .workers allow
        print(f"pointsman: --port must be 1-65535 and --workers 1-64; got {port} and {workers}", file=sys.stderr)
        return 2
    if _refuse_open_bind(host, config) or _refuse_split_state(config, workers) or _refuse_taken_port(host, port):
        return 2

    if config.storage.database_url:
        # once, before the workers start: each worker's own check then finds the database at the newest revision
        # (several workers creating SQLite tables at once would race)
        import asyncio

        from policies.database import migrate

        try:
            asyncio.run(migrate(config.storage.database_url))
        except Exception as exc:  # unreachable, or not ours to migrate: say which, in one line
            print(f"pointsman: cannot prepare the database {config.storage.database_url}: "
                  f"{type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
            return 2
    # workers import gateway.asgi:make_app, which reads the same file
    os.environ["POINTSMAN_CONFIG"] = os.path.abspath(path) if path else ""
    from gateway.admin import WORKERS_ENV

    os.environ[WORKERS_ENV] = str(workers)  # POST /admin/reload reaches one worker: refused when there are several
    engines = _engines_for_workers(config, workers)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    stop = threading.Event()
    threading.Thread(target=_announce_when_ready, args=(url, config, stop), daemon=True).start()
    metrics_dir = _metrics_dir(workers)
    try:
        run_server(config, host, port, workers, vet_reload=lambda count: _refused_reload(path, count))
    finally:
        stop.set()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        if engines is not None:
            engines.stop()
    return 0


def _refuse_taken_port(host: str, port: int) -> bool:
    """A port something else listens on, refused in one line before anything starts (the readiness announcer
    would otherwise have greeted the other server as this one)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            sock.bind((host, port))
        except OSError as exc:
            print(f"pointsman: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
            return True
    return False


def _split_state(config: Config, workers: int) -> str | None:
    """Why `workers` workers cannot serve `config`: without Redis each would keep its own rate limits, budgets and
    cache, so a limit would let through `workers` times what it says. None when they can."""
    if workers <= 1 or config.storage.redis_url:
        return None
    policies = config.policies
    split = [name for name, used in (("rate limits", policies.rate_limits), ("budgets", policies.budgets),
                                     ("the cache", policies.cache is not None and policies.cache.mode != "off"))
             if used]
    if not split:
        return None
    return (f"{workers} workers need storage.redis_url for {', '.join(split)}: without Redis each worker would "
            "keep its own (a limit would let through that many times what it says)")


def _refuse_split_state(config: Config, workers: int) -> bool:
    """Several workers that would split state (`_split_state`) are refused, with a line saying so; stored
    Responses (/v1/responses) would only be found on the worker that stored them: warned."""
    if (reason := _split_state(config, workers)) is not None:
        print(f"pointsman: {reason}", file=sys.stderr)
        return True
    if workers > 1 and not config.storage.redis_url:
        print(f"pointsman: {workers} workers without storage.redis_url: stored responses (/v1/responses) are found "
              "only on the worker that stored them", file=sys.stderr)
    return False


def _refused_reload(path: str | None, workers: int) -> str | None:
    """Why a SIGHUP must not replace the workers (their new copies read the file again): it no longer loads, or it
    turns on what `workers` workers cannot keep without Redis (`_split_state`). None to go ahead."""
    try:
        return _split_state(load_config(path), workers)
    except ConfigError as exc:
        return f"config error: {exc}"


def _metrics_dir(workers: int) -> str | None:
    """With several workers, a fresh directory for prometheus-client's multiprocess mode (set before the workers
    import it; removed on exit), so any worker's /metrics counts every worker's requests. Made with metrics off
    too: a SIGHUP's new workers read the file again and may turn them on (each would count only its own; an
    unused directory stays empty). None with one worker, or when the operator set PROMETHEUS_MULTIPROC_DIR
    (theirs to clean)."""
    if workers <= 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    path = tempfile.mkdtemp(prefix="pointsman-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def _engines_for_workers(config: Config, workers: int) -> Any:
    """With several workers, the `launch:` engines run once, here in the parent (one per worker would fight
    over the port); the workers reach them as plain upstreams. None when there is nothing to run here."""
    launched = [m for m in config.models if getattr(m, "launch", None) is not None]
    if workers <= 1 or not launched:
        return None
    import logging

    from backends.supervisor import ENGINES_IN_PARENT, EngineHost

    logging.basicConfig(level=os.environ.get("POINTSMAN_LOG_LEVEL", "INFO").upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ[ENGINES_IN_PARENT] = "1"
    host = EngineHost(launched)
    host.start()
    return host


def engine(args: argparse.Namespace) -> int:
    """One model of the config (the built-in one without --config) as an OpenAI-compatible server with vLLM's
    load gauges on /metrics: what a gateway's `launch:` runs, so several workers share one loaded model."""
    from gateway.engine_server import create_engine_app, engine_config, find_model

    config = _load(args.config)  # not POINTSMAN_CONFIG: a launched engine inherits the gateway's environment
    model = find_model(config, args.model)
    if model is None:
        print(f"pointsman: no model {args.model!r} in the config; it has: {', '.join(m.id for m in config.models)}",
              file=sys.stderr)
        return 2
    config = engine_config(config, model, args.host, args.port)
    if _refuse_open_bind(args.host, config):
        return 2
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"

    def make_app() -> Any:  # one worker: a callable factory, no import string (and no POINTSMAN_CONFIG) needed
        import logging

        logging.basicConfig(level=os.environ.get("POINTSMAN_LOG_LEVEL", "INFO").upper(),
                            format="%(levelname)s %(name)s: %(message)s")
        return create_engine_app(config)

    stop = threading.Event()
    threading.Thread(target=_announce_when_ready, args=(url, config, stop), daemon=True).start()
    try:
        run_server(config, args.host, args.port, 1, app=make_app)
    finally:
        stop.set()
    return 0


def run_server(config: Config, host: str, port: int, workers: int,
               app: str | Callable[[], Any] = "gateway.asgi:make_app",
               vet_reload: Callable[[int], str | None] | None = None) -> None:
    """Serve `app` (an ASGI app factory: an import string each worker imports, or with one worker a callable)
    until SIGINT/SIGTERM, then drain. With several workers, `vet_reload(workers)` says why a SIGHUP must keep
    the running workers (None: replace them)."""
    import uvicorn

    from gateway.server import http_protocol
    from gateway.websocket import WebSocketProtocol

    # uvicorn re-raises the stop signal after its graceful shutdown, restoring the handlers it found: with
    # these in place that re-raise is a no-op and a drained stop exits 0
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    # uvicorn + httptools + uvloop: measured faster here than granian for this proxy (bench/RESULTS.md)
    options: dict[str, Any] = dict(
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        # httptools plus read timeouts, a header size limit and HTTP/1.0 framing; it pickles into the workers
        http=http_protocol(
            config.server.header_timeout_s, config.server.body_timeout_s, config.server.max_header_bytes
        ),
        lifespan="on",
        ws=WebSocketProtocol,  # uvicorn's own, but quiet about a refused upgrade (gateway/websocket.py)
        ws_max_size=int(config.server.max_body_mb * 2**20),  # a larger WebSocket message closes the socket (1009)
        access_log=False,
        log_level=os.environ.get("POINTSMAN_LOG_LEVEL", "info").lower(),
        # on SIGINT/SIGTERM: stop accepting, let in-flight requests finish for up to this long
        timeout_graceful_shutdown=config.server.shutdown_grace_s,
        # a new worker imports the gateway before it answers the parent's pings: seconds on a loaded host, where
        # uvicorn's 5 s killed one at start-up (and aborted a SIGHUP's restart halfway)
        timeout_worker_healthcheck=30,
    )
    if workers <= 1:
        uvicorn.run(app, **options)
        return
    from gateway.workers import RELOADING_ENV, WorkerSupervisor

    flags = Path(tempfile.mkdtemp(prefix="pointsman-workers-"))
    os.environ[RELOADING_ENV] = str(flags / "reloading")  # before the workers start: they inherit it
    server_config = uvicorn.Config(app, **options)
    try:
        WorkerSupervisor(server_config, [server_config.bind_socket()], flags / "reloading", vet_reload).run()
    finally:
        shutil.rmtree(flags, ignore_errors=True)


def check_config(args: argparse.Namespace) -> int:
    config = _load(args.file)
    print(f"{args.file}: ok, {len(config.models)} model(s): {', '.join(m.id for m in config.models)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pointsman", description="OpenAI-compatible LLM gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="serve the gateway")
    run.add_argument("--config", help="YAML config file (env POINTSMAN_CONFIG); default: the built-in config")
    run.add_argument("--host")
    run.add_argument("--port", type=int)
    run.add_argument("--workers", type=int)
    run.set_defaults(func=serve)
    one = commands.add_parser("engine", help="serve one model of the config alone, with /metrics (what launch: runs)")
    one.add_argument("--model", required=True, help="the model's id or alias")
    one.add_argument("--config", help="YAML config file; default: the built-in config")
    one.add_argument("--host", default="127.0.0.1")
    one.add_argument("--port", type=int, required=True)
    one.set_defaults(func=engine)
    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    check.set_defaults(func=check_config)
    add_admin_parser(commands)  # `pointsman admin ...`: a running gateway's admin API
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
