"""The Verified condition against the sandbox: the operator's probe (TokenRequest -> Entra token
exchange -> SQL login) going through Propagating to True, and each failure reason reproduced on
purpose, the way it happens for real:

* NoMatchingFederatedCredential: the operator configured with an issuer that is not the cluster's;
* IssuerUnreachable: the cluster's issuer documents not readable anonymously (as with an AKS
  cluster without the OIDC issuer), so Entra cannot fetch its keys;
* DatabaseUserMissing, TokenAudienceRejected: the user dropped, or the credential's audience
  changed, out of band while a probe is in flight (Entra slowed down so that it is);
* LoginFailed: Entra's clock ahead of the cluster's, so the service account's token has expired
  by the time Entra checks it (AADSTS700024).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from operator_harness import (  # type: ignore[import-not-found]
    DRIFT_INTERVAL_S,
    Cluster,
    Entra,
    World,
    eventually,
)
from sql_harness import DATABASE, SqlAdmin, wait_for_log  # type: ignore[import-not-found]

pytestmark = pytest.mark.controlplane

SA = "customer-api"
USER = "customer-api"
DISCOVERY_BINDING = "sandbox-oidc-discovery-unauthenticated"
SLOW_EXCHANGE_S = 3.0


def spec(world: World, sql: SqlAdmin) -> dict[str, Any]:
    return {
        "serviceAccountName": SA,
        "identity": {"applicationClientId": world.customer_api.client_id},
        "sql": {"server": sql.server, "database": DATABASE, "roles": ["db_datareader"]},
    }


def verified(cluster: Cluster, name: str = "customer-api") -> dict[str, Any]:
    return cluster.condition(name, "Verified") or {}


def test_propagating_then_verified(
    sql: SqlAdmin, operator, cluster: Cluster, entra: Entra, world: World
):
    entra.admin.controls(propagationSeconds=5)
    cluster.create("customer-api", spec(world, sql))

    seen = eventually(
        lambda: verified(cluster).get("reason") == "Propagating" and verified(cluster),
        15,
        "Verified=False Propagating",
    )
    assert seen["status"] == "False" and "AADSTS70021" in seen["message"]
    ready = cluster.condition("customer-api")
    assert ready is not None and ready["status"] == "False" and ready["reason"] == "Propagating"
    # Database access does not wait for Entra: the user is there before the credential works.
    assert sql.users()[USER] == {"db_datareader"}

    cluster.wait_condition("customer-api", timeout=30)  # Ready, once the probe got through
    assert verified(cluster)["status"] == "True"
    body = cluster.get("customer-api") or {}
    assert "propagatingSince" not in body["status"]["verification"]
    reasons = cluster.reasons("customer-api")
    assert "Propagating" in reasons and "Ready" in reasons


def test_wrong_issuer_is_no_matching_federated_credential(
    sql: SqlAdmin, operator_with, cluster: Cluster, world: World, sandbox
):
    wrong = "https://issuer.invalid/not-this-cluster"
    with operator_with(SWI_ISSUER=wrong):
        cluster.create("customer-api", spec(world, sql))
        cond = cluster.wait_condition(
            "customer-api", "False", "Verified", "NoMatchingFederatedCredential"
        )
        assert "AADSTS700211" in cond["message"]
        assert wrong in cond["message"] and sandbox.issuer in cond["message"]
        assert "--issuer" in cond["message"]
        ready = cluster.condition("customer-api")
        assert ready is not None and ready["reason"] == "NoMatchingFederatedCredential"


@pytest.fixture
def issuer_hidden(kube: Any) -> Iterator[Callable[[], None]]:
    """Take away anonymous reads of the issuer's discovery document and keys; put them back."""
    from kubernetes import client

    rbac = client.RbacAuthorizationV1Api(kube)
    saved = rbac.read_cluster_role_binding(DISCOVERY_BINDING)

    def restore() -> None:
        try:
            rbac.read_cluster_role_binding(DISCOVERY_BINDING)
        except client.exceptions.ApiException:
            saved.metadata.resource_version = None
            rbac.create_cluster_role_binding(saved)

    rbac.delete_cluster_role_binding(DISCOVERY_BINDING)
    try:
        yield restore
    finally:
        restore()


def test_issuer_unreachable(
    sql: SqlAdmin, operator, cluster: Cluster, world: World, issuer_hidden: Callable[[], None]
):
    cluster.create("customer-api", spec(world, sql))

    cond = cluster.wait_condition("customer-api", "False", "Verified", "IssuerUnreachable")
    assert "AADSTS90061" in cond["message"] and "anonymously" in cond["message"]

    issuer_hidden()  # published again: the next drift check proves the chain
    cluster.wait_condition("customer-api", timeout=DRIFT_INTERVAL_S * 5)


def probe_again_while(
    cluster: Cluster, entra: Entra, sql: SqlAdmin, action: Callable[[], None]
) -> None:
    """Make the next probe's token exchange slow, start it (a spec change), and run ``action``
    while Entra holds the request: after the database step's last read, before the login."""
    sql.secret_token(*sql._admin)  # its own token first: Entra is about to be slow
    entra.admin.latency("login.token", SLOW_EXCHANGE_S)
    since = time.time()
    cluster.patch_spec("customer-api", {"workloads": {"selector": {"matchLabels": {"a": "b"}}}})
    wait_for_log(sql, since, "FROM sys.database_principals AS p", user="dbo")
    time.sleep(0.3)  # the probe's TokenRequest, then the exchange, which Entra now holds
    action()


def test_user_dropped_before_the_login_is_database_user_missing(
    sql: SqlAdmin, operator_with, cluster: Cluster, entra: Entra, world: World
):
    with operator_with(SWI_DRIFT_INTERVAL="120"):  # no drift check in between
        cluster.create("customer-api", spec(world, sql))
        cluster.wait_condition("customer-api")

        probe_again_while(cluster, entra, sql, lambda: sql.run(f"DROP USER [{USER}]"))

        cond = cluster.wait_condition(
            "customer-api", "False", "Verified", "DatabaseUserMissing", timeout=15
        )
        assert "Login failed for user '<token-identified principal>'" in cond["message"]
        assert "(18456)" in cond["message"] and world.customer_api.client_id in cond["message"]
        ready = cluster.condition("customer-api")
        assert ready is not None and ready["reason"] == "DatabaseUserMissing"


def test_audience_changed_before_the_exchange_is_token_audience_rejected(
    sql: SqlAdmin, operator_with, cluster: Cluster, entra: Entra, world: World
):
    app = world.customer_api
    with operator_with(SWI_DRIFT_INTERVAL="120"):
        cluster.create("customer-api", spec(world, sql))
        cluster.wait_condition("customer-api")
        (credential,) = entra.credentials(app)
        name = credential["name"]
        path = f"/applications/{app.object_id}/federatedIdentityCredentials(name='{name}')"
        assert entra.graph("GET", path).status_code == 200  # the admin's Graph token, now

        def change_audience() -> None:
            changed = entra.graph("PATCH", path, {"audiences": ["api://SomeOtherAudience"]})
            assert changed.status_code == 204, changed.text

        probe_again_while(cluster, entra, sql, change_audience)

        cond = cluster.wait_condition(
            "customer-api", "False", "Verified", "TokenAudienceRejected", timeout=15
        )
        assert "AADSTS700212" in cond["message"] and "api://AzureADTokenExchange" in cond["message"]


def test_expired_assertion_is_login_failed(
    sql: SqlAdmin, operator, cluster: Cluster, entra: Entra, world: World
):
    cluster.create("customer-api", spec(world, sql))
    cluster.wait_condition("customer-api")

    entra.admin.controls(clockSkewSeconds=1200)  # Entra's clock 20 minutes ahead
    cluster.patch_spec("customer-api", {"workloads": {"selector": {"matchLabels": {"a": "b"}}}})

    cond = cluster.wait_condition("customer-api", "False", "Verified", "LoginFailed", timeout=15)
    assert "AADSTS700024" in cond["message"] and "valid time range" in cond["message"]
