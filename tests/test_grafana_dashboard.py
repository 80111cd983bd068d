"""examples/grafana-kvbm.json queries only what KvbmMetrics serves, and shows all of it.

Every PromQL expression of the dashboard is parsed (promql-parser, the Rust parser), its metric selectors are
collected, and each is looked up in a real scrape of KvbmMetrics over HTTP, label matchers included.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
from prometheus_client import CollectorRegistry
from scraping import Samples, scrape

from kvbm_builder import Tier
from kvbm_builder.metrics import KvbmMetrics, TierBlocks

DASHBOARD = Path(__file__).parent.parent / "examples" / "grafana-kvbm.json"
# what Grafana puts in place of its variables before a query reaches Prometheus
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$instance": ".*"}
ADDED_BY_PROMETHEUS = {"instance", "job"}


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)  # Grafana's, not PromQL
            assert found, f"variable {variable['name']}: {query}"
            yield f"variable {variable['name']!r}", found.group(1)


def grafana_expanded(expr: str) -> str:
    for variable, replacement in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, replacement)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


EXACT = (promql_parser.MatchOp.Equal, promql_parser.MatchOp.NotEqual)


def selectors(expr: str) -> list[tuple[str, list[tuple[str, Any, str]]]]:
    """The metric name and label matchers (label, MatchOp, value) of each vector selector in ``expr``."""
    found: list[tuple[str, list[tuple[str, Any, str]]]] = []

    def visit(node: object) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            matchers = [(m.name, m.op, m.value) for m in node.matchers.matchers]
            name = node.name or next(value for label, _, value in matchers if label == "__name__")
            found.append((name, [m for m in matchers if m[0] != "__name__"]))
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


@pytest.fixture(scope="module")
def served() -> Iterator[Samples]:
    """A scrape of KvbmMetrics over HTTP after one of everything was recorded."""
    with KvbmMetrics(CollectorRegistry()) as metrics:
        metrics.set_block_counts_source(lambda: {tier: TierBlocks(4, 2, 1) for tier in Tier})
        for tier in Tier:
            metrics.set_allocated_bytes(tier, 1 << 20)
        metrics.record_transfer(Tier.G1, Tier.G2, 1, 4096, 0.001, True)
        metrics.record_transfer(Tier.G2, Tier.G3, 1, 4096, 0.001, False)
        metrics.record_skipped(Tier.G3, "filter")
        metrics.record_lookup(32, {Tier.G2: 16})
        yield scrape(metrics.serve(port=0).url)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def test_the_dashboard_is_one_grafana_can_import(dashboard: dict[str, Any]) -> None:
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard["panels"]):
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]  # the user picks it on import


def test_every_expression_parses_and_queries_only_what_kvbm_metrics_serves(
    dashboard: dict[str, Any], served: Samples
) -> None:
    labels_of: dict[str, list[dict[str, str]]] = {}
    for name, labels in served:
        labels_of.setdefault(name, []).append(dict(labels))

    checked = 0
    for where, expr in expressions(dashboard):
        for name, matchers in selectors(grafana_expanded(expr)):
            assert name in labels_of, f"{where} queries {name}, which a scrape of KvbmMetrics does not show"
            for label, op, value in matchers:
                if label in ADDED_BY_PROMETHEUS:
                    continue
                assert any(label in series for series in labels_of[name]), f"{where}: {name} has no label {label}"
                if op in EXACT:
                    seen = {series[label] for series in labels_of[name]}
                    assert value in seen, f"{where}: {name}{{{label}}} is never {value!r} (seen: {sorted(seen)})"
            checked += 1
    assert checked >= 15


def test_the_dashboard_shows_every_family_kvbm_metrics_serves(dashboard: dict[str, Any], served: Samples) -> None:
    queried = {name for _, expr in expressions(dashboard) for name, _ in selectors(grafana_expanded(expr))}
    families = {re.sub(r"_(bucket|count|sum)$", "", name) for name, _ in served}
    # the dashboard queries upstream's names (so it works against upstream too), not their _total twins
    twins = {name + "_total" for name in families if name + "_total" in families}
    shown = {re.sub(r"_bucket$", "", name) for name in queried}

    assert families - twins - shown == set()
