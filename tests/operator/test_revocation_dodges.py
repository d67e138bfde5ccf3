# ruff: noqa: F811  (the guardrail fixtures, imported by name for pytest)
"""Issue 18 against the sandbox: a hostile namespace tenant tries each dodge, the platform withdraws
the policy, and the credential still goes.

The real operator (KopfRunner) with requirePolicy on serves two tenant namespaces. The tenant may
create and delete resources, service accounts and annotations in its own namespace; it cannot
write status (docs/security.md). Each test measures how long the credential survived the policy's
withdrawal (printed: run with -s; the machine is shared, so timings are noisy) and bounds it by
the sweep interval generously, never tighter.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from operator_harness import (  # type: ignore[import-not-found]
    GROUP,
    PLURAL,
    VERSION,
    Cluster,
    Entra,
    World,
    eventually,
)
from sql_harness import SqlAdmin  # type: ignore[import-not-found]
from test_policy_guardrails import (  # type: ignore[import-not-found]  # noqa: F401
    Policies,
    app,
    guarded,
    guarded_env,
    policies,
    sql_spec,
    tenant_b,
)

pytestmark = pytest.mark.controlplane

SWEEP_INTERVAL_S = 10.0
BOUND_S = SWEEP_INTERVAL_S + 30.0  # one sweep, plus a generous margin for a loaded machine


@pytest.fixture
def drift_interval() -> str:
    return "600"  # no drift check: what revokes must be the policy event or the sweep


@pytest.fixture(autouse=True)
def sweep_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWI_SWEEP_INTERVAL", str(SWEEP_INTERVAL_S))


def subjects(entra: Entra, world: World) -> set[str]:
    return {c["subject"] for c in entra.credentials(world.demo_app)}


def demo_policy(policies: Policies, world: World, cluster: Cluster, **spec: Any) -> str:
    full: str = policies.create(
        "demo", {"applicationClientId": world.demo_app.client_id}, {"names": [cluster.namespace]}
    )
    if spec:
        policies.custom.patch_cluster_custom_object(
            GROUP, VERSION, "sqlidentitypolicies", full, {"spec": spec}
        )
    return full


def revoked_within(
    entra: Entra,
    world: World,
    subject: str,
    what: str,
    bound: float = BOUND_S,
    since: str = "the policy was withdrawn",
) -> float:
    started = time.monotonic()
    eventually(lambda: subject not in subjects(entra, world), bound, f"{what}: credential gone")
    took = time.monotonic() - started
    # KopfRunner redirects stdout to its own buffer while the operator runs.
    print(
        f"\n{what}: credential revoked {took:.1f}s after {since}",
        file=sys.__stderr__,
    )
    return took


def test_an_owner_annotation_naming_another_resource_does_not_save_the_credential(
    guarded: Any, cluster: Cluster, entra: Entra, world: World, policies: Policies
) -> None:
    """Finding 1: the tenant points its service account's owner annotation at a decoy."""
    policy = demo_policy(policies, world, cluster)
    cluster.create("reader", app(world, "reader"))
    cluster.create("decoy", app(world, "decoy"))
    cluster.wait_condition("reader")
    cluster.wait_condition("decoy")
    subject = f"system:serviceaccount:{cluster.namespace}:reader"
    assert subject in subjects(entra, world)
    cluster.core.patch_namespaced_service_account(
        "reader",
        cluster.namespace,
        {"metadata": {"annotations": {"sqlidentity.io/owner": "decoy"}}},
    )

    policies.delete(policy)

    revoked_within(entra, world, subject, "owner annotation (common path)", bound=20)
    assert entra.exchange(world.demo_app.client_id, cluster.token("reader")).status_code == 400
    cluster.wait_condition("reader", "False", reason="NotAuthorized", timeout=20)
    eventually(
        lambda: "AccessRevoked" in {e.reason for e in cluster.events("reader")}, 20, "the Event"
    )


def test_retain_then_delete_keeps_the_credential_only_while_a_policy_allows_retain(
    guarded: Any, cluster: Cluster, entra: Entra, world: World, policies: Policies
) -> None:
    policy = demo_policy(policies, world, cluster)
    cluster.create("retained", app(world, "retained", deletionPolicy="Retain"))
    refused = cluster.wait_condition("retained", "False", reason="NotAuthorized")
    assert "allowRetain" in refused["message"], refused["message"]
    subject = f"system:serviceaccount:{cluster.namespace}:retained"
    assert subject not in subjects(entra, world)

    policies.custom.patch_cluster_custom_object(
        GROUP, VERSION, "sqlidentitypolicies", policy, {"spec": {"allowRetain": True}}
    )
    cluster.wait_condition("retained", timeout=30)
    cluster.delete("retained")
    cluster.wait_gone("retained")
    time.sleep(3)  # the deletion's sweep has run: what Retain left, a policy allows
    assert subject in subjects(entra, world)

    policies.delete(policy)
    revoked_within(entra, world, subject, "Retain then delete (no resource left)")


def test_removing_the_finalizer_before_deleting_does_not_keep_the_credential(
    guarded: Any, cluster: Cluster, entra: Entra, world: World, policies: Policies
) -> None:
    policy = demo_policy(policies, world, cluster)
    cluster.create("escapee", app(world, "escapee"))
    cluster.wait_condition("escapee")
    subject = f"system:serviceaccount:{cluster.namespace}:escapee"
    assert subject in subjects(entra, world)

    # The tenant strips the finalizer and deletes in one go: the operator's clean-up never runs.
    cluster.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        cluster.namespace,
        PLURAL,
        "escapee",
        [{"op": "replace", "path": "/metadata/finalizers", "value": []}],
        _content_type="application/json-patch+json",
    )
    cluster.delete("escapee")
    cluster.wait_gone("escapee")
    # Nothing allowed backs the credential any more: the sweep the deletion woke removes it,
    # policy or not.
    revoked_within(entra, world, subject, "finalizer removed, then delete", since="the deletion")
    policies.delete(policy)


def test_a_patched_kopf_annotation_does_not_take_the_resource_out_of_view(
    guarded: Any, cluster: Cluster, entra: Entra, world: World, policies: Policies
) -> None:
    policy = demo_policy(policies, world, cluster)
    cluster.create("reader", app(world, "reader"))
    cluster.wait_condition("reader")
    subject = f"system:serviceaccount:{cluster.namespace}:reader"
    forged = '{"spec":{"serviceAccountName":"reader","identity":{}}}'
    cluster.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        cluster.namespace,
        PLURAL,
        "reader",
        {
            "metadata": {
                "annotations": {
                    "sqlidentity.io/last-handled-configuration": forged,
                    "kopf.zalando.org/last-handled-configuration": forged,
                }
            }
        },
        _content_type="application/merge-patch+json",
    )
    body = cluster.get("reader") or {}
    assert "kopf" in body["status"], "kopf's state lives in status, out of the tenant's reach"

    policies.delete(policy)

    revoked_within(entra, world, subject, "kopf annotations patched (common path)", bound=20)
    cluster.wait_condition("reader", "False", reason="NotAuthorized", timeout=20)


def test_a_credential_nothing_backs_goes_within_one_sweep_without_any_event(
    guarded: Any, cluster: Cluster, entra: Entra, world: World, policies: Policies, sandbox: Any
) -> None:
    """No policy event, no deletion: a credential for this cluster's issuer that someone added by
    hand for a service account of the namespace goes at the next periodic sweep."""
    demo_policy(policies, world, cluster)
    cluster.create("reader", app(world, "reader"))
    cluster.wait_condition("reader")
    time.sleep(2)  # the policy's and the creation's sweeps are over
    subject = f"system:serviceaccount:{cluster.namespace}:smuggled"
    entra.add_app_credential(world.demo_app, "smuggled-by-hand", sandbox.issuer, subject)
    assert subject in subjects(entra, world)
    revoked_within(
        entra, world, subject, "out-of-band credential (periodic sweep)", since="it was added"
    )
    assert f"system:serviceaccount:{cluster.namespace}:reader" in subjects(entra, world)


def ledger_entries(cluster: Cluster, uid: str) -> list[dict[str, Any]]:
    """The ledger's database-user entries of one resource (swi_operator.ledger; the in-process
    operator has no POD_NAMESPACE, so its ledger lives in ``default``)."""
    from swi_operator.ledger import LEDGER_NAME, SHARDS

    data: dict[str, str] = {}
    for shard in SHARDS:
        with contextlib.suppress(ApiException):  # a shard nobody wrote yet does not exist
            data.update(
                cluster.core.read_namespaced_config_map(f"{LEDGER_NAME}-{shard}", "default").data
                or {}
            )
    entries = [json.loads(v) for k, v in data.items() if k.startswith("db.")]
    return [e for e in entries if e["uid"] == uid]


def test_the_database_user_goes_too_whatever_the_tenant_did(
    sql: SqlAdmin,
    guarded: Any,
    cluster: Cluster,
    entra: Entra,
    world: World,
    policies: Policies,
) -> None:
    """The users the operator created: one left by Retain then delete goes when the platform
    withdraws the policy; one whose resource was deleted with its finalizer stripped goes at
    the sweep the deletion woke. Neither resource's status exists any more: the ledger decides."""
    customer = {"applicationClientId": world.customer_api.client_id}
    policy = policies.create(
        "db",
        customer,
        {"names": [cluster.namespace]},
        sql={"servers": [sql.server], "databases": ["mydb"], "roles": ["db_datareader"]},
    )
    policies.custom.patch_cluster_custom_object(
        GROUP, VERSION, "sqlidentitypolicies", policy, {"spec": {"allowRetain": True}}
    )
    retained_sql = {**sql_spec(sql, "db_datareader"), "userName": "retained-user"}
    escapee_sql = {**sql_spec(sql, "db_datareader"), "userName": "escapee-user"}
    retained = app(world, "retained", deletionPolicy="Retain", sql=retained_sql)
    cluster.create("retained", {**retained, "identity": customer})
    cluster.wait_condition("retained", timeout=30)
    assert "retained-user" in sql.users()
    uid = (cluster.get("retained") or {})["metadata"]["uid"]
    assert [e["created"] for e in ledger_entries(cluster, uid)] == [True]
    cluster.delete("retained")
    cluster.wait_gone("retained")
    time.sleep(3)  # the deletion's sweep has run: what Retain left, a policy allows
    assert "retained-user" in sql.users()

    policies.delete(policy)
    started = time.monotonic()
    eventually(lambda: "retained-user" not in sql.users(), BOUND_S, "Retain: the user dropped")
    print(
        f"\nRetain then delete: database user dropped {time.monotonic() - started:.1f}s after "
        "the policy was withdrawn",
        file=sys.__stderr__,
    )
    assert ledger_entries(cluster, uid) == []

    policy = policies.create(
        "db2",
        customer,
        {"names": [cluster.namespace]},
        sql={"servers": [sql.server], "databases": ["mydb"], "roles": ["db_datareader"]},
    )
    # The same identity again (its earlier user is gone), deleted with its finalizer stripped.
    cluster.create("escapee", {**app(world, "escapee", sql=escapee_sql), "identity": customer})
    cluster.wait_condition("escapee", timeout=30)
    assert "escapee-user" in sql.users()
    cluster.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        cluster.namespace,
        PLURAL,
        "escapee",
        [{"op": "replace", "path": "/metadata/finalizers", "value": []}],
        _content_type="application/json-patch+json",
    )
    cluster.delete("escapee")
    cluster.wait_gone("escapee")
    started = time.monotonic()
    eventually(lambda: "escapee-user" not in sql.users(), BOUND_S, "finalizer: the user dropped")
    print(
        f"\nfinalizer removed, then delete: database user dropped "
        f"{time.monotonic() - started:.1f}s after the deletion",
        file=sys.__stderr__,
    )
    policies.delete(policy)


def test_a_namespace_label_change_revokes_without_waiting_for_drift(
    guarded: Any, cluster: Cluster, entra: Entra, world: World, policies: Policies
) -> None:
    """A policy that selects namespaces by label: when the label goes, access goes at once, not
    at the next drift cycle (600 s here). The operator's namespace watch wakes the policy review
    (``NamespaceLabels``, unit-tested in test_policy_gate.py); in this test's namespaced mode
    kopf's own namespace watch also re-runs the namespace's handlers. Either way the condition
    must turn NotAuthorized, which the sweep alone never does."""
    label = {"sqlidentity.io/dodge-test": cluster.namespace}
    cluster.core.patch_namespace(cluster.namespace, {"metadata": {"labels": label}})
    policies.create(
        "by-label",
        {"applicationClientId": world.demo_app.client_id},
        {"selector": {"matchLabels": label}},
    )
    cluster.create("reader", app(world, "reader"))
    cluster.wait_condition("reader")
    subject = f"system:serviceaccount:{cluster.namespace}:reader"
    assert subject in subjects(entra, world)

    removed = {"metadata": {"labels": {"sqlidentity.io/dodge-test": None}}}
    cluster.core.patch_namespace(cluster.namespace, removed)

    revoked_within(
        entra, world, subject, "namespace label removed", bound=20, since="the label went"
    )
    cluster.wait_condition("reader", "False", reason="NotAuthorized", timeout=20)
