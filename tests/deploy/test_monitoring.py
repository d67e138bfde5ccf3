"""Monitoring as shipped: the chart's metrics Service and ServiceMonitor, deploy/components/
monitoring, and a Grafana dashboard whose every query names metrics the operator exports."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import swi_operator.metrics  # noqa: F401  (registers the operator's metrics)
from deploy_harness import (  # type: ignore[import-not-found]
    NAMESPACE,
    OPERATOR,
    REPO,
    render_helm,
    render_kustomize,
)
from prometheus_client import REGISTRY

MONITORING = REPO / "deploy/components/monitoring"
DASHBOARD = json.loads((MONITORING / "dashboard.json").read_text())
_SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def _operator_families() -> set[str]:
    return {family.name for family in REGISTRY.collect() if family.name.startswith("swi_")}


def _queried() -> set[str]:
    exprs = [t["expr"] for panel in DASHBOARD["panels"] for t in panel["targets"]]
    exprs += [v["query"] for v in DASHBOARD["templating"]["list"] if v["type"] == "query"]
    names = {name for expr in exprs for name in re.findall(r"\b(swi_[a-z_]+)", expr)}
    assert names, "the dashboard queries no swi_ metric"
    return names


def _family(sample_name: str, families: set[str]) -> str | None:
    if sample_name in families:
        return sample_name
    for suffix in _SUFFIXES:
        if sample_name.endswith(suffix) and sample_name.removesuffix(suffix) in families:
            return sample_name.removesuffix(suffix)
    return None


def test_every_metric_the_dashboard_queries_exists_and_every_metric_is_shown() -> None:
    families = _operator_families()
    unknown = {name for name in _queried() if _family(name, families) is None}
    assert not unknown, f"the dashboard queries metrics the operator does not export: {unknown}"
    shown = {_family(name, families) for name in _queried()}
    assert not families - shown, f"metrics no dashboard panel shows: {families - shown}"


def test_dashboard_is_importable_json_with_a_datasource_variable() -> None:
    assert DASHBOARD["uid"] and DASHBOARD["title"]
    assert {v["name"] for v in DASHBOARD["templating"]["list"]} >= {"datasource", "job"}
    ids = [panel["id"] for panel in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in DASHBOARD["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = _by_kind(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


def test_chart_serves_metrics_behind_a_service_by_default() -> None:
    docs = render_helm("aks-values.yaml")
    container = _container(docs)
    assert _env(container)["SWI_METRICS_PORT"] == "9090"
    assert {"name": "metrics", "containerPort": 9090} in container["ports"]
    service = next(
        s for s in _by_kind(docs, "Service") if s["metadata"]["name"] == f"{OPERATOR}-metrics"
    )
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics"}]
    assert not _by_kind(docs, "ServiceMonitor")


def test_chart_servicemonitor_selects_the_metrics_service() -> None:
    docs = render_helm(
        "generic-values.yaml",
        set_values=(
            "metrics.serviceMonitor.enabled=true",
            "metrics.serviceMonitor.interval=15s",
            "metrics.serviceMonitor.labels.release=prometheus",
            "metrics.port=9191",
        ),
    )
    (monitor,) = _by_kind(docs, "ServiceMonitor")
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s"}
    ]
    selected = [
        s
        for s in _by_kind(docs, "Service")
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == [f"{OPERATOR}-metrics"]
    assert selected[0]["spec"]["ports"][0]["port"] == 9191
    assert _env(_container(docs))["SWI_METRICS_PORT"] == "9191"


def test_chart_without_metrics_serves_none() -> None:
    docs = render_helm("aks-values.yaml", set_values=("metrics.enabled=false",))
    container = _container(docs)
    assert _env(container)["SWI_METRICS_PORT"] == "0"
    assert "metrics" not in {p["name"] for p in container["ports"]}
    assert f"{OPERATOR}-metrics" not in {s["metadata"]["name"] for s in _by_kind(docs, "Service")}


MONITORED_OVERLAY = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [{aks}]
components: [{monitoring}]
"""


def test_monitoring_component_adds_servicemonitor_and_dashboard(
    sandbox: Any, tmp_path: Any
) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        MONITORED_OVERLAY.format(
            aks=os.path.relpath(REPO / "deploy/overlays/aks", tmp_path),
            monitoring=os.path.relpath(MONITORING, tmp_path),
        )
    )
    docs = render_kustomize(sandbox, tmp_path)
    (monitor,) = _by_kind(docs, "ServiceMonitor")
    (service,) = [
        s for s in _by_kind(docs, "Service") if s["metadata"]["name"].endswith("-metrics")
    ]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"] == NAMESPACE
    (dashboard,) = [
        c
        for c in _by_kind(docs, "ConfigMap")
        if c["metadata"].get("labels", {}).get("grafana_dashboard")
    ]
    assert json.loads(dashboard["data"]["dashboard.json"]) == DASHBOARD
    container = _container(docs)
    assert {"name": "metrics", "containerPort": 9090} in container["ports"]
    assert _env(container)["SWI_METRICS_PORT"] == "9090"
