"""Managed engines end to end: a gateway launches `pointsman engine` (a tiny real Llama), survives its kill -9,
polls its /metrics as vLLM's, and leaves no child behind, also when the gateway itself is killed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from backends.openai_upstream import OpenAIBackend
from config.schema import VLLMModel
from tests.conftest import ROOT, free_port, http, start_gateway
from tests.tiny_model import build_tiny_model

POINTSMAN_SCRIPT = str(Path(sys.executable).with_name("pointsman"))
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(folder)
    return folder


def children(pid: int) -> list[int]:
    """The live (non-zombie) processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until `condition` holds, polling every 50 ms."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout} s")
        time.sleep(0.05)


def the_engine(gateway_pid: int) -> int:
    """The gateway's one child process: the engine it launched."""
    deadline = time.monotonic() + 30
    while len(found := children(gateway_pid)) != 1:
        if time.monotonic() > deadline:
            raise TimeoutError(f"expected one engine child of {gateway_pid}, found {found}")
        time.sleep(0.05)
    return found[0]


def managed_config(tmp: Path, model_dir: Path, port: int) -> str:
    engine_yaml = tmp / "engine.yaml"
    engine_yaml.write_text(f"""
models:
  - id: tiny-local
    backend: transformers
    source: {model_dir}
    max_new_tokens_default: 8
""")
    return f"""
routing: {{health_check_s: 0.5, retries: 0}}
models:
  - id: tiny
    backend: vllm
    upstream_model: tiny-local
    context_window: 512
    timeout_s: 30
    launch:
      command: [{POINTSMAN_SCRIPT}, engine, --model, tiny-local, --config, {engine_yaml}]
      args: [--port, "{port}"]
      port: {port}
      startup_timeout_s: 120
"""


def test_gateway_restarts_a_killed_engine_and_stops_it_on_shutdown(tiny_model: Path, tmp_path: Path) -> None:
    engine_port = free_port()
    gateway = start_gateway(tmp_path, managed_config(tmp_path, tiny_model, engine_port))  # /ready: engine is up
    try:
        status, headers, body = http("POST", gateway.url + "/v1/chat/completions", CHAT)
        assert status == 200, body
        answer = json.loads(body)
        assert answer["model"] == "tiny" and answer["usage"]["completion_tokens"] >= 1
        first = the_engine(gateway.proc.pid)

        # the engine's /metrics reads as vLLM's to the gateway's poller
        polled = msgspec.convert({"id": "tiny", "upstream_model": "tiny-local",
                                  "base_url": f"http://127.0.0.1:{engine_port}/v1"}, VLLMModel)

        async def probe():
            backend = OpenAIBackend(polled)
            try:
                return await backend.probe(0)
            finally:
                await backend.aclose()

        healthy, load = asyncio.run(probe())
        assert healthy and load is not None
        assert (load.running, load.waiting, load.kv_cache_usage) == (0.0, 0.0, 0.0)

        os.kill(first, signal.SIGKILL)
        # the restart waits at least the first backoff (1 s): until then requests fail, OpenAI-shaped and fast
        status, _, body = http("POST", gateway.url + "/v1/chat/completions", CHAT)
        assert status in (502, 503) and json.loads(body)["error"]["type"] == "api_error"
        until(lambda: http("POST", gateway.url + "/v1/chat/completions", CHAT, timeout=30)[0] == 200, 120,
              "requests resume after the restart")
        second = the_engine(gateway.proc.pid)
        assert second != first and not alive(first)
        assert "exited with -9" in gateway.output()
    finally:
        assert gateway.stop() == 0
    until(lambda: not alive(second), 20, "the engine stops with the gateway")
    assert not children(gateway.proc.pid)


def test_engine_dies_with_a_killed_gateway(tmp_path: Path) -> None:
    """The launched server gets SIGTERM from the kernel when the gateway is killed -9 (no orphan)."""
    port = free_port()
    config = f"""
models:
  - id: managed
    backend: openai
    upstream_model: mock
    launch:
      command: [{sys.executable}, {ROOT / "tests/e2e/upstream.py"}, --name, mock, --port, "{port}"]
      port: {port}
"""
    gateway = start_gateway(tmp_path, config)
    engine = None
    try:
        engine = the_engine(gateway.proc.pid)
        status, _, body = http("POST", gateway.url + "/v1/chat/completions",
                               {"model": "managed", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "echo: hi"
        gateway.stop(signal.SIGKILL)
        until(lambda: not alive(engine), 20, "the orphaned engine exits")
    finally:
        gateway.stop(signal.SIGKILL)
        if engine is not None and alive(engine):  # the test failed: clean up what it proved was left
            os.kill(engine, signal.SIGKILL)


def test_engine_reads_the_builtin_config_not_the_gateways_environment(tmp_path: Path) -> None:
    """A launched engine inherits POINTSMAN_CONFIG from `pointsman serve`: without --config it must still read
    the built-in config (here: to say which models it has)."""
    env = {**os.environ, "POINTSMAN_CONFIG": str(tmp_path / "gateway.yaml")}
    done = subprocess.run([POINTSMAN_SCRIPT, "engine", "--model", "nope", "--port", str(free_port())], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "no model 'nope' in the config; it has: smollm2-135m-instruct" in done.stderr


def test_several_workers_share_one_engine_run_by_the_parent(tmp_path: Path) -> None:
    """With --workers 2 the parent launches the engine once (one per worker would fight over its port)."""
    port = free_port()
    config = f"""
models:
  - id: managed
    backend: openai
    upstream_model: mock
    launch:
      command: [{sys.executable}, {ROOT / "tests/e2e/upstream.py"}, --name, mock, --port, "{port}"]
      port: {port}
"""
    gateway = start_gateway(tmp_path, config, args=("--workers", "2"))

    def engines() -> list[int]:
        return [pid for pid in children(gateway.proc.pid)
                if b"upstream.py" in (Path("/proc") / str(pid) / "cmdline").read_bytes()]

    try:
        launched = engines()
        assert len(launched) == 1
        for _ in range(4):  # whichever worker answers, the one engine does the work
            status, _, body = http("POST", gateway.url + "/v1/chat/completions",
                                   {"model": "managed", "messages": [{"role": "user", "content": "hi"}]})
            assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "echo: hi"
        assert engines() == launched
    finally:
        assert gateway.stop() == 0
    until(lambda: not alive(launched[0]), 20, "the engine stops with the gateway")
