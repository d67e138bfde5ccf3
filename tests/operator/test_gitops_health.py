"""Flux's and Argo CD's reading of what the real operator writes, against the sandbox.

The operator runs for real (KopfRunner) against the sandbox's API server and Entra emulator; the
objects are read back from the API server and judged by the real kstatus (sigs.k8s.io/cli-utils,
what Flux and kstatus waiters use) and by the Argo CD health check in deploy/argocd/ (gopher-lua,
as Argo CD runs it), through ``gitops-health``. The table over every reason, without a cluster,
is unit/test_gitops_health.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest
from operator_harness import (  # type: ignore[import-not-found]
    Cluster,
    World,
    eventually,
)
from test_policy_guardrails import Policies  # type: ignore[import-not-found]

from sandbox.tools import argocd_health, kstatus

pytestmark = pytest.mark.controlplane


def spec(client_id: str, sa: str) -> dict[str, Any]:
    return {"serviceAccountName": sa, "identity": {"applicationClientId": client_id}}


def read(cluster: Cluster, name: str) -> dict[str, Any]:
    body = cluster.get(name)
    assert body is not None, f"{name} is gone"
    return body


def test_ready_is_current_and_a_not_owned_app_fails_at_once(
    operator: Any, cluster: Cluster, world: World
) -> None:
    cluster.create("reader", spec(world.demo_app.client_id, "reader"))
    cluster.create("payroll", spec(world.payroll.client_id, "payroll"))

    cluster.wait_condition("reader")
    denied = cluster.wait_condition("payroll", "False", reason="PermissionDenied")

    reader = read(cluster, "reader")
    assert kstatus(reader) == ("Current", "Resource is Ready")
    assert argocd_health(reader)[0] == "Healthy"

    payroll = read(cluster, "payroll")
    status, message = kstatus(payroll)
    assert status == "Failed", message
    assert message == denied["message"] and "not allowed" in message
    assert argocd_health(payroll) == ("Degraded", f"PermissionDenied: {denied['message']}")


def condition(made: Policies, full: str, type_: str) -> dict[str, Any] | None:
    for cond in (made.get(full).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


@pytest.fixture
def platform(kube: Any, cluster: Cluster) -> Iterator[Policies]:
    """SqlIdentityPolicies made by this test (as the platform team), removed afterwards."""
    made = Policies(kube, cluster.namespace)
    yield made
    for full in made.made:
        made.delete(full)


def test_not_authorized_fails_at_once_and_recovers_when_a_policy_allows_it(
    operator_with: Callable[..., AbstractContextManager[Any]],
    cluster: Cluster,
    world: World,
    platform: Policies,
) -> None:
    identity = {"applicationClientId": world.demo_app.client_id}
    with operator_with(SWI_REQUIRE_POLICY="true"):
        cluster.create("reader", spec(world.demo_app.client_id, "reader"))
        refused = cluster.wait_condition("reader", "False", reason="NotAuthorized")
        reader = read(cluster, "reader")
        status, message = kstatus(reader)
        assert status == "Failed", message
        assert message == refused["message"] and "no SqlIdentityPolicy allows" in message
        assert argocd_health(reader) == ("Degraded", f"NotAuthorized: {refused['message']}")

        # The CRD admits port 99999; the operator refuses the policy: Stalled, InvalidPolicy.
        broken = platform.create(
            "broken",
            identity,
            {"names": [cluster.namespace]},
            {"servers": ["db.example.net,99999"], "databases": ["mydb"]},
        )
        stalled = eventually(
            lambda: (c := condition(platform, broken, "Stalled")) and c["status"] == "True" and c,
            30,
            f"{broken}: Stalled=True",
        )
        assert stalled["reason"] == "InvalidPolicy"
        status, message = kstatus(platform.get(broken))
        assert status == "Failed" and "spec.sql.servers[0]" in message, message
        assert argocd_health(platform.get(broken))[0] == "Degraded"

        allowing = platform.create("allows", identity, {"names": [cluster.namespace]})
        cluster.wait_condition("reader")
        assert kstatus(read(cluster, "reader")) == ("Current", "Resource is Ready")
        assert argocd_health(read(cluster, "reader"))[0] == "Healthy"
        eventually(
            lambda: (c := condition(platform, allowing, "Ready")) and c["status"] == "True",
            30,
            f"{allowing}: Ready=True",
        )
        assert kstatus(platform.get(allowing))[0] == "Current"
        assert argocd_health(platform.get(allowing))[0] == "Healthy"
