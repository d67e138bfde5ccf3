"""Our images on the sandbox's node: the archives built from operator/Dockerfile and
workload/Dockerfile (``make images``) are in the node's containerd under the names the chart and
overlays use, both start there and run their CLI, and a pod of the workload image reads the
service-account token the kubelet projected into it, which Entra's emulator accepts."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from azure.identity import WorkloadIdentityCredential
from kubernetes import client

from sandbox import images, launcher, node

pytestmark = pytest.mark.controlplane

AUDIENCE = "api://AzureADTokenExchange"
TOKEN_DIR = "/var/run/secrets/azure/tokens"


def _wait_for(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := check():
            return found
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}", pytrace=False)


@pytest.fixture(scope="module")
def refs() -> dict[str, str]:
    """Short ref (as the chart names it) -> what the node stores it as; fails clearly unless the
    images were built (make test builds them first: `make images`)."""
    archives = images.cached_images()
    if archives is None:
        pytest.fail("the images are not built for these sources: run `make images`", False)
    return {ref: images.qualified(ref) for ref in archives}


def _finished_pod(core: client.CoreV1Api, namespace: str, pod: client.V1Pod) -> client.V1Pod:
    core.create_namespaced_pod(namespace, pod)
    name = pod.metadata.name

    def done() -> client.V1Pod | None:
        got = core.read_namespaced_pod(name, namespace)
        return got if got.status.phase in {"Succeeded", "Failed"} else None

    return _wait_for(f"pod {name} to finish", done, timeout=180)


def _pod(name: str, image: str, command: list[str], **spec: Any) -> client.V1Pod:
    container_extra = spec.pop("container", {})
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1PodSpec(
            restart_policy="Never",
            containers=[
                client.V1Container(
                    name="main",
                    image=image,
                    image_pull_policy="Never",  # no registry: the node has it from `make images`
                    command=command,
                    **container_extra,
                )
            ],
            **spec,
        ),
    )


def test_the_node_has_both_images_under_the_charts_names(sandbox: Any, refs: dict[str, str]):
    have = node.image_names(sandbox.state_dir)
    assert set(refs.values()) <= have, sorted(have)


@pytest.mark.parametrize(
    ("ref", "cli", "usage"),
    [
        ("sql-workload-identity-operator:0.1.0", "swi-operator", "usage: swi-operator"),
        # The workload's parser names itself as its module runs (python -m swi_workload).
        ("sql-workload-identity-workload:0.1.0", "swi-workload", "usage: python -m swi_workload"),
    ],
)
def test_each_image_runs_its_cli_on_the_node(
    kube: Any, namespace: str, refs: dict[str, str], ref: str, cli: str, usage: str
):
    core = client.CoreV1Api(kube)
    pod = _finished_pod(core, namespace, _pod("help", ref, [cli, "--help"]))
    log = core.read_namespaced_pod_log("help", namespace)
    assert pod.status.phase == "Succeeded", log
    assert log.startswith(usage), log
    (status,) = pod.status.container_statuses
    assert status.image.endswith(ref), status.image


def test_a_workload_pod_reads_its_kubelet_projected_token_and_entra_accepts_it(
    kube: Any,
    namespace: str,
    refs: dict[str, str],
    federated_app: tuple[str, str],
    tmp_path: Path,
):
    client_id, object_id = federated_app
    core = client.CoreV1Api(kube)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="customer-reader"))
    )
    projected = client.V1Volume(
        name="azure-identity-token",
        projected=client.V1ProjectedVolumeSource(
            sources=[
                client.V1VolumeProjection(
                    service_account_token=client.V1ServiceAccountTokenProjection(
                        audience=AUDIENCE, expiration_seconds=3600, path="azure-identity-token"
                    )
                )
            ]
        ),
    )
    read_token = f"print(open('{TOKEN_DIR}/azure-identity-token').read())"
    pod = _pod(
        "reader",
        "sql-workload-identity-workload:0.1.0",
        ["python", "-c", read_token],
        service_account_name="customer-reader",
        volumes=[projected],
        container={
            "volume_mounts": [
                client.V1VolumeMount(name="azure-identity-token", mount_path=TOKEN_DIR)
            ]
        },
    )
    finished = _finished_pod(core, namespace, pod)
    token = core.read_namespaced_pod_log("reader", namespace).strip()
    assert finished.status.phase == "Succeeded", token
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == f"system:serviceaccount:{namespace}:customer-reader"
    assert claims["kubernetes.io"]["pod"]["name"] == "reader"  # bound to the pod: kubelet-made

    token_file = tmp_path / "token"
    token_file.write_text(token)
    credential = WorkloadIdentityCredential(
        tenant_id=os.environ["AZURE_TENANT_ID"],
        client_id=client_id,
        token_file_path=str(token_file),
    )
    access = credential.get_token("https://database.windows.net/.default").token
    assert jwt.decode(access, options={"verify_signature": False})["oid"] == object_id


SANDBOX_CA_DIR = "/etc/sandbox-ca"


@pytest.fixture
def federated_reader(sandbox: Any, namespace: str, admin_graph: Any) -> Iterator[tuple[str, str]]:
    """The seed's SP-AZURESQL-USER (a contained user with db_datareader in mydb) federated with
    ``system:serviceaccount:<ns>:customer-reader``; yields its client id and tenant."""
    from sandbox.entra.state import load_world

    app = next(
        p for p in load_world(launcher.WORLD_FILE).principals if p.name == "SP-AZURESQL-USER"
    )
    name = f"pod-{uuid.uuid4().hex[:12]}"
    path = f"/applications/{app.app_object_id}/federatedIdentityCredentials"
    created = admin_graph(
        "POST",
        path,
        {
            "name": name,
            "issuer": sandbox.issuer,
            "subject": f"system:serviceaccount:{namespace}:customer-reader",
            "audiences": [AUDIENCE],
        },
    )
    assert created.status_code == 201, created.text
    try:
        yield app.client_id, app.tenant_id
    finally:
        admin_graph("DELETE", f"{path}(name='{name}')")


def _seeded_customers() -> list[tuple[str, str]]:
    """(first_name, last_name) of the rows the world file seeds into sandbox-sql/mydb."""
    world = yaml.safe_load(launcher.WORLD_FILE.read_text())
    (server,) = [s for s in world["sql"]["servers"] if s["name"] == "sandbox-sql"]
    (mydb,) = [d for d in server["databases"] if d["name"] == "mydb"]
    return re.findall(r"INSERT INTO Customer .*VALUES \('([^']*)', '([^']*)'", mydb["seed"])


def test_a_workload_pod_logs_in_through_login_microsoftonline_com_and_reads_the_customers(
    sandbox: Any,
    kube: Any,
    namespace: str,
    refs: dict[str, str],
    federated_reader: tuple[str, str],
):
    """The seed's story as on AKS: the pod's kubelet-projected token is exchanged at
    login.microsoftonline.com (through the sandbox proxy on the node's link, TLS to the sandbox
    CA from a ConfigMap) and the access token logs in to sandbox-sql.database.windows.net (a
    hostAlias for the host's link address, TLS checked against the same CA)."""
    env = sandbox.env
    needed = ("SANDBOX_POD_HTTPS_PROXY", "SANDBOX_POD_AZ_SERVER", "SANDBOX_POD_SQL_HOST")
    missing = [name for name in needed if not env.get(name)]
    if missing:
        pytest.fail(f"the sandbox exports no {missing}: is its node up (not --no-node)?", False)
    client_id, tenant = federated_reader
    core = client.CoreV1Api(kube)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="customer-reader"))
    )
    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="sandbox-ca"),
            data={"ca.crt": sandbox.ca.read_text()},
        ),
    )
    volumes = [
        client.V1Volume(
            name="azure-identity-token",
            projected=client.V1ProjectedVolumeSource(
                sources=[
                    client.V1VolumeProjection(
                        service_account_token=client.V1ServiceAccountTokenProjection(
                            audience=AUDIENCE, expiration_seconds=3600, path="azure-identity-token"
                        )
                    )
                ]
            ),
        ),
        client.V1Volume(
            name="sandbox-ca", config_map=client.V1ConfigMapVolumeSource(name="sandbox-ca")
        ),
    ]
    ca_file = f"{SANDBOX_CA_DIR}/ca.crt"
    pod_env = {
        # What the identity webhook injects (Azure's own authority host: the proxy serves it).
        "AZURE_CLIENT_ID": client_id,
        "AZURE_TENANT_ID": tenant,
        "AZURE_FEDERATED_TOKEN_FILE": f"{TOKEN_DIR}/azure-identity-token",
        "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.com/",
        "HTTPS_PROXY": env["SANDBOX_POD_HTTPS_PROXY"],
        # requests (azure-identity) and OpenSSL (the ODBC driver) trust the mounted CA.
        "REQUESTS_CA_BUNDLE": ca_file,
        "SSL_CERT_FILE": ca_file,
        "AZ_SERVER": env["SANDBOX_POD_AZ_SERVER"],
        "AZ_DATABASE": "mydb",
    }
    query = "SELECT first_name, last_name FROM dbo.Customer ORDER BY customer_id"
    pod = _pod(
        "customers",
        "sql-workload-identity-workload:0.1.0",
        ["swi-workload", "--json", "--retries", "1", "--query", query],
        service_account_name="customer-reader",
        volumes=volumes,
        host_aliases=[
            client.V1HostAlias(
                ip=env["SANDBOX_NODE_HOST_ADDRESS"], hostnames=[env["SANDBOX_POD_SQL_HOST"]]
            )
        ],
        container={
            "env": [client.V1EnvVar(name=k, value=v) for k, v in pod_env.items()],
            "volume_mounts": [
                client.V1VolumeMount(name="azure-identity-token", mount_path=TOKEN_DIR),
                client.V1VolumeMount(name="sandbox-ca", mount_path=SANDBOX_CA_DIR),
            ],
        },
    )
    finished = _finished_pod(core, namespace, pod)
    log = core.read_namespaced_pod_log("customers", namespace)
    assert finished.status.phase == "Succeeded", log
    # --json prints one indented document on stdout; anything on stderr comes before it.
    start = log.find("{")
    assert start >= 0, log
    result, _ = json.JSONDecoder().raw_decode(log[start:])
    expected = _seeded_customers()
    assert len(expected) == 5, expected
    assert result["rowcount"] == 5, result
    assert [(r["first_name"], r["last_name"]) for r in result["rows"]] == expected
