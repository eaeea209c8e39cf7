"""deploy/kubernetes validates against the Kubernetes schemas and hangs together."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.deployfiles import K8S_DIR, k8s_files, k8s_resources, k8s_workload, pod_spec

K8S_VERSION = "1.37.0"  # the newest schema set kubernetes-validate==1.37.0 ships


@pytest.mark.parametrize("path", k8s_files(), ids=lambda p: p.name)
def test_manifest_validates_strictly_against_the_schema(path: Path) -> None:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs
    for doc in docs:
        # strict: unknown fields (a misspelt key) are errors too
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_rejects_a_broken_manifest() -> None:
    """Guard against a check that passes anything: a missing port, a misspelt field."""
    for field, value in (("readinessProbe", {"httpGet": {"path": "/ready"}}), ("readyProbe", {})):
        broken = yaml.safe_load(yaml.safe_dump(k8s_workload("vllm-batch-server")))
        broken["spec"]["template"]["spec"]["containers"][0][field] = value
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in k8s_files())
    assert [image["name"] for image in kustomization["images"]] == ["vllm-batch"]


def _container(name: str) -> dict[str, Any]:
    spec = pod_spec(k8s_workload(name))
    assert spec is not None and len(spec["containers"]) == 1
    container: dict[str, Any] = spec["containers"][0]
    return container


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {r["metadata"]["name"]: r for _, r in k8s_resources() if r["kind"] == kind}


def test_gpu_worker_requests_one_nvidia_gpu() -> None:
    worker = _container("vllm-batch-worker")
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["args"][:1] == ["worker"]
    assert "nvidia.com/gpu" not in str(_container("vllm-batch-server")["resources"])
    volumes = {m["mountPath"] for m in worker["volumeMounts"]}
    assert "/dev/shm" in volumes


def test_server_probes_ready_and_health_on_its_port() -> None:
    server = _container("vllm-batch-server")
    assert "--no-worker" in server["args"]
    port = int(server["args"][server["args"].index("--port") + 1])
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports["http"] == port
    assert server["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}


def test_service_selects_the_server_pods_and_targets_their_port() -> None:
    service = _by_kind("Service")["vllm-batch"]
    server = k8s_workload("vllm-batch-server")
    labels = server["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert server["spec"]["selector"]["matchLabels"].items() <= labels.items()
    worker_labels = k8s_workload("vllm-batch-worker")["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= worker_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in _container("vllm-batch-server")["ports"]}


def test_config_and_secret_reach_server_and_worker() -> None:
    config = _by_kind("ConfigMap")["vllm-batch-config"]
    secret = _by_kind("Secret")["vllm-batch-secrets"]
    assert {"VLLM_BATCH_API_KEY", "VLLM_BATCH_DATABASE_URL"} <= set(secret["stringData"])
    assert {"VLLM_BATCH_MODELS", "VLLM_BATCH_STORAGE_URL"} <= set(config["data"])
    for name in ("vllm-batch-server", "vllm-batch-worker"):
        refs = _container(name)["envFrom"]
        assert {"configMapRef": {"name": "vllm-batch-config"}} in refs
        assert {"secretRef": {"name": "vllm-batch-secrets"}} in refs
    postgres = _container("postgres")
    password = next(e for e in postgres["env"] if e["name"] == "POSTGRES_PASSWORD")
    assert password["valueFrom"]["secretKeyRef"] == {
        "name": "vllm-batch-secrets",
        "key": "POSTGRES_PASSWORD",
    }
    # the database URL names the bundled PostgreSQL Service
    assert "@postgres:5432/" in secret["stringData"]["VLLM_BATCH_DATABASE_URL"]
    assert "postgres" in _by_kind("Service")


def test_settings_from_the_configmap_and_secret_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_batch.config import Settings

    env = {**_by_kind("ConfigMap")["vllm-batch-config"]["data"]}
    env.update(_by_kind("Secret")["vllm-batch-secrets"]["stringData"])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.resolved_database_url.startswith("postgresql+asyncpg://")
    assert (settings.storage_url or "").startswith("s3://")
    assert settings.api_key  # probes and scrapes reach pods by IP: the Host guard is off


@pytest.mark.parametrize(
    ("workload", "port_name"), [("vllm-batch-server", "http"), ("vllm-batch-worker", "metrics")]
)
def test_pods_carry_prometheus_scrape_annotations(workload: str, port_name: str) -> None:
    annotations = k8s_workload(workload)["spec"]["template"]["metadata"]["annotations"]
    ports = {p["name"]: p["containerPort"] for p in _container(workload)["ports"]}
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == ports[port_name]
    if workload == "vllm-batch-worker":
        args = _container(workload)["args"]
        assert int(args[args.index("--metrics-port") + 1]) == ports[port_name]
