"""The ValidatingAdmissionPolicy of deploy/base/admission-policy.yaml against the sandbox's API
server (v1.36, CEL built in): a namespace tenant (the built-in edit role, impersonated) may not set,
change or remove ``sqlidentity.io/*`` annotations or the operator's finalizer on its resources and
service accounts; everything else it may still do; the operator and cluster administrators may."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from deploy_harness import REPO, kubectl, wait_for  # type: ignore[import-not-found]

pytestmark = pytest.mark.controlplane

POLICY_FILE = REPO / "deploy/base/admission-policy.yaml"
OPERATOR_USER = "system:serviceaccount:sql-workload-identity-system:sql-workload-identity-operator"
SWI = {
    "apiVersion": "sqlidentity.io/v1alpha1",
    "kind": "SqlWorkloadIdentity",
    "metadata": {"name": "reader"},
    "spec": {
        "serviceAccountName": "reader",
        "identity": {"applicationClientId": "5e0c1d9a-7b3f-4c2e-9a1d-000000000002"},
    },
}


@pytest.fixture
def tenant(sandbox: Any, namespace: str) -> Iterator[Any]:
    kubectl(sandbox, "apply", "-k", str(REPO / "crds"))
    kubectl(sandbox, "apply", "-f", str(POLICY_FILE))
    kubectl(sandbox, "apply", "-f", str(REPO / "deploy/base/tenant-rbac.yaml"))
    kubectl(
        sandbox, "create", "rolebinding", "team-edit", "--clusterrole=edit", "--user=alice",
        "-n", namespace,
    )  # fmt: skip
    # The operator's own identity, impersonated: it needs the rights it has when deployed.
    kubectl(
        sandbox, "create", "rolebinding", "operator-edit", "--clusterrole=edit",
        f"--serviceaccount={OPERATOR_USER.rsplit(':', 2)[1]}:{OPERATOR_USER.rsplit(':', 1)[1]}",
        "-n", namespace,
    )  # fmt: skip
    kubectl(sandbox, "apply", "-n", namespace, "-f", "-", input=json.dumps(SWI))
    kubectl(sandbox, "create", "serviceaccount", "reader", "-n", namespace)

    def run(*args: str, user: str = "alice", **kw: Any) -> Any:
        return kubectl(sandbox, *args, "-n", namespace, f"--as={user}", check=False, **kw)

    # The role binding and the policy's activation both take a moment (a re-created policy is
    # compiled and loaded by the API server asynchronously; on a loaded 2-core machine that took
    # more than 30 s once). A server-side dry run goes through admission and changes nothing, so
    # a try made before the policy is live cannot leave an annotation behind.
    def refused_by_the_policy() -> str | None:
        tried = run(
            "annotate", "serviceaccount", "reader", "sqlidentity.io/owner=probe", "--overwrite",
            "--dry-run=server",
        )  # fmt: skip
        seen.append(tried.stderr.strip() or f"accepted (exit {tried.returncode})")
        return tried.stderr if "only the operator" in tried.stderr else None

    seen: list[str] = []
    try:
        wait_for("the tenant's rights and the policy", refused_by_the_policy, timeout=120)
    except AssertionError as e:
        raise AssertionError(f"{e}; the last answer: {seen[-1] if seen else 'none'}") from None
    yield run
    kubectl(sandbox, "delete", "-f", str(POLICY_FILE), "--ignore-not-found")


def test_a_tenant_cannot_touch_the_operators_annotations_or_finalizer(
    tenant: Any, sandbox: Any, namespace: str
) -> None:
    for args in (
        ("annotate", "serviceaccount", "reader", "sqlidentity.io/owner=decoy"),
        ("annotate", "swi", "reader", "sqlidentity.io/last-handled-configuration={}"),
        ("annotate", "swi", "reader", "sqlidentity.io/anything=x"),
    ):
        refused = tenant(*args)
        assert refused.returncode != 0, args
        assert "only the operator sets or removes them" in refused.stderr, refused.stderr

    # The operator sets them (impersonated: its ServiceAccount's username)...
    assert tenant(
        "annotate", "serviceaccount", "reader", "sqlidentity.io/owner=reader", user=OPERATOR_USER
    ).returncode == 0  # fmt: skip
    finalizer = '{"metadata":{"finalizers":["sqlidentity.io/finalizer"]}}'
    assert tenant(
        "patch", "swi", "reader", "--type=merge", "-p", finalizer, user=OPERATOR_USER
    ).returncode == 0  # fmt: skip
    # ...and the tenant can remove neither.
    removed = tenant("annotate", "serviceaccount", "reader", "sqlidentity.io/owner-")
    assert removed.returncode != 0 and "only the operator" in removed.stderr
    stripped = tenant(
        "patch", "swi", "reader", "--type=json",
        "-p", '[{"op":"replace","path":"/metadata/finalizers","value":[]}]',
    )  # fmt: skip
    assert stripped.returncode != 0 and "finalizer is the operator's" in stripped.stderr

    # Everything else stays the tenant's: other annotations, the spec, deletion.
    assert tenant("annotate", "serviceaccount", "reader", "team/owner=alice").returncode == 0
    assert tenant("label", "swi", "reader", "tier=gold").returncode == 0
    assert tenant("delete", "swi", "reader", "--wait=false").returncode == 0
    # No operator runs here: the administrator releases the finalizer (system:masters may).
    kubectl(
        sandbox, "patch", "swi", "reader", "-n", namespace, "--type=merge",
        "-p", '{"metadata":{"finalizers":null}}',
    )  # fmt: skip


def test_a_cluster_administrator_can_still_repair(
    tenant: Any, sandbox: Any, namespace: str
) -> None:
    """system:masters is exempt: the break-glass way to release a stuck finalizer."""
    done = kubectl(
        sandbox, "annotate", "serviceaccount", "reader", "sqlidentity.io/owner=fixed",
        "-n", namespace,
    )  # fmt: skip
    assert done.returncode == 0


DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "api"},
    "spec": {
        "replicas": 0,
        "selector": {"matchLabels": {"app": "api"}},
        "template": {
            "metadata": {"labels": {"app": "api"}},
            "spec": {
                "serviceAccountName": "reader",
                "containers": [{"name": "api", "image": "registry.example/api:1"}],
            },
        },
    },
}


def test_the_operator_may_only_toggle_the_workload_identity_label_on_workloads(
    tenant: Any, sandbox: Any, namespace: str
) -> None:
    """Issue 18: RBAC lets the operator patch every workload; the second policy keeps what it may
    change to the one label it manages, so a compromised operator cannot run pods through it."""
    assert tenant("apply", "-f", "-", input=json.dumps(DEPLOYMENT)).returncode == 0

    def patch(body: dict[str, Any], user: str = OPERATOR_USER) -> Any:
        return tenant(
            "patch", "deployment", "api", "--type=strategic", "-p", json.dumps(body), user=user
        )

    def template(**parts: Any) -> dict[str, Any]:
        return {"spec": {"template": parts}}

    # The policy is compiled asynchronously after the fixture's wait (another policy): retry.
    image = template(spec={"containers": [{"name": "api", "image": "evil.example/miner:1"}]})
    wait_for(
        "the workload policy",
        lambda: "may only set or remove the label" in patch(image).stderr or None,
        timeout=120,
    )
    use = "azure.workload.identity/use"
    assert patch(template(metadata={"labels": {use: "true"}})).returncode == 0
    assert patch({"metadata": {"annotations": {"sqlidentity.io/labelled-by": "x"}}}).returncode == 0
    assert patch(template(metadata={"labels": {use: None}})).returncode == 0
    for forbidden in (
        image,
        template(metadata={"labels": {"tier": "x", use: "true"}}),
        template(metadata={"annotations": {"example.com/run-as": "root"}}),
        template(spec={"hostNetwork": True}),
    ):
        refused = patch(forbidden)
        assert refused.returncode != 0, forbidden
        assert "may only set or remove the label" in refused.stderr, refused.stderr
    # The tenant itself is not limited by it.
    assert patch(image, user="alice").returncode == 0
