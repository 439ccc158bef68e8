"""Prompt templates through a live gateway: the upstream receives the rendered messages, the admin API adds and
promotes versions, bad variables and sandbox escapes are 400s, and the stages survive a restart."""

from __future__ import annotations

import json

from tests.conftest import http, start_gateway

CONFIG = """
models:
  - id: remote-a
    backend: openai
    base_url: {upstream}
templates:
  - name: support
    versions:
      - version: 1.0.0
        messages:
          - {{role: system, content: "You help {{{{ customer }}}} with {{{{ product }}}}."}}
        variables:
          customer: {{type: string}}
          product: {{type: string, default: billing}}
storage: {{database_url: "sqlite+aiosqlite:///{db}"}}
"""


def _chat(url: str, template: dict, messages: list | None = None) -> tuple[int, dict, dict]:
    body = {"model": "remote-a", "messages": messages if messages is not None else
            [{"role": "user", "content": "hello"}], "template": template}
    status, headers, raw = http("POST", url + "/v1/chat/completions", body)
    return status, {k.lower(): v for k, v in headers.items()}, json.loads(raw)


def test_templates_render_upstream_change_through_the_admin_api_and_survive_a_restart(upstream, tmp_path):
    config = CONFIG.format(upstream=upstream.url, db=tmp_path / "templates.db")
    gateway = start_gateway(tmp_path, config)
    try:
        status, headers, body = _chat(gateway.url, {"name": "support", "variables": {"customer": "Ada"}})
        assert status == 200, body
        assert headers["x-pointsman-template"] == "support@1.0.0"
        sent = body["x_received"]["body"]
        assert sent["messages"] == [{"role": "system", "content": "You help Ada with billing."},
                                    {"role": "user", "content": "hello"}]
        assert "template" not in sent

        status, _, body = _chat(gateway.url, {"name": "support", "variables": {"customer": 5}})
        assert status == 400 and body["error"]["param"] == "template.variables.customer"

        version = {"name": "support", "version": "1.1.0", "stage": "staging",
                   "messages": [{"role": "system", "content": "{{ customer }}: {{ ''.__class__ }}"}],
                   "variables": {"customer": {}}}
        status, _, raw = http("POST", gateway.url + "/admin/templates", version)
        assert status == 201, raw
        status, _, body = _chat(gateway.url, {"name": "support", "version": "1.1.0", "variables": {"customer": "A"}})
        assert status == 400 and body["error"]["code"] == "template_security_error"
        assert "tried to leave the sandbox" in gateway.output()

        version.update(version="2.0.0", messages=[{"role": "system", "content": "v2 for {{ customer }}"}])
        assert http("POST", gateway.url + "/admin/templates", version)[0] == 201
        stage = gateway.url + "/admin/templates/support/versions/2.0.0/stage"
        status, _, raw = http("POST", stage, {"stage": "production"})
        assert status == 200 and json.loads(raw)["from"] == "staging"
        status, _, raw = http("POST", gateway.url + "/admin/templates/support/versions/1.0.0/stage",
                              {"stage": "dev"})
        assert status == 409 and json.loads(raw)["error"]["param"] == "stage"  # deprecated -> dev: not allowed
        status, headers, body = _chat(gateway.url, {"name": "support", "variables": {"customer": "Ada"}}, [])
        assert status == 200 and headers["x-pointsman-template"] == "support@2.0.0"
        assert body["x_received"]["body"]["messages"] == [{"role": "system", "content": "v2 for Ada"}]
    finally:
        gateway.stop()

    restarted = start_gateway(tmp_path, config)
    try:
        status, headers, _ = _chat(restarted.url, {"name": "support", "variables": {"customer": "Ada"}})
        assert status == 200 and headers["x-pointsman-template"] == "support@2.0.0"
        status, _, raw = http("GET", restarted.url + "/admin/templates")
        listed = json.loads(raw)["data"][0]
        assert listed["production"] == "2.0.0"
        assert {v["version"]: v["stage"] for v in listed["versions"]} == {
            "1.0.0": "deprecated", "1.1.0": "staging", "2.0.0": "production"}
        status, _, raw = http("GET", restarted.url + "/admin/templates/support/history")
        assert [(h["version"], h["to"], h["by"]) for h in json.loads(raw)["data"]][-2:] == [
            ("1.0.0", "deprecated", "loopback"), ("2.0.0", "production", "loopback")]
    finally:
        restarted.stop()
