"""Graceful drain on SIGTERM, with one worker and with two: /ready turns 503 at once, requests are still served
during server.drain_s, then the listener closes, a stream under way finishes, every usage row is written and
the process exits 0."""

from __future__ import annotations

import signal
import sqlite3
import threading

import httpx
import pytest

from tests.conftest import start_gateway
from tests.gateway.live import wait_for


def _config(upstream, tmp_path) -> str:
    return f"""
server: {{drain_s: 2.0, shutdown_grace_s: 20}}
models:
  - {{id: remote-a, backend: openai, base_url: "{upstream.url}", upstream_model: mock-model}}
routing: {{health_check_s: 0}}
storage: {{database_url: "sqlite+aiosqlite:///{tmp_path}/usage.db"}}
"""


def _refused(url: str) -> bool:
    """The connection is refused: not accepted and left waiting (with several workers the parent's copy of the
    listening socket kept queueing connections until every worker had exited)."""
    try:
        httpx.get(url + "/health", timeout=1)
    except httpx.ConnectError:
        return True
    except (httpx.TimeoutException, httpx.ReadError, httpx.RemoteProtocolError):
        # waiting, or accepted into the backlog just as the listener closed (reset): the next try tells
        return False
    return False


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_then_stops_without_losing_a_request(upstream, tmp_path, workers):
    gateway = start_gateway(tmp_path, _config(upstream, tmp_path), args=("--workers", str(workers)))
    if workers > 1:  # the route would reload the one worker it reaches (the others kept the old config): SIGHUP
        reload = httpx.post(gateway.url + "/admin/reload", timeout=30)
        assert reload.status_code == 409 and "SIGHUP" in reload.json()["error"]["message"]
    words = " ".join(f"w{i}" for i in range(12))
    streamed: dict = {}

    def stream() -> None:  # about 3.6 s of chunks: longer than the drain, shorter than the grace
        body = {"model": "remote-a", "stream": True,
                "messages": [{"role": "user", "content": f"{words} gap:0.3"}]}
        with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=30) as response:
            streamed["status"] = response.status_code
            streamed["text"] = response.read().decode()

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        wait_for(lambda: upstream_active(upstream), 10, "the stream to reach the upstream")
        gateway.proc.send_signal(signal.SIGTERM)
        # out of the load balancer at once (each worker answering /ready has heard it)
        wait_for(lambda: httpx.get(gateway.url + "/ready", timeout=2).status_code == 503, 1.5, "/ready 503")
        # still serving while the balancer catches up
        chat = {"model": "remote-a", "messages": [{"role": "user", "content": "during the drain"}]}
        served = [httpx.post(gateway.url + "/v1/chat/completions", json=chat, timeout=10).status_code
                  for _ in range(3)]
        assert served == [200, 200, 200]
        # then the listener closes
        wait_for(lambda: _refused(gateway.url), 15, "the listener to close")
        reader.join(30)
        assert streamed["status"] == 200 and streamed["text"].rstrip().endswith("data: [DONE]")
        assert "w11" in streamed["text"]  # the whole answer, not cut at the close
        assert gateway.proc.wait(30) == 0
    finally:
        gateway.stop(signal.SIGKILL)
    with sqlite3.connect(tmp_path / "usage.db") as db:
        rows = db.execute("SELECT status FROM usage_rows ORDER BY id").fetchall()
    assert sorted(r[0] for r in rows) == ["ok"] * 4  # the stream and the three served during the drain


def upstream_active(upstream) -> bool:  # noqa: ANN001
    return httpx.get(upstream.url.removesuffix("/v1") + "/stats", timeout=2).json()["active"] > 0


def test_a_sighup_retires_the_old_workers_without_draining_the_replica(upstream, tmp_path):
    """Each old worker got SIGTERM and drained: /ready answered 503 now and then during a routine reload, and a
    readiness-driven balancer could take the whole replica out."""
    gateway = start_gateway(tmp_path, _config(upstream, tmp_path), args=("--workers", "2"))
    draining: list[dict] = []

    def replaced() -> bool:  # polled until both old workers are gone, /ready asked at every turn
        answer = httpx.get(gateway.url + "/ready", timeout=5)
        if answer.status_code == 503 and answer.json().get("draining"):  # (a slow model probe is another 503)
            draining.append(answer.json())
        return gateway.output().count("Terminated child process") >= 2

    try:
        gateway.proc.send_signal(signal.SIGHUP)
        wait_for(replaced, 90, "both workers to be replaced")
        assert draining == []
        chat = {"model": "remote-a", "messages": [{"role": "user", "content": "after the reload"}]}
        assert httpx.post(gateway.url + "/v1/chat/completions", json=chat, timeout=10).status_code == 200
    finally:
        gateway.stop()
