"""Identity pools (issue 21) on the sandbox: the operator against the real API server, the Entra
emulator's Graph (apps the operator created and owns) and the SQL emulator through ODBC.

A pool of three app registrations, each allowed two credentials (``reservedPerMember: 18``), one
of them already carrying another cluster's credential (it counts): three resources fill the first
member's last slot and the second member; every service account is annotated with its member's
client id, each member gets a database user of its own and Verified proves each chain; the
pool's status shows members, credentials and namespaces; removing a member moves its service
account to the member with room, with a Warning Event, and removes the old credential; deleting
the resources removes every credential this cluster made and no other.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from operator_harness import (  # type: ignore[import-not-found]
    AUDIENCE,
    DRIFT_INTERVAL_S,
    GROUP,
    POOL_PLURAL,
    VERSION,
    Cluster,
    Entra,
    OperatorGraph,
    World,
    eventually,
    pool_manifest,
)
from sql_harness import DATABASE, SqlAdmin  # type: ignore[import-not-found]

pytestmark = pytest.mark.controlplane

FOREIGN_ISSUER = "https://oidc.example.net/another-cluster"


@pytest.fixture
def pool_apps(world: World, entra: Entra) -> Iterator[tuple[OperatorGraph, list[dict[str, Any]]]]:
    graph = OperatorGraph(world, entra)
    tag = uuid.uuid4().hex[:6]
    apps = [graph.app(f"pool-{tag}-{letter}") for letter in "abc"]
    yield graph, apps
    for app in apps:
        graph.call("DELETE", f"/applications/{app['id']}")


@pytest.fixture
def pool(cluster: Cluster, pool_apps: Any) -> Iterator[str]:
    _, apps = pool_apps
    name = f"pool-{cluster.namespace}"
    body = pool_manifest(name, [app["appId"] for app in apps], reservedPerMember=18)
    cluster.custom.create_cluster_custom_object(GROUP, VERSION, POOL_PLURAL, body)
    yield name
    cluster.custom.delete_cluster_custom_object(GROUP, VERSION, POOL_PLURAL, name)


def members_of(cluster: Cluster, names: list[str]) -> dict[str, str]:
    """Each resource's member client id, as its status records it."""
    return {
        name: ((cluster.get(name) or {}).get("status") or {}).get("identity", {}).get("clientId")
        for name in names
    }


def ours(graph: OperatorGraph, app: dict[str, Any], namespace: str) -> list[str]:
    prefix = f"system:serviceaccount:{namespace}:"
    return sorted(c["subject"] for c in graph.credentials(app) if c["subject"].startswith(prefix))


def test_a_pool_spreads_service_accounts_keeps_them_and_moves_them_only_when_it_must(
    sql: SqlAdmin,
    operator: Any,
    cluster: Cluster,
    entra: Entra,
    pool: str,
    pool_apps: Any,
) -> None:
    graph, apps = pool_apps
    a, b, c = apps
    # Another cluster's credential on the first member: Entra's budget counts it.
    graph.call(
        "POST",
        f"/applications/{a['id']}/federatedIdentityCredentials",
        {
            "name": "other-cluster",
            "issuer": FOREIGN_ISSUER,
            "subject": "x",
            "audiences": [AUDIENCE],
        },
    )
    names = ["r0", "r1", "r2"]
    for name in names:
        cluster.create(
            name,
            {
                "serviceAccountName": f"{name}-sa",
                "identity": {"poolName": pool},
                "sql": {"server": sql.server, "database": DATABASE, "roles": ["db_datareader"]},
            },
        )
    for name in names:
        cluster.wait_condition(name, timeout=90)

    placed = members_of(cluster, names)
    by_member = {
        app["appId"]: sorted(n for n, m in placed.items() if m == app["appId"]) for app in apps
    }
    assert [len(by_member[app["appId"]]) for app in apps] == [1, 2, 0], placed
    ns = cluster.namespace
    assert ours(graph, a, ns) == [
        f"system:serviceaccount:{ns}:{n}-sa" for n in by_member[a["appId"]]
    ]
    assert len(graph.credentials(a)) == 2  # its capacity: 20 - 18
    for name, client_id in placed.items():
        body = cluster.get(name) or {}
        assert body["status"]["identity"]["pool"] == pool
        sa = cluster.core.read_namespaced_service_account(f"{name}-sa", ns)
        assert sa.metadata.annotations["azure.workload.identity/client-id"] == client_id
        verified = cluster.condition(name, "Verified")
        assert verified is not None and verified["status"] == "True", verified
        # The chain as the pod lives it: its token, Entra's exchange for its member.
        exchanged = entra.exchange(client_id, cluster.token(f"{name}-sa"))
        assert exchanged.status_code == 200, exchanged.text
    # One contained user per member used, each named after its member.
    users = sql.users()
    assert users.get(a["displayName"]) == {"db_datareader"}
    assert users.get(b["displayName"]) == {"db_datareader"}
    assert c["displayName"] not in users

    def pool_row() -> list[str] | None:
        out = cluster.kubectl("get", "sipool", pool, "--no-headers").stdout.split()
        return out if out[1:5] == ["3", "4/60", "3", "1"] else None

    eventually(
        pool_row, 30, "the pool's status: 3 members, 4/60 credentials, 3 resources, 1 namespace"
    )
    status = cluster.custom.get_cluster_custom_object(GROUP, VERSION, POOL_PLURAL, pool)["status"]
    assert [(m["credentials"], m["thisCluster"]) for m in status["members"]] == [
        (2, 1),
        (2, 2),
        (0, 0),
    ]

    # Drift checks never move anyone: nothing changes over a few drift intervals.
    time.sleep(DRIFT_INTERVAL_S * 3)
    assert members_of(cluster, names) == placed

    # The first member leaves the pool: its service account moves to the one with room (c).
    leaver = by_member[a["appId"]][0]
    cluster.custom.patch_cluster_custom_object(
        GROUP,
        VERSION,
        POOL_PLURAL,
        pool,
        {"spec": {"members": [{"applicationClientId": app["appId"]} for app in (b, c)]}},
    )
    eventually(
        lambda: members_of(cluster, [leaver])[leaver] == c["appId"],
        30,
        f"{leaver} moved to the member with room",
    )
    cluster.wait_condition(leaver, timeout=60)
    assert ours(graph, a, ns) == []  # the old credential removed; the other cluster's stays
    assert [x["name"] for x in graph.credentials(a)] == ["other-cluster"]
    assert ours(graph, c, ns) == [f"system:serviceaccount:{ns}:{leaver}-sa"]
    assert "PoolMemberChanged" in cluster.reasons(leaver)
    moved = next(e for e in cluster.events(leaver) if e.reason == "PoolMemberChanged")
    assert moved.type == "Warning" and "no longer a member" in moved.message
    assert members_of(cluster, [n for n in names if n != leaver]) == {
        n: placed[n] for n in names if n != leaver
    }

    for name in names:
        cluster.delete(name)
    for name in names:
        cluster.wait_gone(name, timeout=60)
    assert ours(graph, b, ns) == [] and ours(graph, c, ns) == []
    assert [x["name"] for x in graph.credentials(a)] == ["other-cluster"]


def test_a_full_pool_grows_by_an_app_registration_the_operator_creates_and_owns(
    operator: Any, cluster: Cluster, entra: Entra, world: World
) -> None:
    graph = OperatorGraph(world, entra)
    tag = uuid.uuid4().hex[:6]
    seed = graph.app(f"grow-{tag}-seed")
    name = f"grow-{cluster.namespace}"
    body = pool_manifest(
        name,
        [seed["appId"]],
        reservedPerMember=19,  # one credential a member
        growth={"maxMembers": 2, "displayNamePrefix": f"grow-{tag}"},
    )
    cluster.custom.create_cluster_custom_object(GROUP, VERSION, POOL_PLURAL, body)
    made: list[dict[str, Any]] = []
    try:
        for i in range(3):
            cluster.create(
                f"g{i}", {"serviceAccountName": f"g{i}-sa", "identity": {"poolName": name}}
            )
            if i < 2:
                cluster.wait_condition(f"g{i}", timeout=60)
        found = graph.call("GET", f"/applications?$filter=displayName eq 'grow-{tag}-1'")["value"]
        assert len(found) == 1, found  # created once, by the operator, which owns it
        made = found
        grown = found[0]
        status = (cluster.get("g1") or {})["status"]
        assert status["identity"]["clientId"] == grown["appId"]
        verified = cluster.condition("g1", "Verified")
        assert verified is not None and verified["status"] == "True", verified
        exchanged = entra.exchange(grown["appId"], cluster.token("g1-sa"))
        assert exchanged.status_code == 200, exchanged.text
        assert "PoolGrown" in cluster.reasons("g1")
        pool = cluster.custom.get_cluster_custom_object(GROUP, VERSION, POOL_PLURAL, name)
        assert pool["status"]["grown"] == [
            {"applicationClientId": grown["appId"], "name": f"grow-{tag}-1"}
        ]
        # At its maximum: the third waits, saying what to change; no third app.
        refused = cluster.wait_condition(
            "g2", "False", "FederatedCredentialReady", reason="PoolExhausted"
        )
        assert "spec.growth.maxMembers" in refused["message"], refused
        assert (
            graph.call("GET", f"/applications?$filter=displayName eq 'grow-{tag}-2'")["value"] == []
        )
    finally:
        cluster.custom.delete_cluster_custom_object(GROUP, VERSION, POOL_PLURAL, name)
        for app in [seed, *made]:
            graph.call("DELETE", f"/applications/{app['id']}")


def test_a_growing_pool_adopts_the_oldest_app_of_its_next_name(
    operator: Any, cluster: Cluster, entra: Entra, world: World
) -> None:
    """Two apps named like the pool's next member (as when two clusters' operators grew the pool
    at once): the growth adopts the older, in every cluster alike, and creates none."""
    graph = OperatorGraph(world, entra)
    tag = uuid.uuid4().hex[:6]
    seed = graph.app(f"dup-{tag}-seed")
    older = graph.app(f"dup-{tag}-1")
    younger = graph.app(f"dup-{tag}-1")
    name = f"dup-{cluster.namespace}"
    body = pool_manifest(
        name,
        [seed["appId"]],
        reservedPerMember=19,
        growth={"maxMembers": 2, "displayNamePrefix": f"dup-{tag}"},
    )
    cluster.custom.create_cluster_custom_object(GROUP, VERSION, POOL_PLURAL, body)
    try:
        for i in range(2):
            cluster.create(
                f"d{i}", {"serviceAccountName": f"d{i}-sa", "identity": {"poolName": name}}
            )
            cluster.wait_condition(f"d{i}", timeout=60)
        status = (cluster.get("d1") or {})["status"]
        assert status["identity"]["clientId"] == older["appId"]
        pool = cluster.custom.get_cluster_custom_object(GROUP, VERSION, POOL_PLURAL, name)
        assert pool["status"]["grown"] == [
            {"applicationClientId": older["appId"], "name": f"dup-{tag}-1"}
        ]
        named = graph.call("GET", f"/applications?$filter=displayName eq 'dup-{tag}-1'")["value"]
        assert sorted(a["appId"] for a in named) == sorted([older["appId"], younger["appId"]])
        assert graph.credentials(younger) == []
    finally:
        cluster.custom.delete_cluster_custom_object(GROUP, VERSION, POOL_PLURAL, name)
        for app in (seed, older, younger):
            graph.call("DELETE", f"/applications/{app['id']}")


def test_a_full_pool_grows_by_a_managed_identity_it_creates_through_arm(
    operator: Any, cluster: Cluster, entra: Entra, world: World
) -> None:
    """``spec.growth.managedIdentity``: the new member is a user-assigned managed identity the
    operator creates in the resource group it may write (the sandbox's sandbox-pool-rg), and the
    service account placed there exchanges its token for it."""
    graph = OperatorGraph(world, entra)
    tag = uuid.uuid4().hex[:6]
    seed = graph.app(f"migrow-{tag}-seed")
    group = f"/subscriptions/{world.subscription}/resourceGroups/sandbox-pool-rg"
    grown_id = f"{group}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/migrow-{tag}-1"
    name = f"migrow-{cluster.namespace}"
    body = pool_manifest(
        name,
        [seed["appId"]],
        reservedPerMember=19,
        growth={
            "maxMembers": 2,
            "displayNamePrefix": f"migrow-{tag}",
            "managedIdentity": {"resourceGroupId": group, "location": "eastus"},
        },
    )
    cluster.custom.create_cluster_custom_object(GROUP, VERSION, POOL_PLURAL, body)
    try:
        for i in range(2):
            cluster.create(
                f"m{i}", {"serviceAccountName": f"m{i}-sa", "identity": {"poolName": name}}
            )
            cluster.wait_condition(f"m{i}", timeout=60)
        made = entra.arm("GET", grown_id)
        assert made.status_code == 200, made.text
        client_id = made.json()["properties"]["clientId"]
        status = (cluster.get("m1") or {})["status"]
        assert status["identity"]["clientId"] == client_id
        assert status["identity"]["kind"] == "ManagedIdentity"
        verified = cluster.condition("m1", "Verified")
        assert verified is not None and verified["status"] == "True", verified
        exchanged = entra.exchange(client_id, cluster.token("m1-sa"))
        assert exchanged.status_code == 200, exchanged.text
        assert "PoolGrown" in cluster.reasons("m1")
        pool = cluster.custom.get_cluster_custom_object(GROUP, VERSION, POOL_PLURAL, name)
        assert [
            (g["managedIdentityResourceId"].lower(), g["name"]) for g in pool["status"]["grown"]
        ] == [(grown_id.lower(), f"migrow-{tag}-1")]
    finally:
        cluster.custom.delete_cluster_custom_object(GROUP, VERSION, POOL_PLURAL, name)
        for i in range(2):
            cluster.delete(f"m{i}")
        for i in range(2):
            cluster.wait_gone(f"m{i}", timeout=60)
        entra.arm("DELETE", grown_id)
        graph.call("DELETE", f"/applications/{seed['id']}")
