"""deploy/k8s: every manifest valid against Kubernetes' own schemas (offline), and wired together as intended."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from kubernetes_validate.utils import latest_version, validate

from config.loader import ConfigError, parse_config
from tests.deploy.conftest import DEPLOY, GATEWAY_CONFIG, SECRETS, load_yaml, load_yaml_all

K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = sorted(K8S.rglob("kustomization.yaml"))
MANIFEST_FILES = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
MANIFESTS = [(path, doc) for path in MANIFEST_FILES for doc in load_yaml_all(path)]
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")


def find(kind: str, name: str) -> dict:
    found = [doc for _, doc in MANIFESTS if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(deployment: dict) -> dict[str, str]:
    """The container's literal env values."""
    return {e["name"]: e["value"] for e in container(deployment).get("env", []) if "value" in e}


def env_names(deployment: dict) -> set[str]:
    """Every variable the container gets: its env, and the keys of each Secret it takes whole (envFrom)."""
    spec = container(deployment)
    names = {e["name"] for e in spec.get("env", [])}
    for source in spec.get("envFrom", []):
        secret = find("Secret", source["secretRef"]["name"])
        names |= secret.get("stringData", {}).keys() | secret.get("data", {}).keys()
    return names


def variables(value: object, required_only: bool = False) -> set[str]:
    """The ${VAR} names in the strings of a parsed YAML tree (comments aside)."""
    if isinstance(value, str):
        return {m.group(1) for m in _VAR.finditer(value) if not (required_only and m.group(2) is not None)}
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return set().union(*(variables(v, required_only) for v in items))


def named_port(deployment: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    ports = {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}
    assert port in ports, f"no container port named {port!r}"
    return ports[port]


def gateway_config(env: dict[str, str]):
    text = find("ConfigMap", "pointsman-config")["data"]["pointsman.yaml"]
    return parse_config(text, env, source="configmap")


@pytest.mark.parametrize("path, doc", MANIFESTS, ids=[f"{p.relative_to(K8S)}:{d['kind']}" for p, d in MANIFESTS])
def test_manifest_validates_against_kubernetes_schema(path: Path, doc: dict) -> None:
    # strict: the schemas that refuse unknown fields, so a misspelt key (readinessprobe) fails here, not in a cluster
    validate(doc, latest_version(), strict=True)


def test_kustomizations_apply_every_manifest_in_one_namespace() -> None:
    applied: set[Path] = set()
    namespace = find("Namespace", "pointsman")["metadata"]["name"]
    for kustomization in KUSTOMIZATIONS:
        spec = load_yaml(kustomization)
        assert spec["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and spec["kind"] == "Kustomization"
        assert spec["namespace"] == namespace
        for resource in spec["resources"]:
            target = (kustomization.parent / resource).resolve()
            assert target.exists(), f"{kustomization}: {resource} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml") in KUSTOMIZATIONS
            else:
                applied.add(target)
    assert applied == set(MANIFEST_FILES)  # nothing left out, nothing listed twice over
    images = {image["name"] for k in KUSTOMIZATIONS for image in load_yaml(k).get("images", [])}
    assert container(find("Deployment", "pointsman"))["image"].split(":")[0] in images


def test_probes_ask_the_gateway_on_its_port() -> None:
    deployment = find("Deployment", "pointsman")
    spec = container(deployment)
    port = gateway_config(SECRETS).server.port
    probes = {name: spec[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/ready"  # 503 until models are loaded, and while draining
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/health"
    assert {named_port(deployment, probe["port"]) for probe in probes.values()} == {port}
    service = find("Service", "pointsman")
    assert [named_port(deployment, p["targetPort"]) for p in service["spec"]["ports"]] == [port]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_gateway_runs_as_the_images_non_root_user_on_a_read_only_root() -> None:
    deployment = find("Deployment", "pointsman")
    pod = deployment["spec"]["template"]["spec"]
    user = re.search(r"^USER (\d+)", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    assert user is not None and pod["securityContext"]["runAsUser"] == int(user.group(1)) != 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    security = container(deployment)["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # what the gateway writes lands on volumes: the GGUF conversion cache, /tmp, the working directory
    mounts = {m["mountPath"]: m for m in container(deployment)["volumeMounts"]}
    cache_dir = gateway_config({**SECRETS, **env_of(deployment)}).engines.cache_dir
    workdir = re.findall(r"^WORKDIR (\S+)", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)[-1]
    for path in (cache_dir, "/tmp", workdir):
        assert path in mounts and not mounts[path].get("readOnly"), f"{path} is not writable"
    assert mounts["/etc/pointsman"]["readOnly"] is True


def test_grace_period_outlasts_the_prestop_and_the_gateways_own_shutdown() -> None:
    deployment = find("Deployment", "pointsman")
    pre_stop = container(deployment)["lifecycle"]["preStop"]
    seconds = pre_stop["sleep"]["seconds"] if "sleep" in pre_stop else float(pre_stop["exec"]["command"][-1])
    assert pre_stop.get("exec", {}).get("command", ["sleep"])[0] == "sleep" and seconds >= 5
    server = gateway_config(SECRETS).server
    drain = getattr(server, "drain_s", 0.0)  # the gateway's own drain, where the config sets one
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > seconds + drain + server.shutdown_grace_s


def test_hpa_scales_the_gateway_on_cpu_and_the_pdb_keeps_one() -> None:
    deployment = find("Deployment", "pointsman")
    hpa = find("HorizontalPodAutoscaler", "pointsman")["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "pointsman")
    cpu = [m for m in hpa["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and cpu[0]["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in container(deployment)["resources"]["requests"]  # utilization is measured against it
    assert 2 <= hpa["minReplicas"] <= deployment["spec"]["replicas"] <= hpa["maxReplicas"]
    pdb = find("PodDisruptionBudget", "pointsman")["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    vllm_labels = find("Deployment", "vllm")["spec"]["template"]["metadata"]["labels"]
    assert not pdb["selector"]["matchLabels"].items() <= vllm_labels.items()
    assert pdb["minAvailable"] < hpa["minReplicas"]  # else a drain could never evict one


def test_configmap_holds_the_deploy_config_and_it_parses(monkeypatch) -> None:
    text = find("ConfigMap", "pointsman-config")["data"]["pointsman.yaml"]
    assert text == GATEWAY_CONFIG.read_text(encoding="utf-8")  # compose and Kubernetes serve one config
    deployment = find("Deployment", "pointsman")
    mount = next(m for m in container(deployment)["volumeMounts"] if m["name"] == "config")
    assert env_of(deployment)["POINTSMAN_CONFIG"] == f"{mount['mountPath']}/pointsman.yaml"
    # every ${VAR} without a default is set by the Deployment (literally or from the Secret)
    required = variables(yaml.safe_load(text), required_only=True)
    assert required and required <= env_names(deployment)
    assert variables(yaml.safe_load(text)) <= env_names(deployment) | {"POINTSMAN_PORT", "POINTSMAN_WORKERS",
                                                                         "POINTSMAN_DAILY_TOKENS"}
    monkeypatch.setenv("POINTSMAN_ADMIN_KEY", SECRETS["POINTSMAN_ADMIN_KEY"])
    env = {**SECRETS, **env_of(deployment)}
    config = gateway_config(env)
    assert config.auth.enabled and config.server.host == "0.0.0.0"
    assert config.storage.redis_url == SECRETS["REDIS_URL"]
    assert config.storage.database_url.startswith("postgresql+asyncpg://")
    assert config.metrics.enabled and config.engines.cache_dir == env["POINTSMAN_CACHE_DIR"]


def test_secret_placeholders_are_marked_and_refuse_to_start() -> None:
    secret = find("Secret", "pointsman-secrets")["stringData"]
    assert secret.keys() == SECRETS.keys()
    assert all("REPLACE-ME" in value for value in secret.values())
    with pytest.raises(ConfigError, match=r"storage"):  # never served with the placeholder admin key
        gateway_config(secret)


def test_vllm_example_serves_the_configs_vllm_model_on_a_gpu() -> None:
    deployment = find("Deployment", "vllm")
    spec = container(deployment)
    assert spec["image"].startswith("vllm/vllm-openai:")
    assert spec["resources"]["limits"]["nvidia.com/gpu"] == "1"
    args = dict(a.removeprefix("--").split("=", 1) for a in spec["args"] if a.startswith("--"))
    assert all(spec[p]["httpGet"]["path"] == "/health" for p in ("startupProbe", "readinessProbe", "livenessProbe"))
    assert {named_port(deployment, spec[p]["httpGet"]["port"]) for p in ("readinessProbe", "livenessProbe")} == {
        int(args["port"])}
    service = find("Service", "vllm")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    url = env_of(find("Deployment", "pointsman"))["VLLM_URL"]
    assert url == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/v1"
    assert named_port(deployment, service["spec"]["ports"][0]["targetPort"]) == int(args["port"])
    vllm_models = [m for m in gateway_config({**SECRETS, "VLLM_URL": url}).models if m.backend_kind == "vllm"]
    assert [(m.sent_model, m.base_url, m.eager) for m in vllm_models] == [(args["served-model-name"], url, False)]
