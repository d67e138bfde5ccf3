"""The deployed RBAC, exercised as the operator: a TokenRequest token of its ServiceAccount.

Each call below is one the operator (or kopf, or the injection webhook) makes; each must succeed.
Then a few it must never be able to make. The webhook's own calls (reading service accounts,
creating its Secret, patching its configuration) also run for real in tests/injection, where the
webhook authenticates with the same kind of token.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_harness import (  # type: ignore[import-not-found]
    CONFIGURATION,
    NAMESPACE,
    POLICY_CONFIGURATION,
    REPO,
    WORKLOAD_CONFIGURATION,
    install_generic,
    kubectl,
    operator_kubeconfig,
    remove_policy_webhook_configuration,
    remove_webhook_configuration,
    render_kustomize,
    wait_for,
)

pytestmark = pytest.mark.controlplane

SWI = {
    "apiVersion": "sqlidentity.io/v1alpha1",
    "kind": "SqlWorkloadIdentity",
    "metadata": {"name": "customer-reader"},
    "spec": {
        "serviceAccountName": "customer-reader",
        "identity": {"applicationClientId": "5e0c1d9a-7b3f-4c2e-9a1d-000000000002"},
    },
}


@pytest.fixture(scope="module")
def as_operator(sandbox: Any, kube: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    install_generic(sandbox)
    config = operator_kubeconfig(sandbox, kube, tmp_path_factory.mktemp("rbac") / "kubeconfig")

    def run(*args: str, stdin: str | None = None, check: bool = True) -> Any:
        return kubectl(sandbox, *args, kubeconfig=config, check=check, input=stdin)

    # kubectl reads an object before it patches it; the operator only patches. Its own calls,
    # with the same token, go through the client library instead.
    from kubernetes import config as kube_config

    run.api = kube_config.new_client_from_config(config_file=str(config))  # type: ignore[attr-defined]
    yield run
    run.api.close()  # type: ignore[attr-defined]
    remove_webhook_configuration(sandbox)


def test_the_operator_can_do_its_job(
    sandbox: Any, namespace: str, as_operator: Any, tmp_path: Path
) -> None:
    from kubernetes import client

    admin = kubectl
    admin(sandbox, "apply", "-n", namespace, "-f", "-", input=json.dumps(SWI))
    admin(sandbox, "create", "deployment", "customer-api", "--image=app:1", "-n", namespace)
    ns = ("-n", namespace)

    # kopf: discovery, CRDs, the resource (list/watch/patch), its status, peering, Events.
    as_operator("api-resources", "--api-group=sqlidentity.io")
    as_operator("get", "crd")
    as_operator("get", "swi", "-A")
    as_operator("get", "swi", "-A", "--watch", "--request-timeout=1s", check=False)
    assert as_operator("auth", "can-i", "watch", "sqlworkloadidentities", "-A").returncode == 0
    as_operator(
        "patch", "swi", "customer-reader", *ns, "--type=merge",
        "-p", '{"metadata":{"finalizers":["sqlidentity.io/finalizer"],'
        '"annotations":{"sqlidentity.io/last-handled-configuration":"{}"}}}',
    )  # fmt: skip
    # (kubectl reads a status before it patches it; the operator only patches: can-i, here.)
    assert as_operator(
        "auth", "can-i", "patch", "sqlworkloadidentities", "--subresource=status", *ns
    ).returncode == 0  # fmt: skip
    as_operator("get", "clusterkopfpeerings")
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"swi-{uuid.uuid4().hex[:8]}"},
        "involvedObject": {
            "kind": "SqlWorkloadIdentity",
            "name": "customer-reader",
            "namespace": namespace,
        },
        "reason": "Test",
        "message": "posted as the operator",
        "type": "Normal",
    }
    as_operator("create", *ns, "-f", "-", stdin=json.dumps(event))

    # The issuer, the service account, the workloads, the pods.
    as_operator("get", "--raw", "/.well-known/openid-configuration")
    as_operator("create", "serviceaccount", "customer-reader", *ns)
    as_operator(
        "annotate", "serviceaccount", "customer-reader", *ns,
        "azure.workload.identity/client-id=5e0c1d9a-7b3f-4c2e-9a1d-000000000002",
    )  # fmt: skip
    as_operator("get", "serviceaccount", "customer-reader", *ns)
    # The injection webhook's service account cache: list, then watch, every namespace.
    as_operator("get", "serviceaccounts", "-A", "--watch", "--request-timeout=1s", check=False)
    assert as_operator("auth", "can-i", "watch", "serviceaccounts", "-A").returncode == 0
    for kind in ("deployments", "statefulsets", "daemonsets", "jobs", "cronjobs"):
        as_operator("get", kind, *ns)
    apps: Any = client.AppsV1Api(as_operator.api)
    apps.patch_namespaced_deployment(
        "customer-api",
        namespace,
        {"spec": {"template": {"metadata": {"labels": {"azure.workload.identity/use": "true"}}}}},
    )
    as_operator("get", "pods", *ns)
    # The Verified probe: a token of the resource's service account (TokenRequest).
    as_operator("create", "token", "customer-reader", *ns, "--audience=api://AzureADTokenExchange")
    as_operator("delete", "serviceaccount", "customer-reader", *ns)

    # The guardrails: policies read (and watched), their status written, a Namespace's labels.
    policy = {
        "apiVersion": "sqlidentity.io/v1alpha1",
        "kind": "SqlIdentityPolicy",
        "metadata": {"name": f"{namespace}-rbac"},
        "spec": {
            "identity": {"applicationClientId": SWI["spec"]["identity"]["applicationClientId"]},
            "namespaces": {"names": [namespace]},
        },
    }
    admin(sandbox, "apply", "-f", "-", input=json.dumps(policy))
    as_operator("get", "sip")
    assert as_operator("auth", "can-i", "watch", "sqlidentitypolicies").returncode == 0
    assert as_operator(
        "auth", "can-i", "patch", "sqlidentitypolicies", "--subresource=status"
    ).returncode == 0  # fmt: skip
    # A namespace the watch has not seen: a LIST of that one (list and watch are all it has).
    as_operator("get", "namespaces", f"--field-selector=metadata.name={namespace}")
    assert as_operator("auth", "can-i", "watch", "namespaces").returncode == 0
    admin(sandbox, "delete", "sip", f"{namespace}-rbac")
    # Pools: read and watched, their status written; never created, changed or deleted.
    as_operator("get", "sqlidentitypools")
    assert as_operator("auth", "can-i", "watch", "sqlidentitypools").returncode == 0
    assert as_operator(
        "auth", "can-i", "patch", "sqlidentitypools", "--subresource=status"
    ).returncode == 0  # fmt: skip

    # The webhooks: their configurations (client config only) and the certificate Secret.
    admission: Any = client.AdmissionregistrationV1Api(as_operator.api)
    strategic = "application/strategic-merge-patch+json"
    (validating,) = [
        d
        for d in render_kustomize(sandbox, REPO / "deploy/overlays/generic")
        if d["kind"] == "ValidatingWebhookConfiguration"
    ]
    admin(sandbox, "apply", "-f", "-", input=json.dumps(validating))  # nothing serves it: briefly
    try:
        for patch, name, entry in (
            (
                admission.patch_validating_webhook_configuration,
                POLICY_CONFIGURATION,
                "validate-sqlworkloadidentity.sqlidentity.io",
            ),
            (
                admission.patch_mutating_webhook_configuration,
                CONFIGURATION,
                "inject-workload-identity.sqlidentity.io",
            ),
            (
                admission.patch_mutating_webhook_configuration,
                WORKLOAD_CONFIGURATION,
                "label-workloads.sqlidentity.io",
            ),
        ):
            body = {"webhooks": [{"name": entry, "timeoutSeconds": 10}]}
            patch(name, body, _content_type=strategic)
    finally:
        remove_policy_webhook_configuration(sandbox)
    assert as_operator("auth", "can-i", "create", "secrets", "-n", NAMESPACE).returncode == 0
    assert as_operator(
        "auth", "can-i", "update", "secret/sql-workload-identity-operator-webhook-tls",
        "-n", NAMESPACE,
    ).returncode == 0  # fmt: skip


@pytest.mark.parametrize(
    "verb_and_resource",
    [
        ("list", "secrets", "-A"),  # no secrets but its own certificate's
        ("get", "secret/some-app-secret", "-n", NAMESPACE),
        ("create", "secrets", "-n", "default"),
        ("delete", "deployments", "-A"),  # labels pod templates, never deletes workloads
        ("create", "pods", "-A"),
        ("create", "customresourcedefinitions"),  # CRDs come from deploy/, not the operator
        ("delete", "sqlworkloadidentities", "-A"),
        ("patch", "mutatingwebhookconfiguration/someone-elses"),
        ("create", "mutatingwebhookconfigurations"),
        ("create", "clusterrolebindings"),
        # It must never be able to authorise itself: policies are the platform team's.
        ("create", "sqlidentitypolicies"),
        ("update", "sqlidentitypolicies"),
        ("patch", "sqlidentitypolicies"),
        ("delete", "sqlidentitypolicies"),
        # Nor grow its own reach through a pool: pools are the platform team's too.
        ("create", "sqlidentitypools"),
        ("patch", "sqlidentitypools"),
        ("delete", "sqlidentitypools"),
        ("patch", "validatingwebhookconfiguration/someone-elses"),
        ("get", "mutatingwebhookconfigurations"),  # it only writes its client config
        ("get", "deployments", "-A"),  # lists workloads; reads no single one
    ],
)
def test_the_operator_cannot_do_more(as_operator: Any, verb_and_resource: tuple[str, ...]) -> None:
    result = as_operator("auth", "can-i", *verb_and_resource, check=False)
    assert result.stdout.strip() == "no", verb_and_resource


@pytest.mark.parametrize(
    ("verb_and_resource", "allowed"),
    [
        (("create", "sqlworkloadidentities"), "yes"),
        (("patch", "sqlworkloadidentities"), "yes"),
        (("delete", "sqlworkloadidentities"), "yes"),
        # The status is the operator's record of what it made, and later removes: not theirs.
        (("patch", "sqlworkloadidentities", "--subresource=status"), "no"),
        (("update", "sqlworkloadidentities", "--subresource=status"), "no"),
        # Policies are the platform team's.
        (("create", "sqlidentitypolicies"), "no"),
        (("patch", "sqlidentitypolicies"), "no"),
        (("delete", "sqlidentitypolicies"), "no"),
        (("create", "sqlidentitypools"), "no"),
        (("patch", "sqlidentitypools"), "no"),
    ],
)
def test_a_namespace_editor_manages_resources_but_not_status_or_policies(
    sandbox: Any,
    namespace: str,
    as_operator: Any,
    verb_and_resource: tuple[str, ...],
    allowed: str,
) -> None:
    """What a team with the built-in edit role in its namespace may do (deploy/base/tenant-rbac)."""
    kubectl(
        sandbox, "create", "rolebinding", "team-edit", "--clusterrole=edit", "--user=alice",
        "-n", namespace,
    )  # fmt: skip

    def can_i() -> str:
        result = kubectl(
            sandbox, "auth", "can-i", *verb_and_resource, "-n", namespace, "--as=alice", check=False
        )
        return str(result.stdout.strip())

    # The aggregation controller folds the ClusterRoles into edit shortly after they appear.
    wait_for("the edit role's aggregation", lambda: can_i() == allowed or None, timeout=20)
    assert can_i() == allowed, verb_and_resource
