"""The injection webhook in the sandbox, end to end, as the deployed operator.

deploy/overlays/generic is installed for real (its MutatingWebhookConfiguration, RBAC and
ServiceAccount); the webhook runs as its own ``kopf run`` process authenticated with a token of
that ServiceAccount, in self-managed TLS mode (it creates its Secret and writes the CA bundle into
the configuration). The controller-manager creates the pods of a labelled Deployment; the API
server calls the webhook; the test then does what the kubelet would (a TokenRequest for the
projected volume's audience, written where the injected variable points, rebased into a temporary
folder) and runs the workload with the injected environment: it prints the seed's customers.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_harness import (  # type: ignore[import-not-found]
    NAMESPACE,
    install_generic,
    operator_kubeconfig,
    wait_for,
)
from webhook_harness import (  # type: ignore[import-not-found]
    CUSTOMERS,
    ca_bundle,
    dry_run_injected,
    run_workload_of,
    webhook_process,
)

from sandbox.entra.state import load_world
from sandbox.launcher import WORLD_FILE

pytestmark = pytest.mark.controlplane

APP = "SP-AZURESQL-USER"  # the seeded database user (db_datareader on mydb)
SA = "customer-reader"
USE = {"azure.workload.identity/use": "true"}


def _core(kube: Any) -> Any:
    """The typed client, as Any: these tests read fields the API server is known to set."""
    from kubernetes import client

    return client.CoreV1Api(kube)


def _apps(kube: Any) -> Any:
    from kubernetes import client

    return client.AppsV1Api(kube)


def _principal(name: str) -> Any:
    return next(p for p in load_world(WORLD_FILE).principals if p.name == name)


def _service_account(kube: Any, namespace: str, name: str, **annotations: str) -> None:
    from kubernetes import client

    _core(kube).create_namespaced_service_account(
        namespace,
        client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name, annotations=annotations)),
    )


def _create_namespace(kube: Any, name: str, labels: dict[str, str] | None = None) -> None:
    from kubernetes import client

    _core(kube).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels))
    )


@pytest.fixture(scope="module")
def webhook(sandbox: Any, kube: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The webhook serving as the deployed ServiceAccount, with a self-managed certificate."""

    install_generic(sandbox)
    tmp = tmp_path_factory.mktemp("webhook")
    probe_ns = f"probe-{uuid.uuid4().hex[:8]}"
    _create_namespace(kube, probe_ns)
    _service_account(
        kube, probe_ns, "probe", **{"azure.workload.identity/client-id": _principal(APP).client_id}
    )
    kubeconfig = operator_kubeconfig(sandbox, kube, tmp / "operator.kubeconfig")
    env = {"SWI_WEBHOOK_NAMESPACE": NAMESPACE}
    try:
        with webhook_process(
            kube, kubeconfig, tmp / "webhook.log", env, (probe_ns, "probe")
        ) as port:
            yield port
    finally:
        _core(kube).delete_namespace(probe_ns)


def test_self_managed_certificate_is_in_its_secret_and_trusted(kube: Any, webhook: int) -> None:

    secret = _core(kube).read_namespaced_secret(
        "sql-workload-identity-operator-webhook-tls", NAMESPACE
    )
    assert set(secret.data) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    import base64

    assert ca_bundle(kube) == base64.b64decode(secret.data["ca.crt"])


@pytest.fixture
def federated_app(sandbox: Any, namespace: str, admin_graph: Any) -> Iterator[str]:
    """SP-AZURESQL-USER federated with system:serviceaccount:<namespace>:customer-reader."""
    app = _principal(APP)
    name = f"webhook-test-{uuid.uuid4().hex[:8]}"
    path = f"/applications/{app.app_object_id}/federatedIdentityCredentials"
    created = admin_graph(
        "POST",
        path,
        {
            "name": name,
            "issuer": sandbox.issuer,
            "subject": f"system:serviceaccount:{namespace}:{SA}",
            "audiences": ["api://AzureADTokenExchange"],
        },
    )
    assert created.status_code == 201, created.text
    try:
        yield app.client_id
    finally:
        admin_graph("DELETE", f"{path}(name='{name}')")


def _deployment(name: str, labels: dict[str, str], env: dict[str, str]) -> Any:
    from kubernetes import client

    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1DeploymentSpec(
            replicas=1,
            selector=client.V1LabelSelector(match_labels={"app": name}),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels={"app": name, **labels}),
                spec=client.V1PodSpec(
                    service_account_name=SA,
                    containers=[
                        client.V1Container(
                            name="customer-api",
                            image="sql-workload-identity-workload:0.1.0",
                            env=[client.V1EnvVar(name=k, value=v) for k, v in env.items()],
                        )
                    ],
                ),
            ),
        ),
    )


def _pod_of(kube: Any, namespace: str, app: str) -> Any:

    def created() -> Any:
        pods = _core(kube).list_namespaced_pod(namespace, label_selector=f"app={app}")
        return pods.items[0] if pods.items else None

    return wait_for(f"the controller-manager to create a pod of {app}", created, timeout=60)


def test_deployment_pods_get_the_token_and_the_workload_prints_the_customers(
    sandbox: Any, kube: Any, namespace: str, webhook: int, federated_app: str, tmp_path: Path
) -> None:

    tenant = os.environ["AZURE_TENANT_ID"]
    _service_account(
        kube,
        namespace,
        SA,
        **{
            "azure.workload.identity/client-id": federated_app,
            "azure.workload.identity/tenant-id": tenant,
        },
    )
    # The seed's manifest sets the server and database itself; the identity comes from admission.
    own_env = {"AZ_SERVER": os.environ["AZ_SERVER"], "AZ_DATABASE": os.environ["AZ_DATABASE"]}
    _apps(kube).create_namespaced_deployment(namespace, _deployment("customer-api", USE, own_env))
    pod = _pod_of(kube, namespace, "customer-api")

    # What admission put into the pod, read from the pod the API server stored; then the kubelet's
    # part and the workload (webhook_harness.run_workload_of).
    env = {e.name: e.value for e in pod.spec.containers[0].env}
    assert env["AZURE_CLIENT_ID"] == federated_app
    assert env["AZURE_TENANT_ID"] == tenant
    assert env["AZURE_AUTHORITY_HOST"] == os.environ["AZURE_AUTHORITY_HOST"]
    assert env["AZ_SERVER"] == own_env["AZ_SERVER"]
    result = run_workload_of(kube, pod, tmp_path)
    assert result.returncode == 0, result.stderr
    for first_name in CUSTOMERS:
        assert first_name in result.stdout
    assert "Davis" in result.stdout


def _bare_pod(name: str, labels: dict[str, str], **annotations: str) -> Any:
    from kubernetes import client

    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=labels, annotations=annotations or None),
        spec=client.V1PodSpec(
            service_account_name=SA,
            # Admission is all these tests look at: no node carries this label, so the pods stay
            # Pending instead of loading the sandbox's node with image pulls that cannot succeed.
            node_selector={"sqlidentity.io/admission-test-only": "true"},
            containers=[
                client.V1Container(name="app", image="app:1"),
                client.V1Container(name="proxy", image="proxy:1"),
            ],
        ),
    )


def _client_id_sa(kube: Any, namespace: str, **more: str) -> None:
    _service_account(
        kube,
        namespace,
        SA,
        **{"azure.workload.identity/client-id": _principal(APP).client_id},
        **more,
    )


def test_skip_containers_and_pod_annotations_through_the_api_server(
    kube: Any, namespace: str, webhook: int
) -> None:

    _client_id_sa(kube, namespace)
    pod = _core(kube).create_namespaced_pod(
        namespace,
        _bare_pod(
            "skip",
            USE,
            **{
                "azure.workload.identity/skip-containers": "proxy",
                "azure.workload.identity/service-account-token-expiration": "86400",
            },
        ),
    )
    app, proxy = pod.spec.containers
    assert {e.name for e in app.env} >= {"AZURE_CLIENT_ID", "AZURE_FEDERATED_TOKEN_FILE"}
    assert not proxy.env
    assert all(not m.name.startswith("azure-workload-identity") for m in proxy.volume_mounts)
    reserved = next(v for v in pod.spec.volumes if v.name.startswith("azure-workload-identity"))
    assert reserved.projected.sources[0].service_account_token.expiration_seconds == 86400


def test_invalid_expiration_rejects_the_pod_with_the_reason(
    kube: Any, namespace: str, webhook: int
) -> None:
    from kubernetes import client

    _client_id_sa(
        kube, namespace, **{"azure.workload.identity/service-account-token-expiration": "60"}
    )
    with pytest.raises(client.ApiException) as caught:
        _core(kube).create_namespaced_pod(namespace, _bare_pod("bad", USE))
    assert caught.value.status == 400
    assert "expected 3600 to 86400" in str(caught.value.body)


def test_a_service_account_without_client_id_gets_all_but_azure_client_id(
    kube: Any, namespace: str, webhook: int
) -> None:
    """As azure-workload-identity: the app picks its client id itself (issue 19)."""
    _service_account(kube, namespace, SA)  # no client-id annotation
    pod = _core(kube).create_namespaced_pod(namespace, _bare_pod("no-id", USE))
    app = pod.spec.containers[0]
    env = {e.name: e.value for e in app.env}
    assert set(env) == {"AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE", "AZURE_AUTHORITY_HOST"}
    assert env["AZURE_TENANT_ID"] == os.environ["AZURE_TENANT_ID"]
    reserved = next(v for v in pod.spec.volumes if v.name.startswith("azure-workload-identity"))
    assert any(m.name == reserved.name for m in app.volume_mounts)


def test_the_proxy_sidecar_annotation_rejects_the_pod_with_the_fix(
    kube: Any, namespace: str, webhook: int
) -> None:
    from kubernetes import client

    _client_id_sa(kube, namespace)
    pod = _bare_pod("proxy", USE, **{"azure.workload.identity/inject-proxy-sidecar": "true"})
    with pytest.raises(client.ApiException) as caught:
        _core(kube).create_namespaced_pod(namespace, pod)
    assert caught.value.status == 400
    assert "azure.workload.identity/inject-proxy-sidecar" in str(caught.value.body)
    assert "remove the annotation" in str(caught.value.body)


def test_the_proxy_port_annotation_alone_is_admitted_with_a_warning(
    sandbox: Any, kube: Any, namespace: str, webhook: int
) -> None:
    """The warning reaches whoever created the pod (kubectl prints it)."""
    from deploy_harness import kubectl  # type: ignore[import-not-found]

    _client_id_sa(kube, namespace)
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "port",
            "labels": USE,
            "annotations": {"azure.workload.identity/proxy-sidecar-port": "8000"},
        },
        "spec": {
            "serviceAccountName": SA,
            "nodeSelector": {"sqlidentity.io/admission-test-only": "true"},
            "containers": [{"name": "app", "image": "app:1"}],
        },
    }
    created = kubectl(sandbox, "-n", namespace, "create", "-f", "-", input=json.dumps(manifest))
    assert "Warning: pod annotation azure.workload.identity/proxy-sidecar-port has no effect" in (
        created.stderr
    )
    pod = _core(kube).read_namespaced_pod("port", namespace)
    assert any(e.name == "AZURE_CLIENT_ID" for e in pod.spec.containers[0].env)


def test_unlabelled_pods_and_opted_out_namespaces_are_untouched(
    kube: Any, namespace: str, webhook: int
) -> None:

    core = _core(kube)
    opted_out = f"t-{uuid.uuid4().hex[:10]}"
    _create_namespace(kube, opted_out, {"sqlidentity.io/injection": "disabled"})
    try:
        _client_id_sa(kube, opted_out)
        assert not dry_run_injected(kube, opted_out, SA)
        assert (
            not core.create_namespaced_pod(opted_out, _bare_pod("off", {})).spec.containers[0].env
        )
    finally:
        core.delete_namespace(opted_out)


def _client_id_of(pod: Any) -> str | None:
    return next((e.value for e in pod.spec.containers[0].env if e.name == "AZURE_CLIENT_ID"), None)


def test_an_account_the_cache_has_not_seen_yet_is_read_live(
    kube: Any, namespace: str, webhook: int
) -> None:
    """A cache miss falls back to the API server: a pod created right after its service account
    (or right after the operator annotated it, before the watch delivers) gets the client id."""
    from kubernetes import client

    core = _core(kube)
    client_id = _principal(APP).client_id
    for i in range(5):
        name = f"fresh-{i}"
        _service_account(kube, namespace, name, **{"azure.workload.identity/client-id": client_id})
        pod = _bare_pod(f"fresh-{i}", USE)
        pod.spec.service_account_name = name
        assert _client_id_of(core.create_namespaced_pod(namespace, pod)) == client_id
    # The operator's order: the account exists without the annotation, is annotated, and the
    # workload's pods follow at once.
    for i in range(5):
        name = f"later-{i}"
        _service_account(kube, namespace, name)
        pod = _bare_pod(f"later-{i}", USE)
        pod.spec.service_account_name = name
        assert _client_id_of(core.create_namespaced_pod(namespace, pod)) is None
        core.patch_namespaced_service_account(
            name,
            namespace,
            client.V1ServiceAccount(
                metadata=client.V1ObjectMeta(
                    annotations={"azure.workload.identity/client-id": client_id}
                )
            ),
        )
        pod = _bare_pod(f"later-{i}-annotated", USE)
        pod.spec.service_account_name = name
        assert _client_id_of(core.create_namespaced_pod(namespace, pod)) == client_id


def test_a_changed_client_id_reaches_the_next_admissions(
    kube: Any, namespace: str, webhook: int
) -> None:
    """The cache follows the watch: a new client id is what pods get, within moments."""
    core = _core(kube)
    _client_id_sa(kube, namespace)
    pod = core.create_namespaced_pod(namespace, _bare_pod("before", USE))
    assert _client_id_of(pod) == _principal(APP).client_id
    other = "5e0c1d9a-7b3f-4c2e-9a1d-0000000000ff"
    core.patch_namespaced_service_account(
        SA, namespace, {"metadata": {"annotations": {"azure.workload.identity/client-id": other}}}
    )
    started = time.monotonic()
    attempt = iter(range(1000))

    def injected_other() -> bool:
        created = core.create_namespaced_pod(namespace, _bare_pod(f"after-{next(attempt)}", USE))
        return _client_id_of(created) == other

    wait_for("a pod with the new client id", injected_other, timeout=5, interval=0.05)
    # A watch delivers in milliseconds; the first or second pod after the patch has it.
    assert time.monotonic() - started < 3.0


def test_admission_latency(kube: Any, namespace: str, webhook: int, capsys: Any) -> None:
    """Pod creation with the webhook against the same without it (the objectSelector skips it)."""

    core = _core(kube)
    _client_id_sa(kube, namespace)
    rounds = 30

    def timed(labels: dict[str, str], prefix: str) -> list[float]:
        samples = []
        for i in range(rounds):
            started = time.perf_counter()
            core.create_namespaced_pod(namespace, _bare_pod(f"{prefix}-{i}", labels))
            samples.append((time.perf_counter() - started) * 1000)
        return sorted(samples)

    timed(USE, "warm")  # connections, TLS sessions, imports
    plain = timed({}, "plain")
    injected = timed(USE, "injected")
    p50 = statistics.median(injected) - statistics.median(plain)
    p95 = injected[int(rounds * 0.95) - 1] - plain[int(rounds * 0.95) - 1]
    with capsys.disabled():
        print(
            f"\nadmission latency over {rounds} pod creations: without webhook p50 "
            f"{statistics.median(plain):.1f} ms, with webhook p50 {statistics.median(injected):.1f}"
            f" ms p95 {injected[int(rounds * 0.95) - 1]:.1f} ms; added by the webhook p50 "
            f"{p50:.1f} ms, p95 {p95:.1f} ms"
        )
    # The API server's timeout for the webhook is 10 s; being anywhere near it would be a bug.
    assert statistics.median(injected) < 500
