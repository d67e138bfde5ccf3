"""Tenancy guardrails against the sandbox: SqlIdentityPolicy decides, before any cloud or SQL call,
and a withdrawn policy revokes; tenants cannot reach across namespaces; nothing secret leaks.

The operator runs for real (KopfRunner; a process for the log scan) with requirePolicy on, watching
two tenant namespaces: the test's own (``cluster``, tenant A) and a second one (tenant B). The
Entra emulator's request log and the Azure SQL emulator's query log show what was called.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from operator_harness import (  # type: ignore[import-not-found]
    DRIFT_INTERVAL_S,
    GROUP,
    POLICY_PLURAL,
    VERSION,
    Cluster,
    Entra,
    World,
    delete_all,
    eventually,
)
from sql_harness import SqlAdmin  # type: ignore[import-not-found]
from swi_operator.events import reasons as event_reasons

pytestmark = pytest.mark.controlplane

CLOUD_ROUTES = ("graph.", "arm.", "login.")


class Policies:
    """The SqlIdentityPolicies this test makes (as the platform team); removed afterwards."""

    def __init__(self, kube: Any, prefix: str) -> None:
        from kubernetes import client

        self.custom = client.CustomObjectsApi(kube)
        self.prefix = prefix
        self.made: list[str] = []

    def create(
        self,
        name: str,
        identity: dict[str, str],
        namespaces: dict[str, Any],
        sql: dict[str, Any] | None = None,
    ) -> str:
        full = f"{self.prefix}-{name}"
        spec: dict[str, Any] = {"identity": identity, "namespaces": namespaces}
        if sql is not None:
            spec["sql"] = sql
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "SqlIdentityPolicy",
            "metadata": {"name": full},
            "spec": spec,
        }
        self.custom.create_cluster_custom_object(GROUP, VERSION, POLICY_PLURAL, body)
        self.made.append(full)
        return full

    def get(self, full: str) -> dict[str, Any]:
        found: dict[str, Any] = self.custom.get_cluster_custom_object(
            GROUP, VERSION, POLICY_PLURAL, full
        )
        return found

    def delete(self, full: str) -> None:
        try:
            self.custom.delete_cluster_custom_object(GROUP, VERSION, POLICY_PLURAL, full)
        except ApiException as exc:
            if exc.status != 404:
                raise


@pytest.fixture
def tenant_b(kube: Any, cluster: Cluster) -> Iterator[Cluster]:
    """A second tenant namespace, next to the test's own."""
    from kubernetes import client

    name = f"t-{uuid.uuid4().hex[:10]}"
    client.CoreV1Api(kube).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels={"tier": "b"}))
    )
    other = Cluster(kube, cluster.kubectl_path, name)
    yield other
    client.CoreV1Api(kube).delete_namespace(name)


@pytest.fixture
def policies(kube: Any, cluster: Cluster) -> Iterator[Policies]:
    made = Policies(kube, cluster.namespace)
    yield made
    for full in made.made:
        made.delete(full)


@pytest.fixture
def drift_interval() -> str:
    return str(DRIFT_INTERVAL_S)


@pytest.fixture
def guarded_env(
    operator_env: dict[str, str], tenant_b: Cluster, cluster: Cluster, drift_interval: str
) -> dict[str, str]:
    env = {
        **operator_env,
        "SWI_REQUIRE_POLICY": "true",
        "SWI_NAMESPACES": f"{cluster.namespace},{tenant_b.namespace}",
        "SWI_DRIFT_INTERVAL": drift_interval,
    }
    os.environ.update(env)  # operator_env's monkeypatch restores every one of these
    return env


@pytest.fixture
def guarded(
    guarded_env: dict[str, str],
    cluster: Cluster,
    tenant_b: Cluster,
    entra: Entra,
    policies: Policies,
) -> Iterator[Any]:
    """The operator with requirePolicy on, serving tenants A (``cluster``) and B."""
    from kopf.testing import KopfRunner

    args = ["run", "--standalone", "-n", cluster.namespace, "-n", tenant_b.namespace]
    with KopfRunner([*args, "-m", "swi_operator.handlers"], timeout=60) as runner:
        entra.admin.call("DELETE", "requests")
        yield runner
        delete_all(cluster)
        delete_all(tenant_b)
    assert runner.exit_code == 0, f"{runner.exception!r}\n{runner.output}"


def cloud_calls(entra: Entra) -> dict[str, int]:
    counts: dict[str, int] = entra.admin.requests()["counts"]
    return {route: n for route, n in counts.items() if route.startswith(CLOUD_ROUTES)}


def app(world: World, sa: str = "reader", **extra: Any) -> dict[str, Any]:
    return {
        "serviceAccountName": sa,
        "identity": {"applicationClientId": world.demo_app.client_id},
        **extra,
    }


def sql_spec(sql: SqlAdmin, *roles: str, database: str = "mydb") -> dict[str, Any]:
    return {"server": sql.server, "database": database, "roles": list(roles)}


def test_no_policy_no_cloud_call(
    sql: SqlAdmin, guarded: Any, cluster: Cluster, entra: Entra, world: World
) -> None:
    since = time.time()
    cluster.create("reader", app(world, sql=sql_spec(sql, "db_datareader")))

    ready = cluster.wait_condition("reader", "False", reason="NotAuthorized")
    assert f"no SqlIdentityPolicy allows application {world.demo_app.client_id}" in ready["message"]
    assert cluster.namespace in ready["message"]
    authorized = cluster.condition("reader", "Authorized")
    assert authorized is not None and authorized["message"] in ready["message"]
    assert (cluster.condition("reader", "FederatedCredentialReady") or {})["status"] == "Unknown"
    time.sleep(2.5)  # a drift check later: still nothing
    assert cloud_calls(entra) == {}, (
        "an unauthorised resource must cost no Entra, Graph or ARM call"
    )
    assert not [e for e in sql.log(since) if e.get("user") != "dbo"], "nor any SQL"
    assert cluster.service_account("reader") is None
    assert "NotAuthorized" in {e.reason for e in cluster.events("reader")}


# No drift check during the test: revocation must follow the policy event, not the next check.
@pytest.mark.parametrize("drift_interval", ["600"])
def test_a_policy_admits_and_its_withdrawal_revokes(
    guarded: Any, cluster: Cluster, entra: Entra, world: World, policies: Policies
) -> None:
    policy = policies.create(
        "demo", {"applicationClientId": world.demo_app.client_id}, {"names": [cluster.namespace]}
    )
    cluster.create("reader", app(world))
    cluster.wait_condition("reader")
    authorized = cluster.condition("reader", "Authorized")
    assert authorized is not None and authorized["reason"] == "PolicyAllows"
    assert policy in authorized["message"]
    assert len(entra.credentials(world.demo_app)) == 1
    assert entra.exchange(world.demo_app.client_id, cluster.token("reader")).status_code == 200
    eventually(lambda: policies.get(policy).get("status", {}).get("admitted") == 1, 15, "admitted")

    policies.delete(policy)

    started = time.monotonic()
    ready = cluster.wait_condition("reader", "False", reason="NotAuthorized", timeout=20)
    eventually(lambda: entra.credentials(world.demo_app) == [], 10, "credential revoked")
    revoked_after = time.monotonic() - started
    assert revoked_after < 10, f"revoked only {revoked_after:.1f}s after the policy went"
    federation = cluster.condition("reader", "FederatedCredentialReady")
    assert federation is not None and federation["status"] == "False"
    assert federation["reason"] == "NotAuthorized" and "access revoked" in federation["message"]
    assert "no SqlIdentityPolicy allows" in ready["message"]
    assert "AccessRevoked" in {e.reason for e in cluster.events("reader")}
    body = cluster.get("reader") or {}
    assert "federatedCredential" not in body["status"]
    refused = entra.exchange(world.demo_app.client_id, cluster.token("reader"))
    assert refused.status_code == 400 and "AADSTS" in refused.text

    # The policy comes back: so does access, without touching the resource.
    policies.create(
        "demo", {"applicationClientId": world.demo_app.client_id}, {"names": [cluster.namespace]}
    )
    cluster.wait_condition("reader", timeout=20)
    assert len(entra.credentials(world.demo_app)) == 1


def test_a_tenant_cannot_reach_another_tenants_identity_or_namespace(
    sql: SqlAdmin,
    guarded: Any,
    cluster: Cluster,
    tenant_b: Cluster,
    entra: Entra,
    world: World,
    policies: Policies,
) -> None:
    # The platform team: the demo app for tenant B only; customer-api for A, read-only SQL.
    policies.create(
        "b-demo", {"applicationClientId": world.demo_app.client_id}, {"names": [tenant_b.namespace]}
    )
    policies.create(
        "a-customer",
        {"applicationClientId": world.customer_api.client_id},
        {"names": [cluster.namespace]},
        sql={"servers": [sql.server], "databases": ["mydb"], "roles": ["db_datareader"]},
    )
    tenant_b.create("b-reader", app(world, "b-reader"))
    tenant_b.wait_condition("b-reader")
    (b_credential,) = entra.credentials(world.demo_app)
    entra.admin.call("DELETE", "requests")

    # A binds B's identity, and (many times over) tries to spend its 20-credential budget.
    for i in range(21):
        cluster.create(f"borrow-{i}", app(world, f"borrow-{i}"))
    for i in range(21):
        cluster.wait_condition(f"borrow-{i}", "False", reason="NotAuthorized")
    assert "none includes namespace" in (cluster.condition("borrow-0") or {})["message"]
    # A asks for more than its policy grants: db_owner, in any spelling; another database.
    customer = {"applicationClientId": world.customer_api.client_id}
    for name, roles, database in [
        ("owner", ["db_owner"], "mydb"),
        ("owner-upper", ["DB_OWNER"], "mydb"),
        ("writer", ["db_datareader", "db_datawriter"], "mydb"),
        ("elsewhere", ["db_datareader"], "master"),
        ("smuggled-db", ["db_datareader"], "mydb;Authentication=x; DROP USER x; --"),
    ]:
        cluster.create(
            name,
            {
                "serviceAccountName": name,
                "identity": customer,
                "sql": sql_spec(sql, *roles, database=database),
            },
        )
        ready = cluster.wait_condition(name, "False", reason="NotAuthorized")
        assert "does not allow" in ready["message"], ready["message"]
    # Only reads meanwhile (tenant B's drift checks; the sweep after the policy changes looking up
    # every identity the policies, resources and the ledger name, other tests' managed identities
    # among them, to list their credentials): nothing was written anywhere.
    reads = {"graph.fic.list", "graph.applications.get", "arm.fic.list", "arm.identities.get"}
    assert set(cloud_calls(entra)) <= reads | {"login.token"}
    assert entra.credentials(world.demo_app) == [b_credential]
    assert all(cluster.service_account(f"borrow-{i}") is None for i in range(21))
    assert "SP-AZURESQL-USER" in sql.users()

    # Names that would reach across namespaces, or carry SQL, never get past the API server.
    for spec in (
        app(world, f"{tenant_b.namespace}:b-reader"),
        app(world, f"system:serviceaccount:{tenant_b.namespace}:b-reader"),
        {**app(world, "x"), "sql": sql_spec(sql, "db_datareader]; DROP USER [x]; --")},
        {**app(world, "x"), "sql": sql_spec(sql, database="mydb]; DROP USER [x]; --")},
    ):
        with pytest.raises(ApiException) as refused:
            cluster.create("hostile", spec)
        assert refused.value.status == 422


def test_a_forged_status_never_makes_the_operator_touch_another_namespace(
    guarded: Any,
    cluster: Cluster,
    tenant_b: Cluster,
    entra: Entra,
    world: World,
    policies: Policies,
) -> None:
    """Status is a subresource a careless RBAC setup may let tenants write: the subject it records
    is only acted on if it is one of the resource's own namespace."""
    both = {"names": [cluster.namespace, tenant_b.namespace]}
    policies.create("demo", {"applicationClientId": world.demo_app.client_id}, both)
    tenant_b.create("victim", app(world, "victim"))
    cluster.create("tenant", app(world, "tenant"))
    tenant_b.wait_condition("victim")
    cluster.wait_condition("tenant")
    victim = next(c for c in entra.credentials(world.demo_app) if ":victim" in c["subject"])

    forged = {
        "subject": victim["subject"],
        "federatedCredential": {
            "name": victim["name"],
            "identity": world.demo_app.client_id,
            "id": "forged",
        },
    }
    cluster.custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, cluster.namespace, "sqlworkloadidentities", "tenant", {"status": forged}
    )
    cluster.patch_spec("tenant", {"serviceAccountName": "tenant-renamed"})  # "moves" the subject
    cluster.wait_condition("tenant")
    time.sleep(2.5)  # and a drift check
    cluster.delete("tenant")  # the finalizer reads the status too
    cluster.wait_gone("tenant")

    assert victim in entra.credentials(world.demo_app)
    assert entra.exchange(world.demo_app.client_id, tenant_b.token("victim")).status_code == 200


def test_the_narrower_policy_wins(
    guarded: Any, cluster: Cluster, tenant_b: Cluster, world: World, policies: Policies
) -> None:
    everywhere = {"selector": {}}
    policies.create("all-demo", {"applicationClientId": world.demo_app.client_id}, everywhere)
    cluster.create("reader", app(world))
    cluster.wait_condition("reader")
    tenant_b.create("reader", app(world))
    tenant_b.wait_condition("reader")

    # A policy that names tenant B's namespace, and grants it only database access it never
    # asked for, governs B (narrower) and leaves A under the broad one.
    narrow = policies.create(
        "b-demo",
        {"applicationClientId": world.demo_app.client_id},
        {"names": [tenant_b.namespace]},
    )
    tenant_b.patch_spec(
        "reader", {"sql": {"server": "other.database.windows.net", "database": "mydb"}}
    )
    ready = tenant_b.wait_condition("reader", "False", reason="NotAuthorized", timeout=20)
    assert f"SqlIdentityPolicy {narrow} grants no database access" in ready["message"]
    assert "the narrower policy wins over" in ready["message"]
    assert cluster.wait_condition("reader")["status"] == "True"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_or_token_in_logs_events_or_status(
    log_format: str,
    sql: SqlAdmin,
    guarded_env: dict[str, str],
    cluster: Cluster,
    entra: Entra,
    world: World,
    policies: Policies,
    tmp_path: Path,
) -> None:
    """The whole chain (federation, database user, the Verified probe's token exchange and SQL
    login), then a revocation, with debug logging in both log formats (--log-format); then every
    log line, Event and status is scanned for the operator's secret and for anything shaped like
    a token or a key."""
    policies.create(
        "customer",
        {"applicationClientId": world.customer_api.client_id},
        {"names": [cluster.namespace]},
        sql={"servers": [sql.server], "databases": ["mydb"]},
    )
    log_path = tmp_path / "operator.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "swi_operator", "--verbose", "--log-format", log_format],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **guarded_env},
        )
    try:
        eventually(lambda: "READY" in log_path.read_text(), 30, "the operator to start")
        spec = {
            "serviceAccountName": "customer",
            "identity": {"applicationClientId": world.customer_api.client_id},
            "sql": sql_spec(sql, "db_datareader"),
        }
        cluster.create("customer", spec)
        cluster.wait_condition("customer", timeout=60)
        cluster.wait_condition("customer", type_="Verified", timeout=60)
        sa_token = cluster.token("customer")
        policies.delete(f"{cluster.namespace}-customer")
        cluster.wait_condition("customer", "False", reason="NotAuthorized", timeout=30)
        eventually(lambda: "customer-api" not in sql.users(), 20, "the database user dropped")
        delete_all(cluster)
    finally:
        process.terminate()
        process.wait(timeout=20)
    body = cluster.custom.list_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, "sqlworkloadidentities"
    )
    listed = cluster.core.list_namespaced_event(cluster.namespace).items
    events = [f"{e.reason} {e.message}" for e in listed]
    haystacks = {
        "the operator's log": log_path.read_text(errors="replace"),
        "Events": "\n".join(events),
        "status": json.dumps(body),
    }
    secrets = {
        "the operator's client secret": str(world.operator.secret),
        "a service account token": sa_token,
    }
    shapes = {
        "a JWT": re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
        "a private key": re.compile(r"PRIVATE KEY"),
        "a bearer header": re.compile(r"Bearer\s+[A-Za-z0-9._-]{20,}"),
        "a client secret field": re.compile(r"client_secret=[^&\s]+"),
    }
    assert len(haystacks["the operator's log"]) > 1000, "the scan needs a real log"
    if log_format == "json":  # the scan read JSON records, not kopf's text lines
        assert '"message":' in haystacks["the operator's log"]
    reasons = {r for e in listed for r in event_reasons(e.reason, e.message or "")}
    assert {"DatabaseUserCreated", "AccessRevoked", "DatabaseUserDropped"} <= reasons, reasons
    for where, text in haystacks.items():
        for what, secret in secrets.items():
            assert secret not in text, f"{what} in {where}"
        for what, shape in shapes.items():
            found = shape.search(text)
            assert found is None, (
                f"{what} in {where}: {text[max(0, found.start() - 80) : found.end()]}"
            )


@pytest.mark.parametrize("drift_interval", ["600"])
def test_a_pool_is_governed_by_the_policy_that_names_it(
    guarded: Any,
    kube: Any,
    cluster: Cluster,
    tenant_b: Cluster,
    entra: Entra,
    world: World,
    policies: Policies,
) -> None:
    """requirePolicy with an identity pool: a policy naming a member does not open the pool, the
    pool's policy admits the namespaces it selects and no other, and its withdrawal revokes."""
    from kubernetes import client
    from operator_harness import (  # type: ignore[import-not-found]
        POOL_PLURAL,
        OperatorGraph,
        pool_manifest,
    )

    graph = OperatorGraph(world, entra)
    member = graph.app(f"gp-{uuid.uuid4().hex[:6]}")
    pool = f"gp-{cluster.namespace}"
    custom = client.CustomObjectsApi(kube)
    custom.create_cluster_custom_object(
        GROUP, VERSION, POOL_PLURAL, pool_manifest(pool, [member["appId"]])
    )
    spec = {"serviceAccountName": "r-sa", "identity": {"poolName": pool}}
    try:
        policies.create(
            "member", {"applicationClientId": member["appId"]}, {"names": [cluster.namespace]}
        )
        cluster.create("r", spec)
        refused = cluster.wait_condition("r", "False", reason="NotAuthorized")
        assert f"pool {pool}" in refused["message"], refused
        assert graph.credentials(member) == []

        allowed = policies.create("pool", {"poolName": pool}, {"names": [cluster.namespace]})
        cluster.wait_condition("r", timeout=30)
        status = (cluster.get("r") or {})["status"]
        assert status["identity"]["clientId"] == member["appId"]
        assert status["identity"]["pool"] == pool
        authorized = cluster.condition("r", "Authorized")
        assert authorized is not None and allowed in authorized["message"]
        assert [c["subject"] for c in graph.credentials(member)] == [
            f"system:serviceaccount:{cluster.namespace}:r-sa"
        ]
        tenant_b.create("r", spec)  # the pool's policy does not select tenant B
        tenant_b.wait_condition("r", "False", reason="NotAuthorized")

        policies.delete(allowed)
        cluster.wait_condition("r", "False", reason="NotAuthorized", timeout=20)
        eventually(lambda: graph.credentials(member) == [], 10, "credential revoked")
    finally:
        for each in (cluster, tenant_b):
            if each.get("r") is not None:
                each.delete("r")
                each.wait_gone("r", timeout=60)
        custom.delete_cluster_custom_object(GROUP, VERSION, POOL_PLURAL, pool)
        graph.call("DELETE", f"/applications/{member['id']}")
