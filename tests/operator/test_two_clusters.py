"""Two clusters on one tenant (issue 21): a second control plane (``launcher.attach``: its own
service-account issuer, the shared sandbox's Entra and SQL emulators) with an operator of its own,
next to the shared sandbox and its operator.

Both onboard the same identity for a namespace and service account of the same names, as two AKS
clusters of one team would: each writes the credential of its own issuer and neither changes or
deletes the other's; Entra's budget of 20 credentials per identity counts both clusters (and anyone
else's); deleting in one cluster leaves the other working, through its drift checks too, and its
database user in place while the other cluster uses it. Two clusters on one identity pool share
its members' budget: each counts the other's credentials, neither touches them, and a slot one
frees is taken by the other.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from operator_harness import (  # type: ignore[import-not-found]
    CRD_FILE,
    DRIFT_INTERVAL_S,
    GROUP,
    PLURAL,
    POLICY_CRD_FILE,
    POOL_CRD_FILE,
    POOL_PLURAL,
    ROOT,
    Cluster,
    Entra,
    OperatorGraph,
    World,
    delete_all,
    eventually,
    pool_manifest,
)
from sql_harness import DATABASE, SqlAdmin  # type: ignore[import-not-found]

from sandbox import launcher

pytestmark = pytest.mark.controlplane

SA = "workload-demo-service-account"
FOREIGN_ISSUER = "https://oidc.example.net/another-cluster"
SWEEP_INTERVAL_S = 3
DB_SA, DB_USER = "customer-api", "customer-api"  # the customer-api app's display name


def app_spec(world: World, service_account: str = SA) -> dict[str, object]:
    return {
        "serviceAccountName": service_account,
        "identity": {"applicationClientId": world.demo_app.client_id},
    }


class SecondCluster:
    def __init__(self, state_dir: Path, env: dict[str, str]) -> None:
        self.state_dir = state_dir
        self.env = env
        self.issuer = env["SANDBOX_ISSUER"]
        self.kubectl = launcher.controlplane_bin_dir() / "kubectl"

    def run_kubectl(self, *args: str) -> None:
        subprocess.run(
            [str(self.kubectl), *args],
            env={**os.environ, **self.env},
            check=True,
            capture_output=True,
            timeout=60,
        )


@pytest.fixture(scope="module")
def second(sandbox: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecondCluster]:
    state_dir = tmp_path_factory.mktemp("second-cluster")
    try:
        launcher.attach(state_dir, sandbox.state_dir)
        launcher.up(state_dir)
    except launcher.SandboxError as exc:
        launcher.down(state_dir)
        pytest.fail(f"the second cluster did not start: {exc}", pytrace=False)
    try:
        cluster = SecondCluster(state_dir, launcher.environment(state_dir))
        for crd in (CRD_FILE, POLICY_CRD_FILE, POOL_CRD_FILE):
            cluster.run_kubectl("apply", "-f", str(ROOT / "crds" / crd))
        cluster.run_kubectl(
            "wait", "--for=condition=Established", "--timeout=30s", f"crd/{PLURAL}.{GROUP}"
        )
        yield cluster
    finally:
        launcher.down(state_dir)


@pytest.fixture
def other(second: SecondCluster, namespace: str) -> Iterator[Cluster]:
    """The test's namespace, under the same name, in the second cluster."""
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=second.env["KUBECONFIG"])
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": namespace}})
    try:
        yield Cluster(api, second.kubectl, namespace)
    finally:
        core.delete_namespace(namespace)
        api.close()


@pytest.fixture
def other_operator(
    second: SecondCluster, other: Cluster, operator_env: dict[str, str], tmp_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """The second cluster's operator: the same settings and Entra app as the first one's, its
    own API server (so its own issuer, discovered from it)."""
    log = tmp_path / "operator-second-cluster.log"
    env = {
        **os.environ,
        **operator_env,
        "KUBECONFIG": second.env["KUBECONFIG"],
        "KUBECACHEDIR": second.env["KUBECACHEDIR"],
    }
    with log.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "swi_operator"], stdout=subprocess.PIPE, stderr=err, env=env
        )
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    assert line.startswith("READY"), log.read_text()
    try:
        yield process
        delete_all(other)  # while it runs: its finalizers are its to remove
    finally:
        process.terminate()
        process.wait(timeout=20)


def _assert_exchanges(entra: Entra, world: World, cluster: Cluster, service_account: str) -> None:
    """A token of the service account, in that cluster, is exchanged for the demo app's."""
    exchanged = entra.exchange(world.demo_app.client_id, cluster.token(service_account))
    assert exchanged.status_code == 200, exchanged.text


def _pairs(entra: Entra, world: World) -> list[tuple[str, str]]:
    return sorted((c["issuer"], c["subject"]) for c in entra.credentials(world.demo_app))


def test_two_clusters_federate_one_identity_without_touching_each_others_credential(
    operator: Any,
    other_operator: Any,
    cluster: Cluster,
    other: Cluster,
    second: SecondCluster,
    entra: Entra,
    world: World,
    sandbox: Any,
) -> None:
    assert second.issuer != sandbox.issuer
    subject = f"system:serviceaccount:{cluster.namespace}:{SA}"
    cluster.create("reader", app_spec(world))
    other.create("reader", app_spec(world))
    cluster.wait_condition("reader")
    other.wait_condition("reader")

    assert _pairs(entra, world) == sorted([(sandbox.issuer, subject), (second.issuer, subject)])
    for each in (cluster, other):
        _assert_exchanges(entra, world, each, SA)
    theirs = next(c for c in entra.credentials(world.demo_app) if c["issuer"] == second.issuer)
    status = (other.get("reader") or {})["status"]
    assert status["federatedCredential"]["id"] == theirs["id"]

    # Deleting in the first cluster removes its credential only (the deletion, then the sweep
    # the deletion wakes: both keep to credentials of their own issuer).
    cluster.delete("reader")
    cluster.wait_gone("reader")
    time.sleep(2 * DRIFT_INTERVAL_S + 1)  # the first operator's sweep and drift checks ran
    (left,) = entra.credentials(world.demo_app)
    assert (left["issuer"], left["subject"], left["id"]) == (second.issuer, subject, theirs["id"])
    _assert_exchanges(entra, world, other, SA)
    # The second cluster's drift checks found nothing to repair: no write, still Ready.
    ready = other.condition("reader")
    assert ready is not None and ready["status"] == "True", ready
    assert other.reasons("reader").count("CredentialCreated") == 1


def test_the_budget_of_20_counts_every_cluster_and_a_freed_slot_is_taken(
    operator: Any,
    other_operator: Any,
    cluster: Cluster,
    other: Cluster,
    second: SecondCluster,
    entra: Entra,
    world: World,
) -> None:
    for i in range(18):  # someone else's cluster holds 18 of the 20
        entra.add_app_credential(
            world.demo_app, f"elsewhere-{i}", FOREIGN_ISSUER, f"system:serviceaccount:x:sa-{i}"
        )
    cluster.create("first", app_spec(world, "sa-first"))
    cluster.wait_condition("first")
    other.create("second", app_spec(world, "sa-second"))
    other.wait_condition("second")
    assert len(entra.credentials(world.demo_app)) == 20

    other.create("third", app_spec(world, "sa-third"))
    refused = other.wait_condition(
        "third", "False", "FederatedCredentialReady", reason="CredentialLimitReached"
    )
    # Its own cluster's one, and the first cluster's with the 18 others, counted as foreign.
    assert (
        "already has 20 federated credentials (1 from this cluster, 19 from other"
        in (refused["message"])
    ), refused
    assert len(entra.credentials(world.demo_app)) == 20  # nothing written over the limit

    # The first cluster lets its slot go: the second takes it at its next drift check.
    cluster.delete("first")
    cluster.wait_gone("first")
    other.wait_condition("third", timeout=10 * DRIFT_INTERVAL_S + 20)
    issuers = [c["issuer"] for c in entra.credentials(world.demo_app)]
    assert issuers.count(second.issuer) == 2 and issuers.count(FOREIGN_ISSUER) == 18
    _assert_exchanges(entra, world, other, "sa-third")


@pytest.fixture
def quick_sweep(operator_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Both operators sweep every few seconds (ask for it before ``operator``)."""
    monkeypatch.setenv("SWI_SWEEP_INTERVAL", str(SWEEP_INTERVAL_S))
    operator_env["SWI_SWEEP_INTERVAL"] = str(SWEEP_INTERVAL_S)


def _customers(entra: Entra, sql: SqlAdmin, world: World, cluster: Cluster) -> int:
    """What a pod of the cluster does: its service account's token, Entra, Azure SQL, rows."""
    exchanged = entra.exchange(world.customer_api.client_id, cluster.token(DB_SA))
    assert exchanged.status_code == 200, exchanged.text
    with sql.session(exchanged.json()["access_token"]) as cursor:
        return int(cursor.execute("SELECT COUNT(*) FROM dbo.Customer").fetchone()[0])


def test_the_database_user_stays_while_another_cluster_uses_it(
    sql: SqlAdmin,
    quick_sweep: None,
    operator: Any,
    other_operator: Any,
    cluster: Cluster,
    other: Cluster,
    entra: Entra,
    world: World,
) -> None:
    """The database user is the identity's, shared by every cluster that federates it. The
    first cluster creates it, the second finds it; the first's last resource going must not cut
    the second's pods off (it used to drop the user until the second's drift check made it
    again); once the second lets go too, the first's sweep drops it."""
    spec = {
        "serviceAccountName": DB_SA,
        "identity": {"applicationClientId": world.customer_api.client_id},
        "sql": {"server": sql.server, "database": DATABASE, "roles": ["db_datareader"]},
    }
    cluster.create("customer-api", spec)
    cluster.wait_condition("customer-api", timeout=30)
    other.create("customer-api", spec)
    other.wait_condition("customer-api", timeout=30)
    theirs = ((other.get("customer-api") or {}).get("status") or {})["databaseUser"]
    assert theirs["created"] is False  # found the first cluster's user
    assert _customers(entra, sql, world, other) > 0

    cluster.delete("customer-api")
    cluster.wait_gone("customer-api")
    assert "DatabaseUserKept" in cluster.reasons("customer-api")
    time.sleep(2 * SWEEP_INTERVAL_S + 1)  # the first cluster's sweeps ran, and kept it too
    assert DB_USER in sql.users()
    assert _customers(entra, sql, world, other) > 0
    ready = other.condition("customer-api")
    assert ready is not None and ready["status"] == "True", ready

    other.delete("customer-api")
    other.wait_gone("customer-api")
    assert DB_USER in sql.users()  # the second cluster did not create it: not its to drop
    eventually(
        lambda: DB_USER not in sql.users(),
        10 * SWEEP_INTERVAL_S,
        "the first cluster's sweep drops the user once no other cluster is federated",
    )


@pytest.fixture
def shared_pool(
    world: World, entra: Entra, cluster: Cluster, other: Cluster
) -> Iterator[tuple[str, OperatorGraph, list[dict[str, Any]]]]:
    """Two apps the operator's app created (so both operators may write them), and a pool of
    them under the same name in both clusters, two credentials per member (18 reserved)."""
    import uuid

    graph = OperatorGraph(world, entra)
    tag = uuid.uuid4().hex[:6]
    apps = [graph.app(f"shared-{tag}-{letter}") for letter in "ab"]
    name = f"pool-{cluster.namespace}"
    body = pool_manifest(name, [app["appId"] for app in apps], reservedPerMember=18)
    for each in (cluster, other):
        each.custom.create_cluster_custom_object(GROUP, "v1alpha1", POOL_PLURAL, body)
    try:
        yield name, graph, apps
    finally:
        for each in (cluster, other):
            each.custom.delete_cluster_custom_object(GROUP, "v1alpha1", POOL_PLURAL, name)
        for app in apps:
            graph.call("DELETE", f"/applications/{app['id']}")


def test_two_clusters_share_one_pool_s_budget_and_a_freed_slot_moves_across(
    operator: Any,
    other_operator: Any,
    cluster: Cluster,
    other: Cluster,
    second: SecondCluster,
    sandbox: Any,
    entra: Entra,
    shared_pool: tuple[str, OperatorGraph, list[dict[str, Any]]],
) -> None:
    pool, graph, (a, b) = shared_pool

    def place(where: Cluster, name: str) -> str:
        where.create(name, {"serviceAccountName": f"{name}-sa", "identity": {"poolName": pool}})
        where.wait_condition(name, timeout=60)
        return str(((where.get(name) or {})["status"])["identity"]["clientId"])

    def trust(app: dict[str, Any]) -> list[tuple[str, str]]:
        return sorted((c["issuer"], c["subject"].rsplit(":", 1)[1]) for c in graph.credentials(app))

    assert place(cluster, "r1") == a["appId"]
    assert place(other, "r1") == a["appId"]  # the first member's second slot: the other cluster's
    assert place(other, "r2") == b["appId"]  # the first is full, counting the first cluster's
    assert place(cluster, "r2") == b["appId"]
    cluster.create("r3", {"serviceAccountName": "r3-sa", "identity": {"poolName": pool}})
    refused = cluster.wait_condition(
        "r3", "False", "FederatedCredentialReady", reason="PoolExhausted"
    )
    assert f"application {a['appId']} 2/20" in refused["message"], refused
    assert "18 of each reserved" in refused["message"]
    before = {c["id"] for app in (a, b) for c in graph.credentials(app)}
    assert trust(a) == sorted([(sandbox.issuer, "r1-sa"), (second.issuer, "r1-sa")])
    assert trust(b) == sorted([(sandbox.issuer, "r2-sa"), (second.issuer, "r2-sa")])

    # The second cluster lets its slot on the first member go: the first cluster's waiting
    # resource takes it at its next drift check; nothing of the other's was touched.
    other.delete("r1")
    other.wait_gone("r1")
    cluster.wait_condition("r3", timeout=10 * DRIFT_INTERVAL_S + 20)
    assert trust(a) == sorted([(sandbox.issuer, "r1-sa"), (sandbox.issuer, "r3-sa")])
    assert trust(b) == sorted([(sandbox.issuer, "r2-sa"), (second.issuer, "r2-sa")])
    kept = {c["id"] for c in graph.credentials(b)}
    assert kept <= before  # the other cluster's credential on b is the very one it wrote
    exchanged = entra.exchange(b["appId"], other.token("r2-sa"))
    assert exchanged.status_code == 200, exchanged.text
    ready = other.condition("r2")
    assert ready is not None and ready["status"] == "True", ready
