"""`pointsman serve` / `check-config` as a user runs them: auth, refusing open binds, graceful stop, bad config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest

from tests.conftest import POINTSMAN, ROOT, free_port, http, start_gateway, start_upstream
from tests.e2e.test_managed_engine import children
from tests.gateway.live import wait_for


def _remote(upstream, extra: str = "") -> str:
    return f"""
{extra}
models:
  - id: remote-a
    backend: openai
    base_url: {upstream.url}
    upstream_model: mock-model
"""


@pytest.fixture(scope="module")
def keyed(upstream, tmp_path_factory):
    config = _remote(upstream, 'auth: {api_keys: ["${TEST_KEY}", "second-key", "${UNSET_KEY:-}"]}')
    server = start_gateway(tmp_path_factory.mktemp("keyed"), config, env={"TEST_KEY": "sk-test-123"})
    yield server
    server.stop()


def test_api_keys_required_when_configured(keyed):
    body = {"model": "remote-a", "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic sk-test-123"}):
        status, _, raw = http("POST", keyed.url + "/v1/chat/completions", body, headers)
        assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
    for key in ("sk-test-123", "second-key"):
        client = openai.OpenAI(base_url=keyed.url + "/v1", api_key=key, max_retries=0)
        assert client.chat.completions.create(**body).choices[0].message.content == "echo: hi"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    # liveness and readiness stay open for probes
    assert http("GET", keyed.url + "/health")[0] == 200


def test_refuses_non_loopback_bind_without_keys(upstream, tmp_path):
    path = tmp_path / "open.yaml"
    path.write_text(_remote(upstream))
    result = subprocess.run([*POINTSMAN, "serve", "--config", str(path), "--host", "0.0.0.0", "--port",
                             str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "refusing to bind 0.0.0.0 with no auth.api_keys" in result.stderr


@pytest.mark.parametrize("extra,policies", [
    ([], "policies: {budgets: [{scope: global, period: day, max_tokens: 100}]}\n"),
    ([], "policies: {rate_limits: [{scope: key, rpm: 10}], cache: {mode: always}}\n"),
    (["--port", "70000"], ""), (["--workers", "0"], ""), (["--workers", "65"], ""),
])
def test_refuses_what_it_could_not_serve_as_configured(upstream, tmp_path, extra, policies):
    """Two workers without Redis kept a budget each (twice the budget went through); --port 70000 bound port
    4464 and --workers 0 ran the config's count: the command line skipped the config's own checks."""
    path = tmp_path / "split.yaml"
    path.write_text(_remote(upstream) + policies)
    args = extra if extra else ["--workers", "2"]
    result = subprocess.run([*POINTSMAN, "serve", "--config", str(path), "--port", str(free_port()), *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert ("need storage.redis_url" if policies else "--port must be 1-65535") in result.stderr


def test_a_sighup_that_would_split_state_over_the_workers_is_refused(upstream, tmp_path):
    """Budgets turned on by a SIGHUP without Redis: the new workers each enforced a copy of their own (`serve`
    refuses the same file at start). The reload is refused, said in the log, and the old workers keep serving."""
    gateway = start_gateway(tmp_path, _remote(upstream), args=("--workers", "2"))
    try:
        before = set(children(gateway.proc.pid))
        gateway.extra["config"].write_text(gateway.extra["config"].read_text() +
                                           "policies: {budgets: [{scope: global, period: day, max_tokens: 1}]}\n")
        gateway.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in gateway.output(), 60.0, "the refusal in the log")
        line = next(x for x in gateway.output().splitlines() if "reload refused" in x)
        assert "ERROR" in line and "2 workers need storage.redis_url for budgets" in line, line
        assert set(children(gateway.proc.pid)) == before  # no worker replaced
        body = {"model": "remote-a", "messages": [{"role": "user", "content": "hi"}]}
        status, _, raw = http("POST", gateway.url + "/v1/chat/completions", body)
        assert status == 200, raw  # the old config: no budget
    finally:
        assert gateway.stop() == 0


def test_a_worker_that_finds_a_broken_config_says_so_in_one_line(tmp_path):
    """A SIGHUP's new workers read the file again: a broken one was a 30-line traceback per worker."""
    path = tmp_path / "broken.yaml"
    path.write_text("models: [{id: m, backend: openai, base_url: 'http://127.0.0.1:1/v1', bogus: 1}]\n")
    result = subprocess.run([sys.executable, "-c", "from gateway.asgi import make_app; make_app()"], cwd=ROOT,
                            env={**os.environ, "POINTSMAN_CONFIG": str(path)}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "config error, this worker does not start" in result.stderr and "bogus" in result.stderr


def test_a_port_in_use_is_refused_in_one_line(upstream, tmp_path):
    """It printed "ready at ..." for whatever answered on the port (a traceback when that was no pointsman), then
    failed to bind."""
    path = tmp_path / "taken.yaml"
    path.write_text(_remote(upstream))
    port = int(upstream.url.rsplit(":", 1)[1].split("/")[0])  # the mock upstream listens there
    result = subprocess.run([*POINTSMAN, "serve", "--config", str(path), "--port", str(port)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert result.stderr.strip() == f"pointsman: cannot listen on 127.0.0.1:{port}: Address already in use"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("server: {port: high}\nmodels: [{id: a, backend: openai, base_url: 'http://x'}]", "$.server.port"),
        ("models: [{id: a, backend: openai}]", "$.models[0]: set base_url (one upstream) or deployments (several)"),
        ("models: [{id: a, backend: openai, base_url: 'http://x', deployments: [{base_url: 'http://y'}]}]",
         "$.models[0]: set base_url or deployments, not both"),
        ("models: [{id: a, backend: tpu, source: x}]", "$.models[0].backend"),
        ("models: [{id: a, backend: transformers, source: x, colour: red}]", "unknown field `colour`"),
        ("models: []", "$.models"),
        ("models: [oops", "invalid YAML"),
        ("storage: {database_url: ''}\n"
         "experiments: [{name: e, target: a, variants: [{name: x, model: a}, {name: y, model: a}]}]\n"
         "models: [{id: a, backend: openai, base_url: 'http://127.0.0.1:9/v1'}]",
         "storage.database_url must be set"),
    ],
)
def test_bad_config_exits_nonzero_with_one_line(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    for command in (["check-config", str(path)], ["serve", "--config", str(path), "--port", str(free_port())]):
        result = subprocess.run([*POINTSMAN, *command], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], result.stderr


def test_check_config_accepts_the_default_and_expands_env(tmp_path):
    default = ROOT / "config/default.yaml"
    result = subprocess.run([*POINTSMAN, "check-config", str(default)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "smollm2-135m-instruct" in result.stdout


def test_prints_url_and_models_and_drains_on_sigterm(tmp_path):
    upstream = start_upstream(tmp_path)  # its own, so its request count is this test's alone
    server = start_gateway(tmp_path, _remote(upstream))
    deadline = time.monotonic() + 10
    while f"ready at {server.url}/v1 serving remote-a (openai)" not in server.output():
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.05)
    result: dict = {}

    def slow_request() -> None:
        body = {"model": "remote-a", "messages": [{"role": "user", "content": "sleep:1.5"}]}
        result["status"], _, result["body"] = http("POST", server.url + "/v1/chat/completions", body)

    worker = threading.Thread(target=slow_request)
    worker.start()
    # wait until the upstream has the request in hand, then stop the gateway under it
    while json.loads(http("GET", upstream.url.removesuffix("/v1") + "/stats")[2])["requests"] == 0:
        time.sleep(0.02)
    code = server.stop(signal.SIGTERM)
    worker.join(10)
    upstream.stop()
    assert code == 0
    assert result["status"] == 200
    assert json.loads(result["body"])["choices"][0]["message"]["content"] == "echo: sleep:1.5"
