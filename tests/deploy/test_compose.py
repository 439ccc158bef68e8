"""deploy/compose.yaml against the compose-spec schema, its replicas' shared state, and the files it mounts:
the gateway config, prometheus.yml and Grafana's provisioning."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest

from config.loader import parse_config
from tests.deploy.conftest import DEPLOY, GATEWAY_CONFIG, SECRETS, load_yaml

# vendored from github.com/compose-spec/compose-spec (schema/compose-spec.json; tests/deploy/schemas/README.md)
SCHEMA = Path(__file__).with_name("schemas") / "compose-spec.json"
COMPOSE = load_yaml(DEPLOY / "compose.yaml")
SERVICES: dict[str, dict] = COMPOSE["services"]
# what deploy/.env holds in a real deployment
DOTENV = {"POINTSMAN_ADMIN_KEY": SECRETS["POINTSMAN_ADMIN_KEY"], "POINTSMAN_METRICS_TOKEN": "readonly-key",
          "POSTGRES_PASSWORD": "secret", "GRAFANA_ADMIN_PASSWORD": "grafana"}
# compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, and $$ for $
_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.groups()
        present = name in env and (env[name] != "" or not (op or "").startswith(":"))
        if op and op.endswith("?") and not present:
            raise MissingVariable(f"{name}: {arg}")
        return env[name] if present else (arg if op and op.endswith("-") else "")

    if isinstance(value, str):
        return _INTERPOLATION.sub(one, value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def gateways() -> dict[str, dict]:
    """The services that run the gateway's image, interpolated as compose would with deploy/.env."""
    services = interpolate(SERVICES, DOTENV)
    return {name: s for name, s in services.items() if s.get("build", {}).get("dockerfile") == "deploy/Dockerfile"}


def mounts(service: dict) -> dict[str, Path]:
    """A service's bind mounts: container path -> the file or folder on the host (relative to deploy/)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            found[target] = (DEPLOY / source).resolve()
    return found


def test_compose_file_validates_against_the_compose_spec() -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(COMPOSE), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_secrets_are_required_and_documented_in_env_example() -> None:
    for name in ("POINTSMAN_ADMIN_KEY", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"):
        with pytest.raises(MissingVariable, match=name):  # compose refuses to start without them
            interpolate(SERVICES, {k: v for k, v in DOTENV.items() if k != name})
    example = (DEPLOY / ".env.example").read_text(encoding="utf-8")
    documented = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", example, re.MULTILINE))
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", (DEPLOY / "compose.yaml").read_text(encoding="utf-8")))
    used |= {secret["environment"] for secret in COMPOSE["secrets"].values() if "environment" in secret}
    assert used == documented
    assert ".env" in (DEPLOY / ".gitignore").read_text().split()  # the filled-in copy stays out of git


def test_two_replicas_share_one_config_redis_and_postgres(monkeypatch) -> None:
    replicas = gateways()
    assert len(replicas) == 2
    first, second = replicas.values()
    for key in ("image", "environment", "volumes", "depends_on", "healthcheck"):
        assert first[key] == second[key], key
    host_ports = [s["ports"][0].split(":")[0] for s in replicas.values()]
    assert len(set(host_ports)) == 2
    env = first["environment"]
    config_path = mounts(first)[env["POINTSMAN_CONFIG"]]
    assert config_path == GATEWAY_CONFIG
    monkeypatch.setenv("POINTSMAN_ADMIN_KEY", env["POINTSMAN_ADMIN_KEY"])
    config = parse_config(config_path.read_text(encoding="utf-8"), env, source=str(config_path))
    assert config.auth.enabled and config.metrics.enabled
    redis, database = urlsplit(config.storage.redis_url or ""), urlsplit(config.storage.database_url)
    postgres = SERVICES["postgres"]["environment"]
    assert redis.hostname in SERVICES and SERVICES[redis.hostname]["image"].startswith("redis:")
    assert database.scheme == "postgresql+asyncpg" and SERVICES[database.hostname]["image"].startswith("postgres:")
    assert (database.username, database.path) == (postgres["POSTGRES_USER"], "/" + postgres["POSTGRES_DB"])
    assert database.password == DOTENV["POSTGRES_PASSWORD"]
    for service in (redis.hostname, database.hostname):  # started and answering before a gateway migrates
        assert first["depends_on"][service] == {"condition": "service_healthy"}
        assert SERVICES[service]["healthcheck"]["test"]
    # the GGUF is converted once into a named volume both use, not once per container start
    volumes = dict(v.split(":")[:2] for v in first["volumes"])
    assert {v: k for k, v in volumes.items()}[config.engines.cache_dir] in COMPOSE["volumes"]
    assert "/ready" in " ".join(first["healthcheck"]["test"])
    grace = float(first["stop_grace_period"].removesuffix("s"))
    assert grace > config.server.shutdown_grace_s + getattr(config.server, "drain_s", 0.0)


def test_gpu_profile_runs_vllm_as_the_configs_vllm_model() -> None:
    vllm = interpolate(SERVICES["vllm"], DOTENV)
    assert vllm["profiles"] == ["gpu"] and vllm["image"].startswith("vllm/vllm-openai:")
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    # services outside the profile must not need it (compose refuses to start them otherwise)
    assert not any("vllm" in s.get("depends_on", {}) for name, s in SERVICES.items() if name != "vllm")
    args = dict(a.removeprefix("--").split("=", 1) for a in vllm["command"] if a.startswith("--"))
    env = next(iter(gateways().values()))["environment"]
    assert env["VLLM_URL"] == f"http://vllm:{args['port']}/v1"
    config = parse_config(GATEWAY_CONFIG.read_text(encoding="utf-8"), env)
    models = [m for m in config.models if m.backend_kind == "vllm"]
    assert [(m.sent_model, m.base_url, m.eager) for m in models] == [(args["served-model-name"], env["VLLM_URL"],
                                                                      False)]


def test_pointsman_check_config_accepts_the_deploy_config(tmp_path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **SECRETS}
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "check-config", str(GATEWAY_CONFIG)], env=env,
                          cwd=DEPLOY.parent, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert ": ok, " in done.stdout


def test_prometheus_scrapes_both_replicas_with_the_mounted_token() -> None:
    prometheus = interpolate(SERVICES["prometheus"], DOTENV)
    config = load_yaml(mounts(prometheus)["/etc/prometheus/prometheus.yml"])
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs["pointsman"]
    assert job["metrics_path"] == "/metrics"
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    expected = {f"{name}:{s['ports'][0].split(':')[-1]}" for name, s in gateways().items()}
    assert targets == expected
    token = job["authorization"]
    assert token.get("type", "Bearer") == "Bearer"
    secret = next(s for s in prometheus["secrets"] if s["target"] == token["credentials_file"])
    assert COMPOSE["secrets"][secret["source"]]["environment"] in DOTENV
    assert secret["mode"] & 0o004  # Prometheus runs as nobody: the file must be world-readable


def test_grafana_provisions_the_dashboard_and_the_prometheus_datasource() -> None:
    grafana = interpolate(SERVICES["grafana"], DOTENV)
    files = mounts(grafana)
    provisioning = files["/etc/grafana/provisioning"]
    datasources = [d for f in (provisioning / "datasources").glob("*.yaml") for d in load_yaml(f)["datasources"]]
    assert [d["type"] for d in datasources] == ["prometheus"]
    url = urlsplit(datasources[0]["url"])
    assert url.hostname == "prometheus" and str(url.port) in SERVICES["prometheus"]["ports"][0]
    providers = [p for f in (provisioning / "dashboards").glob("*.yaml") for p in load_yaml(f)["providers"]]
    folder = providers[0]["options"]["path"]
    dashboards = {target: source for target, source in files.items() if target.startswith(folder + "/")}
    assert list(dashboards.values()) == [DEPLOY / "grafana" / "pointsman.json"]
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] in dashboards
    assert grafana["depends_on"]["prometheus"] == {"condition": "service_healthy"}


def test_every_bind_mount_exists() -> None:
    for name, service in SERVICES.items():
        for target, source in mounts(service).items():
            assert source.exists(), f"{name}: {source} (for {target}) is missing"
