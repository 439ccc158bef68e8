"""EngineSupervisor with real child processes: the mock OpenAI server (tests/e2e/upstream.py) and small scripts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from backends.openai_upstream import OpenAIBackend
from backends.supervisor import EngineStartupError, EngineSupervisor, EngineUnavailable, launch_argv
from config.schema import OpenAIModel, VLLMModel
from protocol.openai import ChatCompletionRequest, decode_request
from tests.conftest import ROOT, free_port

PY = sys.executable
MOCK = str(ROOT / "tests/e2e/upstream.py")


def alive(pid: int) -> bool:
    """The process exists and is no zombie (an orphan's reaper may be slow)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait until `condition` holds, polling every 20 ms, or fail the test."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


def mock_supervisor(port: int, **kwargs) -> EngineSupervisor:
    return EngineSupervisor("mock", [PY, MOCK, "--port", str(port), "--name", "mock"],
                            f"http://127.0.0.1:{port}/v1", **kwargs)


def chat(stream: bool = False):
    return decode_request({"model": "m", "messages": [{"role": "user", "content": "hello there"}],
                           "stream": stream}, ChatCompletionRequest)


def test_launch_argv_defaults_to_vllm_serve_and_appends_args() -> None:
    vllm = msgspec.convert({"id": "qwen", "upstream_model": "Qwen/Qwen2.5-0.5B",
                            "launch": {"port": 8100, "args": ["--max-model-len", "4096"]}}, VLLMModel)
    assert launch_argv(vllm) == ["vllm", "serve", "Qwen/Qwen2.5-0.5B", "--port", "8100", "--max-model-len", "4096"]
    assert vllm.base_url == "http://127.0.0.1:8100/v1"
    own = msgspec.convert({"id": "m", "launch": {"port": 9, "command": ["srv", "-p", "9"], "args": ["-v"]}},
                          OpenAIModel)
    assert launch_argv(own) == ["srv", "-p", "9", "-v"]
    with pytest.raises(ValueError, match="launch.command is required"):
        launch_argv(msgspec.convert({"id": "m", "launch": {"port": 9}}, OpenAIModel))
    with pytest.raises(ValueError, match="not deployments"):
        EngineSupervisor.for_model(msgspec.convert(
            {"id": "m", "deployments": [{"base_url": "http://h/v1"}], "launch": {"port": 9, "command": ["x"]}},
            OpenAIModel))


async def test_restarts_a_killed_engine_and_stops_it() -> None:
    sup = mock_supervisor(free_port(), backoff_base_s=0.05, stop_grace_s=5)
    await sup.start()
    assert sup.up and sup.restarts == 0
    first = sup.pid
    assert first is not None and alive(first)
    os.kill(first, signal.SIGKILL)
    await until(lambda: sup.restarts >= 1 and sup.up)
    second = sup.pid
    assert second is not None and second != first and alive(second)
    assert not alive(first)
    await sup.stop()
    assert sup.state == "stopped" and sup.pid is None
    assert not alive(second)
    with pytest.raises(EngineUnavailable):  # stopped: requests do not bring it back
        await sup.ensure()


async def test_down_engine_fails_fast_with_a_retryable_503() -> None:
    sup = mock_supervisor(free_port(), backoff_base_s=3600)  # stays down after the kill
    await sup.start()
    os.kill(sup.pid or 0, signal.SIGKILL)
    await until(lambda: sup.state == "backoff")
    with pytest.raises(EngineUnavailable) as caught:
        await sup.ensure()
    assert caught.value.status == 503 and caught.value.retryable
    assert "exited with -9" in caught.value.message
    await sup.stop()  # also ends the long backoff at once


async def test_startup_timeout_names_the_engine_output_and_kills_it(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); print('booting slowly', " \
             "flush=True); time.sleep(600)"
    sup = EngineSupervisor("slow", [PY, "-c", script], f"http://127.0.0.1:{free_port()}/v1",
                           startup_timeout_s=1.0, backoff_base_s=3600)
    with pytest.raises(EngineStartupError, match=r"did not answer .* within 1 s(.|\n)*booting slowly"):
        await sup.start()
    assert not alive(int(pidfile.read_text()))
    with pytest.raises(EngineUnavailable, match="did not answer"):
        await sup.ensure()
    await sup.stop()


async def test_exit_before_answering_fails_without_waiting_for_the_timeout() -> None:
    sup = EngineSupervisor("bad", [PY, "-c", "import sys; print('unknown flag --nope'); sys.exit(3)"],
                           f"http://127.0.0.1:{free_port()}/v1", startup_timeout_s=600, backoff_base_s=3600)
    async with asyncio.timeout(30):
        with pytest.raises(EngineStartupError, match=r"exited with 3 before it answered(.|\n)*unknown flag --nope"):
            await sup.start()
    await sup.stop()


async def test_missing_command_fails_clearly() -> None:
    sup = EngineSupervisor("none", ["/nonexistent/engine-binary"], "http://127.0.0.1:9/v1", backoff_base_s=3600)
    with pytest.raises(EngineStartupError, match="cannot run '/nonexistent/engine-binary'"):
        await sup.start()
    await sup.stop()


STUBBORN = """
import http.server, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


async def test_stop_kills_an_engine_that_ignores_sigterm() -> None:
    port = free_port()
    sup = EngineSupervisor("stubborn", [PY, "-c", STUBBORN, str(port)], f"http://127.0.0.1:{port}/v1",
                           stop_grace_s=0.5)
    await sup.start()
    pid = sup.pid
    assert pid is not None
    await sup.stop()
    assert not alive(pid)


async def test_openai_backend_launches_lazily_serves_and_stops() -> None:
    port = free_port()
    model = msgspec.convert({"id": "managed", "upstream_model": "mock", "load": "lazy", "launch": {
        "port": port, "command": [PY, MOCK, "--name", "mock"], "args": ["--port", str(port)],
        "env": {"POINTSMAN_TEST_MARK": "1"}}}, OpenAIModel)
    backend = OpenAIBackend(model)
    assert backend.supervisor is not None and not await backend.health()
    body = json.loads(await backend.complete(chat()))  # the first request launches it and waits
    assert body["model"] == "managed" and body["choices"][0]["message"]["content"] == "echo: hello there"
    assert await backend.health() and (await backend.probe(0))[0]
    pid = backend.supervisor.pid
    assert pid is not None and b"POINTSMAN_TEST_MARK=1" in Path(f"/proc/{pid}/environ").read_bytes()
    chunks = [json.loads(c) async for c in backend.stream(chat(stream=True))]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "echo: hello there"
    await backend.aclose()
    assert not alive(pid) and not await backend.health()
    with pytest.raises(EngineUnavailable):
        await backend.complete(chat())
    with pytest.raises(EngineUnavailable):
        [c async for c in backend.stream(chat(stream=True))]
