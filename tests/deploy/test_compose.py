"""docker-compose.yml validates with Docker Compose v2 for each profile and wires what it says.

No Docker engine is needed: ``docker compose config`` parses, validates against the
Compose specification, interpolates and normalises the file offline.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.deploy.deployfiles import (
    COMPOSE_CPU_FILE,
    COMPOSE_FILE,
    COMPOSE_GPUS_SCRIPT,
    compose_config,
    run_compose,
)
from vllm_batch.config import Settings

CORE = {"postgres", "server", "worker"}
PROFILES: dict[str, set[str]] = {
    "default": CORE,
    "monitoring": CORE | {"prometheus", "grafana"},
    "curation": CORE | {"label-studio", "label-studio-setup"},
}


def _profiles(name: str) -> tuple[str, ...]:
    return () if name == "default" else (name,)


def _settings_from(env: dict[str, str | None], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """``Settings()`` exactly as a container with environment ``env`` builds it."""
    for key in [k for k in os.environ if k.startswith(("VLLM_BATCH_", "LABEL_STUDIO_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value or "")
    return Settings()


@pytest.mark.parametrize("profile", list(PROFILES))
def test_each_profile_validates_with_its_services(profile: str) -> None:
    result = run_compose("config", "--quiet", profiles=_profiles(profile), file=COMPOSE_FILE)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warnings either (e.g. an unset variable without default)
    listed = run_compose("config", "--services", profiles=_profiles(profile), file=COMPOSE_FILE)
    assert set(listed.stdout.split()) == PROFILES[profile]
    assert set(compose_config(_profiles(profile))["services"]) == PROFILES[profile]


def test_the_validator_rejects_a_broken_file(tmp_path: Path) -> None:
    """Guard against a check that passes anything: a misspelt key and a bad GPU count fail."""
    text = COMPOSE_FILE.read_text()
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace('    command: ["worker"', '    comand: ["worker"', 1))
    result = run_compose("config", "--quiet", file=broken)
    assert result.returncode != 0 and "comand" in result.stderr
    broken.write_text(text.replace('device_ids: ["0"]', "count: lots", 1))
    result = run_compose("config", "--quiet", file=broken)
    assert result.returncode != 0 and "count" in result.stderr


def test_worker_reserves_an_nvidia_gpu_and_server_runs_the_api_only() -> None:
    services = compose_config()["services"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    # pinned to GPU 0: `count: 1` would give every replica of the service the same GPU
    assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    assert services["server"]["command"][:1] == ["serve"]
    assert "--no-worker" in services["server"]["command"]
    assert services["worker"]["command"][:1] == ["worker"]
    assert "deploy" not in services["server"]  # the API needs no GPU


def test_cpu_override_drops_the_gpu_and_builds_the_cpu_image() -> None:
    gpu = compose_config()["services"]
    services = compose_config(overrides=(COMPOSE_CPU_FILE,))["services"]
    assert set(services) == CORE
    for name in ("server", "worker"):
        assert services[name]["build"]["dockerfile"] == "Dockerfile.cpu"
        assert services[name]["image"] == "vllm-batch:cpu"
        assert services[name]["command"] == gpu[name]["command"]
        assert services[name]["environment"] == gpu[name]["environment"]
    assert "deploy" not in services["worker"] and "ipc" not in services["worker"]
    assert gpu["worker"]["build"]["dockerfile"] == "Dockerfile"


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    return {v["target"]: v["source"] for v in service.get("volumes", []) if v["type"] == "volume"}


def test_data_volumes_are_shared_and_declared() -> None:
    config = compose_config(("monitoring", "curation"))
    services = config["services"]
    assert _mounts(services["server"])["/data"] == _mounts(services["worker"])["/data"] == "data"
    assert _mounts(services["postgres"])["/var/lib/postgresql/data"] == "postgres"
    for name in ("prometheus", "grafana", "label-studio"):
        assert _mounts(services[name]), f"{name} keeps no data"
    used = {source for s in services.values() for source in _mounts(s).values()}
    assert used <= set(config["volumes"])


def test_server_and_worker_settings_point_at_postgres_and_shared_storage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = compose_config(env={"POSTGRES_PASSWORD": "s3cret"})["services"]
    pg = services["postgres"]["environment"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    for name in ("server", "worker"):
        service = services[name]
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        settings = _settings_from(service["environment"], monkeypatch)
        url = urlsplit(settings.resolved_database_url)
        assert url.scheme == "postgresql+asyncpg"
        assert (url.hostname, url.port, url.path) == ("postgres", 5432, f"/{pg['POSTGRES_DB']}")
        assert (url.username, url.password) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"])
        assert pg["POSTGRES_PASSWORD"] == "s3cret"
        assert settings.storage_url is not None and settings.storage_url.startswith("/data/")
        assert settings.served_model_names == ["SmolLM2-135M-Instruct"]
    server = _settings_from(services["server"]["environment"], monkeypatch)
    worker = _settings_from(services["worker"]["environment"], monkeypatch)
    assert server.model_specs == worker.model_specs
    assert server.storage_url == worker.storage_url
    # each container counts its own metrics (prometheus-client multiprocess directory),
    # outside the shared /data volume: the server and workers are scraped separately
    for name in ("server", "worker"):
        assert services[name]["environment"]["VLLM_BATCH_METRICS_DIR"].startswith("/tmp/")


def test_server_is_published_on_loopback_and_reachable_by_prometheus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = compose_config(("monitoring",))["services"]
    server = services["server"]
    assert [(p["host_ip"], p["published"], p["target"]) for p in server["ports"]] == [
        ("127.0.0.1", "4080", 4080)
    ]
    settings = _settings_from(server["environment"], monkeypatch)
    # without an API key the Host guard serves only these names: Prometheus uses `server`
    assert "server" in settings.allowed_hosts
    assert "4080" in server["command"] and "0.0.0.0" in server["command"]
    assert "/health" in " ".join(server["healthcheck"]["test"])


def test_curation_wires_label_studio_to_the_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_batch.handlers.label_studio import LabelStudioHandler

    token = "0123456789abcdef0123456789abcdef01234567"
    config = compose_config(("curation",), env={"LABEL_STUDIO_API_KEY": token})
    services = config["services"]
    studio = services["label-studio"]
    # Label Studio creates its admin with exactly the token the handler sends
    assert studio["environment"]["LABEL_STUDIO_USER_TOKEN"] == token
    assert studio["environment"]["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    container_ports = {p["target"] for p in studio["ports"]}
    # the one-shot setup runs deploy/label-studio/create_project.py with the same token
    setup = services["label-studio-setup"]
    (mount,) = setup["volumes"]
    script = Path(mount["source"]) / Path(setup["entrypoint"][1]).relative_to(mount["target"])
    assert script == COMPOSE_FILE.parent / "deploy/label-studio/create_project.py"
    assert script.is_file() and setup["environment"]["LABEL_STUDIO_API_KEY"] == token
    assert urlsplit(setup["environment"]["LABEL_STUDIO_URL"]).hostname == "label-studio"
    for name in ("server", "worker"):  # handlers run in whichever process finalizes
        settings = _settings_from(services[name]["environment"], monkeypatch)
        url = urlsplit(settings.label_studio_url or "")
        assert url.hostname == "label-studio" and url.port in container_ports
        assert settings.label_studio_api_key == token
        assert LabelStudioHandler(settings).enabled()


def test_label_studio_handler_stays_off_without_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_batch.handlers.label_studio import LabelStudioHandler

    services = compose_config()["services"]
    settings = _settings_from(services["server"]["environment"], monkeypatch)
    assert not LabelStudioHandler(settings).enabled()
    assert settings.api_key in (None, "")  # no key: the Host guard protects the local port


def test_monitoring_mounts_the_configs_in_this_repo() -> None:
    config = compose_config(("monitoring",), env={"VLLM_BATCH_API_KEY": "k-123"})
    services = config["services"]
    root = COMPOSE_FILE.parent

    def binds(service: dict[str, Any]) -> dict[str, Path]:
        return {
            v["target"]: Path(v["source"])
            for v in service.get("volumes", [])
            if v["type"] == "bind"
        }

    prom = binds(services["prometheus"])
    assert prom["/etc/prometheus/prometheus.yml"] == root / "deploy/prometheus/prometheus.yml"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    grafana = binds(services["grafana"])
    assert grafana["/etc/grafana/provisioning"] == root / "deploy/grafana/provisioning"
    assert grafana["/var/lib/grafana/dashboards"] == root / "deploy/grafana/dashboards"
    for path in (*prom.values(), *grafana.values()):
        assert path.exists(), path
    # the API key reaches Prometheus as a file, never in the scrape config
    (secret,) = services["prometheus"]["configs"]
    assert config["configs"][secret["source"]]["content"] == "k-123"


# ------------------------------------------------------------------ one worker per GPU


def _gpus_override(tmp_path: Path, *args: str) -> Path:
    """``python3 deploy/compose/gpus.py ARGS -o FILE`` run where a user runs it (next to
    docker-compose.yml), FILE in ``tmp_path``: its ``extends`` finds docker-compose.yml."""
    out = tmp_path / "docker-compose.gpus.yml"
    result = subprocess.run(
        [sys.executable, str(COMPOSE_GPUS_SCRIPT), *args, "-o", str(out)],
        cwd=COMPOSE_FILE.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout == "", result.stderr
    return out


def _workers(services: dict[str, Any]) -> dict[str, list[str]]:
    """Each worker service's reserved GPU ids (its only device reservation)."""
    workers = {}
    for name, service in services.items():
        if (service.get("command") or [None])[0] != "worker":
            continue
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert "count" not in device, f"{name} reserves any GPU, not its own"
        workers[name] = device["device_ids"]
    return workers


@pytest.mark.parametrize("gpus", [1, 2, 4])
def test_gpus_override_gives_each_gpu_its_own_worker(gpus: int, tmp_path: Path) -> None:
    override = _gpus_override(tmp_path, str(gpus))
    result = run_compose("config", "--quiet", file=COMPOSE_FILE, overrides=(override,))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    services = compose_config(overrides=(override,), profiles=("monitoring",))["services"]
    workers = _workers(services)
    assert sorted(workers) == sorted(["worker", *(f"worker-{i}" for i in range(1, gpus))])
    assert sorted(ids[0] for ids in workers.values()) == [str(i) for i in range(gpus)]
    assert all(len(ids) == 1 for ids in workers.values())  # none shares a GPU
    base = services["worker"]
    for name in workers:
        worker = services[name]
        for key in ("image", "command", "environment", "volumes", "depends_on", "ipc"):
            assert worker[key] == base[key], (name, key)
        if name != "worker":  # Prometheus's DNS discovery finds it under `worker`
            assert worker["networks"]["default"]["aliases"] == ["worker"]


def test_gpus_override_takes_chosen_ids_and_nvidia_smi(tmp_path: Path) -> None:
    override = _gpus_override(tmp_path, "--ids", "2,5")
    assert _workers(compose_config(overrides=(override,))["services"]) == {
        "worker": ["2"],
        "worker-1": ["5"],
    }
    from deploy.compose.gpus import gpus_from_nvidia_smi, render

    listing = (
        "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)\n"
        "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb)\n"
        "  MIG 1g.10gb Device 0: (UUID: MIG-cccc)\n"
    )
    assert gpus_from_nvidia_smi(listing) == ["0", "1"]
    with pytest.raises(SystemExit, match="no GPU"):
        gpus_from_nvidia_smi("")
    with pytest.raises(ValueError, match="repeat"):
        render(["0", "0"])


@pytest.mark.parametrize("args", [["0"], ["--ids", "1,1"], ["--ids", "a"], ["2", "--ids", "1"]])
def test_gpus_script_refuses_bad_input(args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, str(COMPOSE_GPUS_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "error:" in result.stderr and result.stdout == ""
