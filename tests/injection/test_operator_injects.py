"""The whole operator, as deploy/overlays/generic runs it: the issue's story end to end.

``python -m swi_operator --injection-webhook true`` runs with a token of the deployed
ServiceAccount (so the deployed ClusterRole is all it has) and the operator's own Entra app. A
SqlWorkloadIdentity for SP-AZURESQL-USER is applied next to an existing, unlabelled Deployment: the
operator creates the federated credential, annotates the service account and labels the pod
template; the controller-manager rolls the Deployment; the API server sends the new pod to the
operator's webhook; the workload, run with what was injected, prints the customers. Deleting the
resource removes the credential again (the operator's finalizer, still as that ServiceAccount).

The other order, the README's: the resource first, then its Deployment (``app`` on the pod
template only, the serve mode with probes). The workload webhook labels the template at
admission, so the first ReplicaSet's template, and its first pod, already have the label and the
token; and a pod of the service account that runs without the token turns Ready False, named.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_harness import (  # type: ignore[import-not-found]
    NAMESPACE,
    REPO,
    install_generic,
    kubectl,
    operator_kubeconfig,
    wait_for,
)
from webhook_harness import (  # type: ignore[import-not-found]
    CUSTOMERS,
    run_workload_of,
    webhook_process,
)

from sandbox.demo import SEED_QUERY
from sandbox.entra.state import load_world
from sandbox.launcher import WORLD_FILE

pytestmark = pytest.mark.controlplane

USE = "azure.workload.identity/use"


def _principal(name: str) -> Any:
    return next(p for p in load_world(WORLD_FILE).principals if p.name == name)


@pytest.fixture(scope="module")
def app_namespace(kube: Any) -> Iterator[str]:
    from kubernetes import client

    core: Any = client.CoreV1Api(kube)
    name = f"app-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="module")
def operator(
    sandbox: Any, kube: Any, app_namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[int]:
    from kubernetes import client

    install_generic(sandbox)
    tmp = tmp_path_factory.mktemp("operator")
    world = load_world(WORLD_FILE)
    me = _principal("sql-workload-identity-operator")
    demo = _principal("SP-AZURESQL-USER")
    # As deployed, the operator requires a SqlIdentityPolicy: the platform team's, for this app.
    policy = {
        "apiVersion": "sqlidentity.io/v1alpha1",
        "kind": "SqlIdentityPolicy",
        "metadata": {"name": f"{app_namespace}-demo"},
        "spec": {
            "identity": {"applicationClientId": demo.client_id},
            "namespaces": {"names": [app_namespace]},
        },
    }
    kubectl(sandbox, "apply", "-f", "-", input=json.dumps(policy))
    # The readiness probe: a service account the webhook would inject for.
    core: Any = client.CoreV1Api(kube)
    core.create_namespaced_service_account(
        app_namespace,
        client.V1ServiceAccount(
            metadata=client.V1ObjectMeta(
                name="probe", annotations={"azure.workload.identity/client-id": demo.client_id}
            )
        ),
    )
    env = {
        "AZURE_TENANT_ID": me.tenant_id,
        "AZURE_CLIENT_ID": me.client_id,
        "AZURE_CLIENT_SECRET": me.secrets[0],
        "AZURE_AUTHORITY_HOST": sandbox.env["AZURE_AUTHORITY_HOST"],
        "AZURE_SUBSCRIPTION_ID": world.subscription_id,
        "SWI_GRAPH_URL": sandbox.env["SANDBOX_GRAPH_URL"],
        "SWI_ARM_URL": sandbox.env["SANDBOX_ARM_URL"],
        "SWI_NAMESPACES": app_namespace,
        "SWI_DRIFT_INTERVAL": "5",
        "SWI_RETRY_BACKOFF_MAX": "2",
        "SWI_INJECTION_WEBHOOK": "true",
        "SWI_WORKLOAD_WEBHOOK": "true",
        # The first test's old pod stays (its new pods never turn ready on the sandbox's node,
        # so the rollout never completes): long enough
        # for that test to see Ready before the old pod is reported.
        "SWI_POD_TOKEN_GRACE": "30",
        "SWI_WEBHOOK_NAMESPACE": NAMESPACE,
        # As in the pod: the ledger ConfigMap lives in the operator's namespace, the only one
        # the deployed RBAC lets it read (its default, "default", is refused: PermissionDenied).
        "POD_NAMESPACE": NAMESPACE,
    }
    if (REPO / "operator/swi_operator/config.py").read_text().find("SWI_CA_BUNDLE") >= 0:
        env["SWI_CA_BUNDLE"] = str(sandbox.ca)
    kubeconfig = operator_kubeconfig(sandbox, kube, tmp / "operator.kubeconfig")
    with webhook_process(
        kube,
        kubeconfig,
        tmp / "operator.log",
        env,
        (app_namespace, "probe"),
        argv=[sys.executable, "-m", "swi_operator"],
    ) as port:
        yield port
    kubectl(sandbox, "delete", "sqlidentitypolicy", f"{app_namespace}-demo", "--ignore-not-found")


def _swi(namespace: str, client_id: str) -> dict[str, Any]:
    return {
        "apiVersion": "sqlidentity.io/v1alpha1",
        "kind": "SqlWorkloadIdentity",
        "metadata": {"name": "customer-reader", "namespace": namespace},
        "spec": {
            "serviceAccountName": "customer-reader",
            "identity": {"applicationClientId": client_id},
            "workloads": {"selector": {"matchLabels": {"app": "customer-api"}}},
        },
    }


def test_operator_labels_the_deployment_and_its_new_pods_get_the_token(
    sandbox: Any, kube: Any, app_namespace: str, operator: int, tmp_path: Path
) -> None:
    from kubernetes import client

    apps: Any = client.AppsV1Api(kube)
    core: Any = client.CoreV1Api(kube)
    custom: Any = client.CustomObjectsApi(kube)
    demo = _principal("SP-AZURESQL-USER")
    ns = app_namespace
    container = client.V1Container(
        name="customer-api",
        image="sql-workload-identity-workload:0.1.0",
        env=[
            client.V1EnvVar(name="AZ_SERVER", value=os.environ["AZ_SERVER"]),
            client.V1EnvVar(name="AZ_DATABASE", value=os.environ["AZ_DATABASE"]),
        ],
    )
    apps.create_namespaced_deployment(
        ns,
        client.V1Deployment(
            metadata=client.V1ObjectMeta(name="customer-api", labels={"app": "customer-api"}),
            spec=client.V1DeploymentSpec(
                replicas=1,
                selector=client.V1LabelSelector(match_labels={"app": "customer-api"}),
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels={"app": "customer-api"}),
                    spec=client.V1PodSpec(
                        service_account_name="customer-reader", containers=[container]
                    ),
                ),
            ),
        ),
    )
    kubectl(sandbox, "apply", "-f", "-", input=json.dumps(_swi(ns, demo.client_id)))
    kubectl(
        sandbox, "wait", "--for=condition=Ready", "swi/customer-reader", "-n", ns, "--timeout=90s"
    )

    def labelled_pod() -> Any:
        pods = core.list_namespaced_pod(ns, label_selector=f"app=customer-api,{USE}=true")
        return pods.items[0] if pods.items else None

    try:
        pod = wait_for("a pod of the labelled template", labelled_pod, timeout=30)
    except AssertionError:
        state = kubectl(sandbox, "get", "deploy,rs,pods,swi,events", "-n", ns, "-o", "wide").stdout
        template = kubectl(
            sandbox, "get", "deploy/customer-api", "-n", ns, "-o", "jsonpath={.spec.template}"
        ).stdout
        raise AssertionError(f"{state}\n{template}") from None
    sa = core.read_namespaced_service_account("customer-reader", ns)
    assert sa.metadata.annotations["azure.workload.identity/client-id"] == demo.client_id
    env = {e.name: e.value for e in pod.spec.containers[0].env}
    assert env["AZURE_CLIENT_ID"] == demo.client_id

    result = run_workload_of(kube, pod, tmp_path)
    assert result.returncode == 0, result.stderr
    for first_name in CUSTOMERS:
        assert first_name in result.stdout

    # Clean-up through the operator's finalizer, still as the deployed ServiceAccount.
    custom.delete_namespaced_custom_object(
        "sqlidentity.io", "v1alpha1", ns, "sqlworkloadidentities", "customer-reader"
    )

    def gone() -> bool:
        try:
            custom.get_namespaced_custom_object(
                "sqlidentity.io", "v1alpha1", ns, "sqlworkloadidentities", "customer-reader"
            )
        except client.ApiException as exc:
            return bool(exc.status == 404)
        return False

    wait_for("the finalizer to let the resource go", gone, timeout=60)


def _readme_deployment(namespace: str, service_account: str) -> dict[str, Any]:
    """README step 9's Deployment (renamed: the first test's customer-api is still there): labels
    on its pod template only, the serve mode with probes."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "readme-api", "namespace": namespace},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "readme-api"}},
            "template": {
                "metadata": {"labels": {"app": "readme-api"}},
                "spec": {
                    "serviceAccountName": service_account,
                    "containers": [
                        {
                            "name": "customer-api",
                            "image": "sql-workload-identity-workload:0.1.0",
                            "args": ["serve", "--every", "60"],
                            "env": [
                                {"name": "AZ_SERVER", "value": os.environ["AZ_SERVER"]},
                                {"name": "AZ_DATABASE", "value": os.environ["AZ_DATABASE"]},
                                {"name": "AZ_QUERY", "value": SEED_QUERY},
                            ],
                            "ports": [{"name": "http", "containerPort": 8080}],
                            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                            "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}},
                        }
                    ],
                },
            },
        },
    }


def _condition(sandbox: Any, ns: str, name: str, type_: str) -> dict[str, Any]:
    found = kubectl(
        sandbox,
        "get",
        f"swi/{name}",
        "-n",
        ns,
        "-o",
        f"jsonpath={{.status.conditions[?(@.type=='{type_}')]}}",
    ).stdout
    return dict(json.loads(found)) if found else {}


def test_resource_first_then_the_readme_deployment_its_first_pod_has_the_token(
    sandbox: Any, kube: Any, app_namespace: str, operator: int, tmp_path: Path
) -> None:
    from kubernetes import client

    apps: Any = client.AppsV1Api(kube)
    core: Any = client.CoreV1Api(kube)
    demo = _principal("SP-AZURESQL-USER")
    ns = app_namespace
    swi = _swi(ns, demo.client_id)
    swi["metadata"]["name"] = "readme-reader"
    swi["spec"]["serviceAccountName"] = "readme-reader"
    swi["spec"]["workloads"] = {"selector": {"matchLabels": {"app": "readme-api"}}}
    kubectl(sandbox, "apply", "-f", "-", input=json.dumps(swi))
    kubectl(
        sandbox, "wait", "--for=condition=Ready", "swi/readme-reader", "-n", ns, "--timeout=90s"
    )
    assert _condition(sandbox, ns, "readme-reader", "WorkloadsReady")["reason"] == "NoWorkloads"

    created = apps.create_namespaced_deployment(ns, _readme_deployment(ns, "readme-reader"))
    # Labelled by the API server's call to the workload webhook: the stored object has it.
    assert created.spec.template.metadata.labels[USE] == "true"

    def first_replica_set() -> Any:
        sets = apps.list_namespaced_replica_set(ns, label_selector="app=readme-api").items
        mine = [
            rs
            for rs in sets
            if any(o.name == "readme-api" for o in rs.metadata.owner_references or [])
        ]
        return mine[0] if len(mine) == 1 else None

    replica_set = wait_for("the Deployment's first ReplicaSet", first_replica_set, timeout=30)
    assert replica_set.spec.template.metadata.labels[USE] == "true"

    def first_pod() -> Any:
        pods = core.list_namespaced_pod(
            ns,
            label_selector=f"pod-template-hash={replica_set.metadata.labels['pod-template-hash']}",
        ).items
        return pods[0] if pods else None

    pod = wait_for("the first pod", first_pod, timeout=30)
    env = {e.name: e.value for e in pod.spec.containers[0].env}
    assert env["AZURE_CLIENT_ID"] == demo.client_id
    # Every pod of that account so far got the token: none was created without it.
    without = [
        p.metadata.name
        for p in core.list_namespaced_pod(ns).items
        if p.spec.service_account_name == "readme-reader"
        and not any(e.name == "AZURE_FEDERATED_TOKEN_FILE" for e in p.spec.containers[0].env or [])
    ]
    assert without == []
    result = run_workload_of(kube, pod, tmp_path)
    assert result.returncode == 0, result.stderr
    for first_name in CUSTOMERS:
        assert first_name in result.stdout

    # A pod of the account that asks for no injection runs without the token: past the grace
    # (30 s here) the next drift check (5 s) turns WorkloadsReady, and Ready, False, naming it.
    bare = client.V1Pod(
        metadata=client.V1ObjectMeta(name="bare-reader", labels={"app": "readme-api"}),
        spec=client.V1PodSpec(
            service_account_name="readme-reader",
            containers=[client.V1Container(name="app", image="app:1")],
        ),
    )
    core.create_namespaced_pod(ns, bare)
    kubectl(
        sandbox,
        "wait",
        "--for=jsonpath={.status.conditions[?(@.type=='Ready')].reason}=PodsWithoutToken",
        "swi/readme-reader",
        "-n",
        ns,
        "--timeout=120s",
    )
    ready = _condition(sandbox, ns, "readme-reader", "Ready")
    assert ready["status"] == "False"
    assert "bare-reader" in ready["message"] and "created before" in ready["message"]
    assert pod.metadata.name not in ready["message"]

    # Gone again: the condition recovers at the next drift check.
    core.delete_namespaced_pod("bare-reader", ns, grace_period_seconds=0)
    kubectl(
        sandbox, "wait", "--for=condition=Ready", "swi/readme-reader", "-n", ns, "--timeout=60s"
    )
    apps.delete_namespaced_deployment("readme-api", ns)
    kubectl(sandbox, "delete", "swi/readme-reader", "-n", ns, "--timeout=60s")
