"""The operator's Prometheus endpoint against the sandbox: ``python -m swi_operator`` as a real
process, with its metrics on a port of its own and its logs as JSON; once an app registration's
and a managed identity's resources are Ready, a scrape over HTTP shows the reconciles, the Graph,
ARM and token-service requests with their statuses, and the Verified probes."""

from __future__ import annotations

import json
import socket
from typing import Any

import requests
from operator_harness import Cluster, World  # type: ignore[import-not-found]
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> dict[str, list[Any]]:
    response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return {
        family.name: list(family.samples)
        for family in text_string_to_metric_families(response.text)
    }


def total(samples: list[Any], **labels: str) -> float:
    return sum(
        s.value
        for s in samples
        if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_metrics_port_shows_reconciles_and_cloud_calls(
    operator_env: dict[str, str], operator_process: Any, cluster: Cluster, world: World, tmp_path
):
    port = free_port()
    operator_env.update(
        SWI_METRICS_PORT=str(port), SWI_METRICS_ADDRESS="127.0.0.1", SWI_LOG_FORMAT="json"
    )
    operator_process()
    cluster.create(
        "app-reader",
        {
            "serviceAccountName": "app-reader",
            "identity": {"applicationClientId": world.demo_app.client_id},
        },
    )
    cluster.create(
        "mi-reader",
        {
            "serviceAccountName": "mi-reader",
            "identity": {"managedIdentityResourceId": world.customer_identity.object_id},
        },
    )
    for name in ("app-reader", "mi-reader"):
        cluster.wait_condition(name, timeout=90)
        cluster.wait_condition(name, type_="Verified", timeout=90)

    families = scrape(port)
    reconciles = families["swi_reconciles"]
    assert total(reconciles, operation="reconcile", result="ready") >= 2, reconciles
    calls = families["swi_cloud_requests"]
    graph_ok = [
        s for s in calls if s.labels["service"] == "graph" and s.labels["status"].startswith("2")
    ]
    assert sum(s.value for s in graph_ok) > 0, calls
    routes = {s.labels["route"] for s in graph_ok}
    assert "/v1.0/applications(appId={id})" in routes, routes
    assert "/v1.0/applications/{id}/federatedIdentityCredentials(name={id})" in routes, routes
    arm_ok = [
        s for s in calls if s.labels["service"] == "arm" and s.labels["status"].startswith("2")
    ]
    assert sum(s.value for s in arm_ok) > 0, calls
    assert total(calls, service="entra") > 0, calls  # the Verified probes' token exchanges
    # No object id, app id or tenant-chosen name in any label of the scrape.
    labels = json.dumps([s.labels for samples in families.values() for s in samples])
    for chosen in (
        world.demo_app.client_id,
        world.demo_app.object_id,
        world.subscription,
        "customer-api-identity",
        "app-reader",
        "mi-reader",
    ):
        assert chosen not in labels, chosen
    assert total(families["swi_verified_probes"], status="True", reason="Verified") >= 2
    assert families["swi_reconcile_slots"][0].value > 0
    steps = {s.labels["step"] for s in families["swi_step_duration_seconds"]}
    assert {"FederatedCredentialReady", "ServiceAccountReady", "Verified"} <= steps, steps

    # --log-format json: every line the operator logged is one JSON object with a message.
    lines = [
        line for line in (tmp_path / "operator-0.log").read_text().splitlines() if line.strip()
    ]
    assert lines, "the operator logged nothing"
    for line in lines:
        record = json.loads(line)
        assert isinstance(record, dict) and "message" in record, line
