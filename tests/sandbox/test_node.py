"""The sandbox's node: a real kubelet with containerd and kube-proxy, in a network namespace of
its own, registered with the control plane; pods run, get projected tokens Entra accepts, reach
the API server and each other through ClusterIP Services; ``down`` leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from azure.identity import WorkloadIdentityCredential
from kubernetes import client

from sandbox import launcher, node
from sandbox.node.runtime import leftovers

pytestmark = pytest.mark.controlplane

AUDIENCE = "api://AzureADTokenExchange"
TOKEN_DIR = "/var/run/secrets/azure/tokens"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def _wait_for(what: str, check: Callable[[], Any], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def _kubectl(sandbox: Any, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(sandbox.kubectl), "--kubeconfig", sandbox.kubeconfig, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check:
        assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}"
    return proc


def _probe_container(name: str, args: list[str], **extra: Any) -> client.V1Container:
    return client.V1Container(
        name=name,
        image=node.PROBE_IMAGE,
        image_pull_policy="Never",  # made and imported by the node; there is no registry
        args=args,
        **extra,
    )


def _running_pod(core: client.CoreV1Api, namespace: str, selector: str) -> client.V1Pod:
    def check() -> client.V1Pod | None:
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items
        return next((p for p in pods if p.status.phase == "Running"), None)

    return _wait_for(f"a Running pod with {selector} in {namespace}", check)


def _deployment(namespace: str, name: str, pod_spec: client.V1PodSpec) -> client.V1Deployment:
    labels = {"app": name}
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name, namespace=namespace),
        spec=client.V1DeploymentSpec(
            replicas=1,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels), spec=pod_spec
            ),
        ),
    )


def test_node_is_registered_and_ready(sandbox: Any, kube: Any) -> None:
    name = str(sandbox.component("kubelet").info["node"])
    got = client.CoreV1Api(kube).read_node(name)
    ready = {c.type: c.status for c in got.status.conditions}
    assert ready["Ready"] == "True", got.status.conditions
    # Built from the same pinned module set as the control plane, with its version stamped.
    assert got.status.node_info.kubelet_version == "v1.36.3"
    assert got.status.node_info.container_runtime_version == "containerd://2.4.2"
    addresses = {a.type: a.address for a in got.status.addresses}
    net = node.load_plan(sandbox.state_dir)
    assert net is not None and addresses["InternalIP"] == net.node_ip


def test_deployment_pod_runs_and_logs_are_readable(sandbox: Any, kube: Any, namespace: str) -> None:
    apps = client.AppsV1Api(kube)
    spec = client.V1PodSpec(containers=[_probe_container("web", ["serve", "8080"])])
    apps.create_namespaced_deployment(namespace, _deployment(namespace, "web", spec))
    pod = _running_pod(client.CoreV1Api(kube), namespace, "app=web")
    net = node.load_plan(sandbox.state_dir)
    assert net is not None
    assert pod.spec.node_name == net.node_name
    # A CNI address from this node's pod range, not the host's.
    assert pod.status.pod_ip.startswith(net.pod_cidr.rsplit(".", 2)[0] + ".1.")
    # kubectl logs goes API server -> kubelet on the node's InternalIP.
    logs = _wait_for(
        "the container's log line",
        lambda: (
            "listening on :8080"
            in _kubectl(sandbox, "logs", "-n", namespace, pod.metadata.name, check=False).stdout
        ),
    )
    assert logs


def test_kubelet_projected_token_is_exchanged_at_entra(
    sandbox: Any, kube: Any, namespace: str, federated_app: tuple[str, str], tmp_path: Path
) -> None:
    client_id, object_id = federated_app
    core = client.CoreV1Api(kube)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="customer-reader"))
    )
    token_volume = client.V1Volume(
        name="azure-identity-token",
        projected=client.V1ProjectedVolumeSource(
            sources=[
                client.V1VolumeProjection(
                    service_account_token=client.V1ServiceAccountTokenProjection(
                        audience=AUDIENCE, expiration_seconds=3600, path="token"
                    )
                )
            ]
        ),
    )
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="reader", labels={"app": "reader"}),
        spec=client.V1PodSpec(
            service_account_name="customer-reader",
            containers=[
                _probe_container(
                    "main",
                    ["sleep"],
                    volume_mounts=[
                        client.V1VolumeMount(name="azure-identity-token", mount_path=TOKEN_DIR)
                    ],
                )
            ],
            volumes=[token_volume],
        ),
    )
    core.create_namespaced_pod(namespace, pod)
    _running_pod(core, namespace, "app=reader")
    # The token the kubelet wrote into the pod, read from inside the container.
    token = _kubectl(
        sandbox, "exec", "-n", namespace, "reader", "--", "/swi-probe", "cat", f"{TOKEN_DIR}/token"
    ).stdout.strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["iss"] == sandbox.issuer
    assert claims["aud"] == [AUDIENCE]
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
    got = jwt.decode(access, options={"verify_signature": False})
    assert (got["oid"], got["aud"]) == (object_id, "https://database.windows.net/")


def test_cluster_ip_service_reaches_pod_from_pods_and_host(
    sandbox: Any, kube: Any, namespace: str
) -> None:
    core = client.CoreV1Api(kube)
    apps = client.AppsV1Api(kube)
    spec = client.V1PodSpec(containers=[_probe_container("web", ["serve", "8080"])])
    apps.create_namespaced_deployment(namespace, _deployment(namespace, "web", spec))
    client_spec = client.V1PodSpec(containers=[_probe_container("main", ["sleep"])])
    apps.create_namespaced_deployment(namespace, _deployment(namespace, "client", client_spec))
    service = core.create_namespaced_service(
        namespace,
        client.V1Service(
            metadata=client.V1ObjectMeta(name="web"),
            spec=client.V1ServiceSpec(
                selector={"app": "web"},
                ports=[client.V1ServicePort(port=80, target_port=8080)],
            ),
        ),
    )
    cluster_ip = service.spec.cluster_ip
    net = node.load_plan(sandbox.state_dir)
    assert net is not None
    assert cluster_ip.startswith(net.service_cidr.rsplit(".", 1)[0] + ".")
    web = _running_pod(core, namespace, "app=web")
    caller = _running_pod(core, namespace, "app=client")

    # Pod -> Service -> pod (kube-proxy's rules in the node's namespace, same bridge).
    def from_pod() -> str:
        return _kubectl(
            sandbox,
            "exec",
            "-n",
            namespace,
            caller.metadata.name,
            "--",
            "/swi-probe",
            "get",
            f"http://{cluster_ip}/",
            check=False,
        ).stdout

    assert f"swi-probe {web.metadata.name}" in _wait_for("the Service from a pod", from_pod, 60)

    # Host (where the API server runs) -> Service and -> pod IP, over the node's link.
    session = requests.Session()
    session.trust_env = False  # never the sandbox's HTTPS proxy
    assert (
        session.get(f"http://{cluster_ip}/", timeout=10).text.strip()
        == f"swi-probe {web.metadata.name}"
    )
    assert session.get(f"http://{web.status.pod_ip}:8080/", timeout=10).ok

    # Pod -> API server through the in-cluster address (the kubernetes Service), verified
    # against the CA the pod was given.
    # No cluster DNS: the name does not resolve; the Service's address does.
    kube_svc = core.read_namespaced_service("kubernetes", "default").spec.cluster_ip
    version = _kubectl(
        sandbox,
        "exec",
        "-n",
        namespace,
        caller.metadata.name,
        "--",
        "/swi-probe",
        "get",
        f"https://{kube_svc}/version",
        f"{SA_DIR}/ca.crt",
    )
    assert json.loads(version.stdout)["gitVersion"] == "v1.36.3"

    # And nothing beyond the machine: the node's namespace (where pod traffic is routed) has no
    # route out. Asked of the routing table, so no packet is sent to find out.
    for outside in ("192.0.2.1", "1.1.1.1"):
        route = subprocess.run(
            node.in_netns(net, ["ip", "route", "get", outside]),
            capture_output=True,
            text=True,
            check=False,
        )
        assert route.returncode != 0 and "unreachable" in route.stderr, route


def _host_iptables() -> str:
    out = subprocess.run(["iptables-save"], capture_output=True, text=True, check=False).stdout
    # Counters and the generated-at comment change by themselves.
    return "\n".join(ln for ln in out.splitlines() if not ln.startswith(("#", ":")))


def test_second_sandbox_side_by_side_and_down_leaves_nothing(
    sandbox: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    state_dir = tmp_path_factory.mktemp("second")
    iptables_before = _host_iptables()
    comps = [launcher.CONTROLPLANE, *launcher.NODE_COMPONENTS]
    try:
        launcher.up(state_dir, comps)
        first, second = node.load_plan(sandbox.state_dir), node.load_plan(state_dir)
        assert first is not None and second is not None
        assert (first.netns, first.pod_cidr, first.service_cidr) != (
            second.netns,
            second.pod_cidr,
            second.service_cidr,
        )
        env = launcher.environment(state_dir)
        kubectl = [
            str(launcher.controlplane_bin_dir() / "kubectl"),
            "--kubeconfig",
            env["KUBECONFIG"],
        ]
        subprocess.run(
            [
                *kubectl,
                "run",
                "probe",
                f"--image={node.PROBE_IMAGE}",
                "--image-pull-policy=Never",
                "--",
                "serve",
                "8080",
            ],
            check=True,
            capture_output=True,
        )
        _wait_for(
            "the second sandbox's pod to run",
            lambda: (
                subprocess.run(
                    [*kubectl, "get", "pod", "probe", "-o", "jsonpath={.status.phase}"],
                    capture_output=True,
                    text=True,
                    check=False,
                ).stdout
                == "Running"
            ),
        )
        # It has what down must remove: a pod netns, mounts, a veth, IPAM state.
        assert leftovers(state_dir), "a running node should have something to clean up"
    finally:
        launcher.down(state_dir)
    assert leftovers(state_dir) == []
    assert _host_iptables() == iptables_before
    assert not any(launcher.inspect(state_dir, c).alive for c in comps)
    # The first sandbox's node is untouched.
    net = node.load_plan(sandbox.state_dir)
    assert net is not None and node.network_up(net)


def test_emulators_listen_on_the_node_link_for_pods(sandbox: Any) -> None:
    """What a pod dials (the host's end of the node's link), dialled from the host: the proxy
    tunnels Azure's host names to the Entra emulator and refuses the rest; the SQL emulator
    answers on the same port as on loopback, with a certificate for the server's public name.
    tests/images/test_on_node.py runs the whole story in a pod of the workload image."""
    import struct

    import pyodbc

    env = sandbox.env
    host = env["SANDBOX_NODE_HOST_ADDRESS"]
    proxy = env.get("SANDBOX_POD_HTTPS_PROXY")
    assert proxy is not None and proxy.startswith(f"http://{host}:"), env
    tenant = env["AZURE_TENANT_ID"]
    discovery = requests.get(
        f"https://login.microsoftonline.com/{tenant}/v2.0/.well-known/openid-configuration",
        proxies={"https": proxy},
        verify=str(sandbox.ca),
        timeout=10,
    )
    assert discovery.status_code == 200, discovery.text
    assert discovery.json()["issuer"] == f"https://login.microsoftonline.com/{tenant}/v2.0"
    with pytest.raises(requests.exceptions.ProxyError, match="403"):
        requests.get("https://example.com/", proxies={"https": proxy}, timeout=10)

    pod_server = env["SANDBOX_POD_AZ_SERVER"]
    name, port = pod_server.removeprefix("tcp:").split(",")
    assert (name, env["SANDBOX_POD_SQL_HOST"]) == ("sandbox-sql.database.windows.net",) * 2
    assert port == "1433"  # Azure SQL's: the node address is the sandbox's own
    token = requests.post(
        f"{env['SANDBOX_ENTRA_URL']}/{tenant}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": env["AZ_CLIENT_ID"],
            "client_secret": env["AZ_CLIENT_SECRET"],
            "scope": "https://database.windows.net/.default",
        },
        verify=str(sandbox.ca),
        timeout=10,
    ).json()["access_token"]
    raw = token.encode("utf-16-le")
    # No name resolution on the host for the public name: dial the address, check the name.
    connection = pyodbc.connect(
        "DRIVER={ODBC Driver 18 for SQL Server};"
        f"SERVER=tcp:{host},{port};DATABASE={env['AZ_DATABASE']};"
        f"Encrypt=yes;TrustServerCertificate=no;HostNameInCertificate={name}",
        attrs_before={1256: struct.pack(f"<I{len(raw)}s", len(raw), raw)},
        timeout=10,
    )
    try:
        (count,) = connection.execute("SELECT COUNT(*) FROM dbo.Customer").fetchone()
    finally:
        connection.close()
    assert count == 5
