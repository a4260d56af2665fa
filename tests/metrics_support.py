"""Reading Prometheus metrics as a scraper does, and the Grafana dashboard's queries."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "tunehouse.json"

# The series names each family type exposes, beside the family's own name.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the series ``name{labels}`` (its labels exactly), or None when absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


def label_values(text: str, name: str, label: str) -> set[str]:
    """The values of ``label`` among the series named ``name``."""
    return {
        s.labels[label]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and label in s.labels
    }


def exposed_names(text: str) -> set[str]:
    """Every series name an exposition declares, whether or not it has samples yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
        names |= {s.name for s in family.samples}
    return names


def dashboard_queries(path: Path = DASHBOARD) -> list[str]:
    """The PromQL of every panel of the Grafana dashboard (rows' panels too)."""
    dashboard = json.loads(path.read_text())

    def panels(items: list[dict]) -> list[dict]:
        return [p for item in items for p in [item, *panels(item.get("panels", []))]]

    return [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets", [])]


def metric_names(query: str) -> set[str]:
    """The Tunehouse metric names a PromQL query reads."""
    return set(re.findall(r"\btunehouse_[a-z0-9_]+", query))
