"""Scrape and read Prometheus expositions (parsed with prometheus-client's own parser)."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Scrape:
    """One parsed exposition: ``{(sample name, sorted labels): value}`` plus family types."""

    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    types: dict[str, str]
    text: str

    def value(self, name: str, **labels: str) -> float | None:
        """The sample's value, None if the exposition has no such series."""
        return self.samples.get((name, tuple(sorted(labels.items()))))

    def get(self, name: str, **labels: str) -> float:
        """The sample's value, 0 if absent (a series not created yet)."""
        return self.value(name, **labels) or 0.0

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}


def parse(text: str) -> Scrape:
    """Parse ``text``; raises if it is not valid Prometheus text format."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return Scrape(samples, types, text)


def scrape(url: str, headers: dict[str, str] | None = None) -> Scrape:
    """GET ``url`` (a ``/metrics`` URL), check it is 200 text format, and parse it."""
    response = httpx.get(url, headers=headers or {}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    return parse(response.text)
