"""The PromQL queries of the Grafana dashboard and the metric names they select."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser

# Grafana's built-in range variables stand for durations; template variables sit in strings.
GRAFANA_RANGES = ("$__rate_interval", "$__interval", "$__range")


def dashboard_queries(path: Path) -> Iterator[tuple[str, str]]:
    """(panel title, expr) for every query of every panel (rows included) and variable."""
    dashboard = json.loads(path.read_text())

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            # label_values(metric, label) is Grafana's, not PromQL: check the metric part
            if text.startswith("label_values("):
                text = text[len("label_values(") : -1].rsplit(",", 1)[0]
            yield f"variable {variable['name']}", text


def parse(expr: str) -> Any:
    for name in GRAFANA_RANGES:
        expr = expr.replace(name, "5m")
    return promql_parser.parse(expr)


def metric_names(expr: str) -> set[str]:
    """Every metric name an expression selects (by name or ``{__name__="..."}``)."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__":
                    names.add(matcher.value)

    promql_parser.walk(parse(expr), pre_visit=visit)
    return names


def exported_names(exposition: str) -> set[str]:
    """Sample names in a Prometheus text exposition, plus each family's declared names.

    A family declared by ``# TYPE`` counts with the sample names its type produces
    (``x_total`` for counters, ``x_bucket``/``x_sum``/``x_count`` for histograms), so
    a metric that is exported but has no sample yet still counts as exported.
    """
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gauge": ("",),
        "untyped": ("",),
        "unknown": ("",),
        "info": ("_info",),
        "stateset": ("",),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    }
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(maxsplit=3)
            names.update(family + suffix for suffix in suffixes.get(kind.strip(), ("",)))
            if kind.strip() == "counter" and family.endswith("_total"):
                names.add(family)
        elif line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names
