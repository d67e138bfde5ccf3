"""The operator under faults: drift, throttling storms, concurrent ARM writes, Entra's limits,
missing permissions, and being killed in the middle of a reconcile."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
from operator_harness import (  # type: ignore[import-not-found]
    DRIFT_INTERVAL_S,
    Cluster,
    Entra,
    World,
    eventually,
)

pytestmark = pytest.mark.controlplane


def app_spec(world: World, sa: str = "reader") -> dict[str, object]:
    return {"serviceAccountName": sa, "identity": {"applicationClientId": world.demo_app.client_id}}


def mi_spec(world: World, sa: str) -> dict[str, object]:
    return {
        "serviceAccountName": sa,
        "identity": {"managedIdentityResourceId": world.customer_identity.object_id},
    }


def writes(entra: Entra) -> int:
    counts = entra.admin.requests()["counts"]
    return sum(
        n
        for route, n in counts.items()
        if route
        in (
            "graph.fic.update",
            "graph.fic.create",
            "graph.fic.delete",
            "arm.fic.put",
            "arm.fic.delete",
        )
    )


def test_drift_repairs_out_of_band_changes_and_writes_nothing_otherwise(
    operator, cluster: Cluster, entra: Entra, world: World
):
    cluster.create("app", app_spec(world, "app-reader"))
    cluster.create("mi", mi_spec(world, "mi-reader"))
    cluster.wait_condition("app")
    cluster.wait_condition("mi")

    entra.admin.call("DELETE", "requests")
    time.sleep(DRIFT_INTERVAL_S * 2.5)
    assert writes(entra) == 0, "a drift check with nothing to repair must not write"
    reads = entra.admin.requests()["counts"]
    assert reads.get("graph.fic.list", 0) >= 2, "the drift check runs"

    (app_credential,) = entra.credentials(world.demo_app)
    entra.delete_app_credential(world.demo_app, app_credential["name"])
    (mi_credential,) = entra.credentials(world.customer_identity)
    entra.delete_identity_credential(world.customer_identity, mi_credential["name"])
    cluster.core.patch_namespaced_service_account(
        "app-reader",
        cluster.namespace,
        {"metadata": {"annotations": {"azure.workload.identity/client-id": None}}},
    )

    eventually(
        lambda: entra.credentials(world.demo_app), DRIFT_INTERVAL_S * 4, "app credential back"
    )
    eventually(
        lambda: entra.credentials(world.customer_identity),
        DRIFT_INTERVAL_S * 4,
        "MI credential back",
    )
    eventually(
        lambda: (
            (cluster.service_account("app-reader").metadata.annotations or {}).get(
                "azure.workload.identity/client-id"
            )
            == world.demo_app.client_id
        ),
        DRIFT_INTERVAL_S * 4,
        "annotation restored",
    )
    assert [c["name"] for c in entra.credentials(world.demo_app)] == [app_credential["name"]]
    assert cluster.condition("app")["status"] == "True"

    edited = entra.graph(
        "PATCH",
        f"/applications/{world.demo_app.object_id}/federatedIdentityCredentials"
        f"(name='{app_credential['name']}')",
        {"audiences": ["api://SomethingElse"], "description": "edited by hand"},
    )
    assert edited.status_code == 204, edited.text
    eventually(
        lambda: entra.credentials(world.demo_app)[0]["audiences"] == ["api://AzureADTokenExchange"],
        DRIFT_INTERVAL_S * 4,
        "edited audience repaired",
    )
    assert "Managed by" in entra.credentials(world.demo_app)[0]["description"]
    reasons = cluster.reasons("app")
    assert "CredentialCreated" in reasons and "ServiceAccountAnnotated" in reasons


def test_throttling_and_outage_storms_converge(
    operator, cluster: Cluster, entra: Entra, world: World
):
    entra.admin.fail("graph.*", status=429, count=6, retry_after=1)
    entra.admin.fail("arm.*", status=503, count=6)
    for i in range(3):
        cluster.create(f"app-{i}", app_spec(world, f"app-{i}"))
    cluster.create("mi", mi_spec(world, "mi"))

    for name in ("app-0", "app-1", "app-2", "mi"):
        cluster.wait_condition(name, timeout=60)
    assert len(entra.credentials(world.demo_app)) == 3
    assert len(entra.credentials(world.customer_identity)) == 1
    injected = [r for r in entra.admin.requests()["log"] if r["injected"]]
    assert {r["status"] for r in injected} == {429, 503}
    assert entra.admin.controls()["failures"] == [], "every injected failure was met"


def test_concurrent_writes_on_one_managed_identity_never_surface(
    operator, cluster: Cluster, entra: Entra, world: World
):
    entra.admin.controls(armWriteSeconds=0.5)  # overlapping writes on one identity get 409
    entra.admin.fail("arm.fic.put", status=409, count=2)  # another writer (another cluster)
    names = [f"mi-{i}" for i in range(4)]
    for name in names:
        cluster.create(name, mi_spec(world, name))
    for name in names:
        cluster.wait_condition(name, timeout=60)

    assert len(entra.credentials(world.customer_identity)) == 4
    puts = entra.admin.requests("arm.fic.put")["log"]
    conflicts = [r for r in puts if r["status"] == 409]
    assert all(r["injected"] for r in conflicts), "the operator's own writes were serialised"
    assert len(conflicts) == 2, "the injected ones were retried"
    for name in names:
        assert "ConcurrentWrite" not in [e.reason for e in cluster.events(name)]


def test_twenty_first_credential_is_a_permanent_condition(
    operator, cluster: Cluster, entra: Entra, world: World
):
    app = world.customer_api
    for i in range(20):
        entra.add_app_credential(
            app, f"other-cluster-{i}", f"https://cluster-{i}.example", "system:serviceaccount:x:y"
        )
    entra.admin.call("DELETE", "requests")

    cluster.create(
        "onboard",
        {"serviceAccountName": "onboard", "identity": {"applicationClientId": app.client_id}},
    )

    cond = cluster.wait_condition("onboard", "False", reason="CredentialLimitReached")
    assert (
        "20 federated credentials (0 from this cluster, 20 from other issuers)" in cond["message"]
    )
    time.sleep(DRIFT_INTERVAL_S * 2)
    assert writes(entra) == 0, "no retry loop of writes"
    assert [e.type for e in cluster.events("onboard") if e.reason == "CredentialLimitReached"] == [
        "Warning"
    ]

    # A freed slot is noticed by the drift check, without touching the spec.
    entra.delete_app_credential(app, "other-cluster-0")
    cluster.wait_condition("onboard", timeout=DRIFT_INTERVAL_S * 5)


def test_missing_permission_is_a_permanent_condition(
    operator, cluster: Cluster, entra: Entra, world: World
):
    cluster.create(
        "payroll",
        {
            "serviceAccountName": "payroll",
            "identity": {"applicationClientId": world.payroll.client_id},
        },
    )
    cluster.create(
        "finance",
        {
            "serviceAccountName": "finance",
            "identity": {"managedIdentityResourceId": world.finance_identity.object_id},
        },
    )
    payroll = cluster.wait_condition("payroll", "False", reason="PermissionDenied")
    finance = cluster.wait_condition("finance", "False", reason="PermissionDenied")
    assert "Authorization_RequestDenied" in payroll["message"] and "owner" in payroll["message"]
    assert (
        "AuthorizationFailed" in finance["message"]
        and "Managed Identity Contributor" in finance["message"]
    )
    assert cluster.service_account("payroll") is None, "nothing made for an identity it may not use"
    # Deleting a resource that never got its credential is not blocked.
    cluster.delete("payroll")
    cluster.wait_gone("payroll")


def _updates(entra: Entra, namespace: str) -> list[dict[str, Any]]:
    """This test's credential writes. (A killed request of the previous test can still end, with
    500, after the reset: the emulator finishes the injected latency before it notices.)"""
    log = entra.admin.requests("graph.fic.update")["log"]
    return [r for r in log if f"swi-{namespace}_" in r["path"]]


def _write_returned(entra: Entra, namespace: str) -> bool:
    return any(r["status"] in (200, 201, 204) for r in _updates(entra, namespace))


def test_a_restart_over_a_settled_resource_writes_nothing(
    operator_process, cluster: Cluster, entra: Entra, world: World, tmp_path: Path
):
    first = operator_process()
    cluster.create("reader", app_spec(world))
    cluster.wait_condition("reader", timeout=30)

    def settled_version() -> str | None:  # kopf's own last patches land just after Ready
        version = (cluster.get("reader") or {})["metadata"]["resourceVersion"]
        time.sleep(1)
        return (
            version
            if version == (cluster.get("reader") or {})["metadata"]["resourceVersion"]
            else None
        )

    version = eventually(settled_version, 20, "the resource to settle")
    first.terminate()
    first.wait(timeout=20)
    writes = len(_updates(entra, cluster.namespace))

    operator_process()
    log = tmp_path / "operator-1.log"
    eventually(
        lambda: "Handler 'reconcile-resume' succeeded" in log.read_text(), 30, "the resume pass"
    )
    time.sleep(2)  # what kopf would patch after the handler has had time to land
    assert (cluster.get("reader") or {})["metadata"]["resourceVersion"] == version
    assert len(_updates(entra, cluster.namespace)) == writes


@pytest.mark.parametrize("moment", ["write in flight", "write returned"])
def test_killed_mid_reconcile_and_restarted_makes_exactly_one_credential(
    operator_process, cluster: Cluster, entra: Entra, world: World, moment: str
):
    first = operator_process()
    if moment == "write in flight":
        entra.admin.latency("graph.fic.update", 3)
    cluster.create("reader", app_spec(world))

    if moment == "write in flight":
        eventually(
            lambda: entra.admin.requests("graph.fic.list")["log"],
            20,
            "the operator to reach the write",
        )
        time.sleep(0.5)
    else:
        deadline = time.monotonic() + 20
        while not _write_returned(entra, cluster.namespace) and time.monotonic() < deadline:
            time.sleep(0.005)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    entra.admin.latency("graph.fic.update", 0)
    before = entra.credentials(world.demo_app)
    assert len(before) == (0 if moment == "write in flight" else 1)

    operator_process()
    cluster.wait_condition("reader", timeout=30)

    after = entra.credentials(world.demo_app)
    assert len(after) == 1, after
    status = (cluster.get("reader") or {})["status"]
    assert status["federatedCredential"]["name"] == after[0]["name"]
    if before:  # the second life found what the first made: same object, no second write
        assert after[0]["id"] == before[0]["id"]
        updates = _updates(entra, cluster.namespace)
        assert len(updates) == 1, [(u["status"], u["at"]) for u in updates]
