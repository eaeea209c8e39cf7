"""Prometheus scrape config and Grafana provisioning: they parse and point at the right places."""

from __future__ import annotations

import json
from typing import Any

import yaml

from tests.deploy.deployfiles import (
    DASHBOARD,
    GRAFANA_DIR,
    PROMETHEUS_CONFIG,
    compose_config,
)
from tests.deploy.promql import dashboard_queries, exported_names, metric_names, parse


def _jobs() -> dict[str, dict[str, Any]]:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    return {job["job_name"]: job for job in config["scrape_configs"]}


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_prometheus_scrapes_the_server_service_port_and_path() -> None:
    services = compose_config(("monitoring",))["services"]
    job = _jobs()["vllm-batch-server"]
    assert job["metrics_path"] == "/metrics"
    (static,) = job["static_configs"]
    host, port = static["targets"][0].split(":")
    assert host in services and host == "server"
    assert port == _flag(services["server"]["command"], "--port")
    assert int(port) in {p["target"] for p in services["server"]["ports"]}


def test_prometheus_finds_every_worker_replica_on_its_metrics_port() -> None:
    services = compose_config(("monitoring",))["services"]
    job = _jobs()["vllm-batch-worker"]
    assert job["metrics_path"] == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["worker"] and sd["type"] == "A"  # every replica's address
    assert str(sd["port"]) == _flag(services["worker"]["command"], "--metrics-port")


def test_prometheus_reads_the_api_key_from_the_mounted_file() -> None:
    services = compose_config(("monitoring",))["services"]
    targets = {c["target"] for c in services["prometheus"]["configs"]}
    for job in _jobs().values():
        auth = job["authorization"]
        assert auth["type"] == "Bearer" and auth["credentials_file"] in targets


def test_grafana_datasource_and_dashboard_provider_match_the_dashboard() -> None:
    provisioning = GRAFANA_DIR / "provisioning"
    (datasource,) = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in compose_config(("monitoring",))["services"]
    (provider,) = yaml.safe_load((provisioning / "dashboards/vllm-batch.yml").read_text())[
        "providers"
    ]
    grafana = compose_config(("monitoring",))["services"]["grafana"]
    mounted = {v["target"]: v["source"] for v in grafana["volumes"] if v["type"] == "bind"}
    assert mounted[provider["options"]["path"]] == str(DASHBOARD.parent)
    dashboard = json.loads(DASHBOARD.read_text())
    used = {
        json.dumps(panel.get("datasource"))
        for panel in dashboard["panels"]
        if panel["type"] != "row"
    }
    assert used == {json.dumps({"type": "prometheus", "uid": datasource["uid"]})}


def test_dashboard_parses_and_every_query_is_valid_promql() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "vllm-batch" and dashboard["panels"]
    queries = list(dashboard_queries(DASHBOARD))
    assert len(queries) >= 40
    for title, expr in queries:
        parse(expr)  # raises on a syntax error
        names = metric_names(expr)
        assert names, f"{title}: {expr} selects no metric"
        assert all(name.startswith("vllm_batch_") for name in names), (title, names)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_covers_the_gpu_health_metrics() -> None:
    queried = {name for _, expr in dashboard_queries(DASHBOARD) for name in metric_names(expr)}
    assert {
        "vllm_batch_gpu_utilization_percent",
        "vllm_batch_gpu_memory_used_bytes",
        "vllm_batch_gpu_memory_total_bytes",
        "vllm_batch_gpu_temperature_celsius",
        "vllm_batch_gpu_power_watts",
        "vllm_batch_gpu_throttled",
        "vllm_batch_gpu_claims_paused",
    } <= queried


def test_metric_name_extraction() -> None:
    """The helpers the live dashboard test relies on."""
    expr = (
        'histogram_quantile(0.9, sum by (le) (rate(a_seconds_bucket{model=~"$model"}'
        '[$__rate_interval]))) / on() group_left max(b) + count({__name__="c"})'
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b", "c"}
    exposition = (
        "# HELP x_total x\n# TYPE x counter\nx_total 1.0\n"
        "# TYPE h histogram\n"
        '# TYPE g gauge\ng{gpu="0"} 3\n'
    )
    assert exported_names(exposition) >= {"x_total", "h_bucket", "h_sum", "h_count", "g"}
