"""Least privilege, measured: the whole operator (reconcile, drift, policy review, both webhooks,
kopf peering) runs as the deployed ServiceAccount through a recording proxy, through a story that
uses every capability; then

* nothing it asked for was refused (a missing verb fails here, with the request), and
* every rule deploy/ grants it was used (an excess verb fails here), except the few listed in
  ``NOT_EXERCISED``, each with the reason this story cannot reach it.

The story, as a platform team and a tenant would live it: a SqlWorkloadIdentity no policy allows
is refused by the admission webhook with the NotAuthorized message; a policy selecting the
tenant's namespace by label admits it; the operator federates, annotates, labels the Deployment
and verifies; a Deployment created afterwards is labelled at admission by the workload webhook;
the platform team's identity pool gets its status; the policy is deleted and access is revoked;
the resource is deleted.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from api_recorder import ApiRecorder, access_of, grants_of, unused  # type: ignore[import-not-found]
from deploy_harness import (  # type: ignore[import-not-found]
    NAMESPACE,
    OPERATOR,
    REPO,
    install_generic,
    kubectl,
    remove_webhook_configuration,
    render_kustomize,
    service_account_token,
    wait_for,
)

from sandbox.entra.state import load_world
from sandbox.launcher import WORLD_FILE

pytestmark = pytest.mark.controlplane

PEERING = "swi-least-privilege"
TLS_SECRET = "sql-workload-identity-operator-webhook-tls"

# Rules this story cannot exercise, and why. Everything else deploy/ grants must be used.
NOT_EXERCISED = {
    # The certificate Secret is created at the first start (here) and updated only when the
    # certificate nears expiry or lacks a name (tests/injection's certificate tests).
    f"update core/secrets ['{TLS_SECRET}'] in {NAMESPACE}": "re-issue of the webhook certificate",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def tenant(kube: Any) -> Iterator[str]:
    from kubernetes import client

    core: Any = client.CoreV1Api(kube)
    name = f"lp-{uuid.uuid4().hex[:8]}"
    labels = {"sqlidentity.io/tenant": name}
    core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels))
    )
    yield name
    core.delete_namespace(name)


def test_the_operator_needs_every_rule_it_has_and_no_other(
    sandbox: Any, kube: Any, tenant: str, tmp_path: Path
) -> None:
    install_generic(sandbox, policy_webhook=True)
    docs = render_kustomize(sandbox, REPO / "deploy/overlays/generic")
    bindings = [d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")]
    bound = {
        b["roleRef"]["name"]
        for b in bindings
        if any(s["name"] == OPERATOR and s["namespace"] == NAMESPACE for s in b["subjects"])
    }
    roles = [
        d for d in docs if d["kind"] in ("ClusterRole", "Role") and d["metadata"]["name"] in bound
    ]
    grants = [g for role in roles for g in grants_of(role)]
    assert len(roles) == 4, [r["metadata"]["name"] for r in roles]

    world = load_world(WORLD_FILE)
    me = next(p for p in world.principals if p.name == "sql-workload-identity-operator")
    demo = next(p for p in world.principals if p.name == "SP-AZURESQL-USER")
    kubectl(sandbox, "delete", "secret", TLS_SECRET, "-n", NAMESPACE, "--ignore-not-found")
    peering = {
        "apiVersion": "kopf.dev/v1",
        "kind": "ClusterKopfPeering",
        "metadata": {"name": PEERING},
    }
    kubectl(sandbox, "apply", "-f", "-", input=json.dumps(peering))
    for workload in _workloads():
        kubectl(sandbox, "apply", "-n", tenant, "-f", "-", input=json.dumps(workload))
    kubectl(sandbox, "create", "serviceaccount", "batch-reader", "-n", tenant)  # exists: patched

    admin_config = yaml.safe_load(Path(sandbox.kubeconfig).read_text())
    upstream = admin_config["clusters"][0]["cluster"]["server"]
    token = service_account_token(kube, NAMESPACE, OPERATOR)
    port = _free_port()
    swi = {
        "apiVersion": "sqlidentity.io/v1alpha1",
        "kind": "SqlWorkloadIdentity",
        "metadata": {"name": "customer-reader", "namespace": tenant},
        "spec": {
            "serviceAccountName": "customer-reader",
            "identity": {"applicationClientId": demo.client_id},
        },
    }
    batch = {
        **swi,
        "metadata": {"name": "batch-reader", "namespace": tenant},
        "spec": {**swi["spec"], "serviceAccountName": "batch-reader"},
    }
    policy = {
        "apiVersion": "sqlidentity.io/v1alpha1",
        "kind": "SqlIdentityPolicy",
        "metadata": {"name": tenant},
        "spec": {
            "identity": {"applicationClientId": demo.client_id},
            "namespaces": {"selector": {"matchLabels": {"sqlidentity.io/tenant": tenant}}},
        },
    }
    log_path = tmp_path / "operator.log"
    recorder = ApiRecorder(upstream, str(sandbox.ca))
    try:
        with recorder as proxy:
            config = {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "sandbox", "cluster": {"server": proxy}}],
                "users": [{"name": OPERATOR, "user": {"token": token}}],
                "contexts": [
                    {"name": OPERATOR, "context": {"cluster": "sandbox", "user": OPERATOR}}
                ],
                "current-context": OPERATOR,
            }
            kubeconfig = tmp_path / "operator.kubeconfig"
            kubeconfig.write_text(yaml.safe_dump(config))
            env = {
                **os.environ,
                "KUBECONFIG": str(kubeconfig),
                "AZURE_TENANT_ID": me.tenant_id,
                "AZURE_CLIENT_ID": me.client_id,
                "AZURE_CLIENT_SECRET": me.secrets[0],
                "AZURE_AUTHORITY_HOST": sandbox.env["AZURE_AUTHORITY_HOST"],
                "AZURE_SUBSCRIPTION_ID": world.subscription_id,
                "SWI_GRAPH_URL": sandbox.env["SANDBOX_GRAPH_URL"],
                "SWI_ARM_URL": sandbox.env["SANDBOX_ARM_URL"],
                "SWI_CA_BUNDLE": str(sandbox.ca),
                "SWI_DRIFT_INTERVAL": "2",
                "SWI_RETRY_BACKOFF_MAX": "2",
                "SWI_PEERING": PEERING,
                "SWI_REQUIRE_POLICY": "true",
                "SWI_POLICY_WEBHOOK": "true",
                "SWI_INJECTION_WEBHOOK": "true",
                "SWI_WORKLOAD_WEBHOOK": "true",
                "SWI_WEBHOOK_ADDR": "127.0.0.1",
                "SWI_WEBHOOK_PORT": str(port),
                "SWI_WEBHOOK_URL_HOST": "localhost",
                "SWI_WEBHOOK_NAMESPACE": NAMESPACE,
                "POD_NAMESPACE": NAMESPACE,  # as in the pod: the ledger lives there
            }
            env.pop("SWI_NAMESPACES", None)
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "swi_operator"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                _story(sandbox, tenant, swi, batch, policy, port, process, log_path)
            except AssertionError as stalled:
                refused = _refused(recorder)  # the likely reason the story stalled
                if refused:
                    raise AssertionError(_REFUSED + "\n".join(refused)) from stalled
                raise
            finally:
                process.terminate()
                process.wait(timeout=30)
    finally:
        kubectl(sandbox, "delete", "sqlidentitypolicy", tenant, "--ignore-not-found")
        kubectl(sandbox, "delete", "sqlidentitypool", tenant, "--ignore-not-found")
        kubectl(sandbox, "delete", "clusterkopfpeering", PEERING, "--ignore-not-found")
        remove_webhook_configuration(sandbox)

    refused = _refused(recorder)
    assert not refused, _REFUSED + "\n".join(refused)
    accesses = [a for a in map(access_of, recorder.records) if a is not None]
    idle = [str(g) for g in unused(grants, accesses)]
    excess = sorted(set(idle) - set(NOT_EXERCISED))
    assert not excess, "deploy/ grants what the operator never used:\n" + "\n".join(excess)
    stale = sorted(set(NOT_EXERCISED) - set(idle))
    assert not stale, f"exercised after all, drop from NOT_EXERCISED: {stale}"


_REFUSED = "the deployed RBAC refused the operator:\n"


def _refused(recorder: ApiRecorder) -> list[str]:
    return [
        f"{r.method} {r.path}?{r.query}: {r.refusal}" for r in recorder.records if r.refused_by_rbac
    ]


def _workloads() -> list[dict[str, Any]]:
    """A workload of every kind the operator labels; the Job (running, so its template is
    immutable) runs as batch-reader, the others as customer-reader."""
    labels = {"app": "customer-api"}

    def template(sa: str, restart: str = "Always") -> dict[str, Any]:
        return {
            "metadata": {"labels": labels},
            "spec": {
                "serviceAccountName": sa,
                "restartPolicy": restart,
                "containers": [{"name": "app", "image": "app:1"}],
            },
        }

    def made(api: str, kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": api, "kind": kind, "metadata": {"name": name}, "spec": spec}

    selector = {"matchLabels": labels}
    reader = template("customer-reader")
    nightly = template("customer-reader", "Never")
    return [
        made("apps/v1", "Deployment", "api", {"selector": selector, "template": reader}),
        made(
            "apps/v1",
            "StatefulSet",
            "db",
            {"selector": selector, "serviceName": "db", "template": reader},
        ),
        made("apps/v1", "DaemonSet", "agent", {"selector": selector, "template": reader}),
        made(
            "batch/v1",
            "CronJob",
            "nightly",
            {"schedule": "0 3 * * *", "jobTemplate": {"spec": {"template": nightly}}},
        ),
        made("batch/v1", "Job", "once", {"template": template("batch-reader", "Never")}),
    ]


def _story(
    sandbox: Any,
    tenant: str,
    swi: dict[str, Any],
    batch: dict[str, Any],
    policy: dict[str, Any],
    port: int,
    process: subprocess.Popen[bytes],
    log_path: Path,
) -> None:
    def alive() -> None:
        if process.poll() is not None:
            raise AssertionError(f"the operator exited:\n{log_path.read_text()[-3000:]}")

    def configured() -> bool:
        alive()
        url = kubectl(
            sandbox,
            "get",
            "validatingwebhookconfiguration",
            "sql-workload-identity-operator-policy",
            "-o",
            "jsonpath={.webhooks[0].clientConfig.url}",
        ).stdout
        return url == f"https://localhost:{port}/validate-sqlworkloadidentity"

    wait_for("the policy webhook", configured, timeout=60)

    # No policy: refused at apply, with the reconcile gate's words.
    def refused_at_admission() -> str:
        alive()
        done = kubectl(sandbox, "apply", "-f", "-", input=json.dumps(swi), check=False)
        return done.stderr if done.returncode != 0 and "NotAuthorized" in done.stderr else ""

    refusal = wait_for("the admission refusal", refused_at_admission, timeout=30)
    assert "denied the request: NotAuthorized: no SqlIdentityPolicy allows application" in refusal

    # The platform team's policy (by namespace label): admitted, reconciled, verified.
    kubectl(sandbox, "apply", "-f", "-", input=json.dumps(policy))
    wait_for(
        "admission",
        lambda: (
            kubectl(sandbox, "apply", "-f", "-", input=json.dumps(swi), check=False).returncode == 0
        ),
        timeout=30,
    )
    kubectl(
        sandbox,
        "wait",
        "--for=condition=Ready",
        "swi/customer-reader",
        "-n",
        tenant,
        "--timeout=60s",
    )
    # The platform team's identity pool: the operator reads it and writes only its status.
    pool = {
        "apiVersion": "sqlidentity.io/v1alpha1",
        "kind": "SqlIdentityPool",
        "metadata": {"name": tenant},
        "spec": {
            "members": [{"applicationClientId": swi["spec"]["identity"]["applicationClientId"]}]
        },
    }
    kubectl(sandbox, "apply", "-f", "-", input=json.dumps(pool))
    wait_for(
        "the pool's status",
        lambda: (
            kubectl(sandbox, "get", "sipool", tenant, "-o", "jsonpath={.status.memberCount}").stdout
            == "1"
        ),
        timeout=30,
    )
    for workload, path in (
        ("deploy/api", ".spec.template"),
        ("statefulset/db", ".spec.template"),
        ("daemonset/agent", ".spec.template"),
        ("cronjob/nightly", ".spec.jobTemplate.spec.template"),
    ):
        labels = kubectl(
            sandbox, "get", workload, "-n", tenant, "-o", f"jsonpath={{{path}.metadata.labels}}"
        ).stdout
        assert "azure.workload.identity/use" in labels, workload
    # A workload created now is labelled by the API server's call to the workload webhook: the
    # object it stores (and answers with) already has the label on its pod template.
    late = {**_workloads()[0], "metadata": {"name": "late"}}
    created = json.loads(
        kubectl(
            sandbox, "create", "-n", tenant, "-o", "json", "-f", "-", input=json.dumps(late)
        ).stdout
    )
    assert created["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"] == (
        "true"
    )
    # A service account that exists is annotated; a running Job's template cannot be changed.
    kubectl(sandbox, "apply", "-f", "-", input=json.dumps(batch))
    kubectl(
        sandbox,
        "wait",
        "--for=jsonpath={.status.conditions[?(@.type=='WorkloadsReady')].reason}=WorkloadNotLabelled",
        "swi/batch-reader",
        "-n",
        tenant,
        "--timeout=60s",
    )
    wait_for(
        "the policy's status",
        lambda: (
            kubectl(sandbox, "get", "sip", tenant, "-o", "jsonpath={.status.admitted}").stdout
            == "2"  # customer-reader and batch-reader
        ),
        timeout=20,
    )
    # A drift cycle over the settled resources (it lists the namespace's service accounts).
    done = re.compile(r"drift check of [1-9]\d* resources done")
    before = len(done.findall(log_path.read_text(errors="replace")))
    wait_for(
        "a drift check",
        lambda: len(done.findall(log_path.read_text(errors="replace"))) > before,
        timeout=20,
    )

    # Withdrawn: revoked.
    kubectl(sandbox, "delete", "sqlidentitypolicy", policy["metadata"]["name"])

    def revoked() -> bool:
        alive()
        reason = kubectl(
            sandbox,
            "get",
            "swi/customer-reader",
            "-n",
            tenant,
            "-o",
            "jsonpath={.status.conditions[?(@.type=='FederatedCredentialReady')].message}",
        ).stdout
        return "access revoked" in reason

    wait_for("revocation", revoked, timeout=30)
    kubectl(sandbox, "delete", "swi", "--all", "-n", tenant, "--timeout=60s")
    time.sleep(1)  # a drift cycle and a policy review with nothing left to do
