"""The injection webhook as the operator runs it: a separate ``kopf run`` process.

``webhook_process`` starts ``kopf run --standalone -A -m swi_operator.webhooks`` with the given
settings (environment) and kubeconfig, waits until it has pointed the installed
MutatingWebhookConfiguration at itself and answers, and stops it afterwards. A process of its own
keeps kopf's global handler registry out of this test process (other suites run their own
operators in it).
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from deploy_harness import (  # type: ignore[import-not-found]
    CONFIGURATION,
    WORKLOAD_CONFIGURATION,
    wait_for,
)

from sandbox.demo import SEED_QUERY

KOPF_WEBHOOK_ONLY = [
    "-m",
    "kopf",
    "run",
    "--standalone",
    "--all-namespaces",
    "-m",
    "swi_operator.webhooks",
]


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def configuration_client_config(kube: Any) -> dict[str, Any]:
    from kubernetes import client

    admission: Any = client.AdmissionregistrationV1Api(kube)
    mwc = admission.read_mutating_webhook_configuration(CONFIGURATION)
    config: dict[str, Any] = mwc.webhooks[0].client_config.to_dict()
    return config


def dry_run_injected(kube: Any, namespace: str, service_account: str) -> bool:
    """Whether a labelled pod, created with dryRun, comes back with the injection."""
    from kubernetes import client

    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(
            generate_name="probe-", labels={"azure.workload.identity/use": "true"}
        ),
        spec=client.V1PodSpec(
            service_account_name=service_account,
            containers=[client.V1Container(name="app", image="app:1")],
        ),
    )
    try:
        core: Any = client.CoreV1Api(kube)
        created = core.create_namespaced_pod(namespace, pod, dry_run="All")
    except client.ApiException:
        return False
    return any(e.name == "AZURE_FEDERATED_TOKEN_FILE" for e in created.spec.containers[0].env or [])


@contextlib.contextmanager
def webhook_process(
    kube: Any,
    kubeconfig: str | Path,
    log_path: Path,
    env: Mapping[str, str],
    probe: tuple[str, str],
    argv: list[str] | None = None,
) -> Iterator[int]:
    """Run the webhook; yield its port once a dry-run pod in ``probe`` (ns, SA) is injected.

    ``argv`` (default: the webhook alone under ``kopf run``) may start the whole operator.
    """
    port = free_port()
    full_env = dict(os.environ)
    full_env.update(
        {
            "KUBECONFIG": str(kubeconfig),
            "SWI_WEBHOOK_ADDR": "127.0.0.1",
            "SWI_WEBHOOK_PORT": str(port),
            "SWI_WEBHOOK_URL_HOST": "localhost",
        }
    )
    full_env.update(env)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv or [sys.executable, *KOPF_WEBHOOK_ONLY],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"https://localhost:{port}/inject-workload-identity"

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the webhook exited:\n{log_path.read_text()[-3000:]}")
            return configuration_client_config(kube).get("url") == url and dry_run_injected(
                kube, *probe
            )

        try:
            wait_for("the webhook to serve", ready, timeout=60)
        except AssertionError:
            print(log_path.read_text()[-3000:])
            raise
        yield port
    finally:
        from kubernetes import client

        admission: Any = client.AdmissionregistrationV1Api(kube)
        for configuration in (CONFIGURATION, WORKLOAD_CONFIGURATION):
            with contextlib.suppress(client.ApiException):  # no webhook left pointing at nothing
                admission.delete_mutating_webhook_configuration(configuration)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def ca_bundle(kube: Any) -> bytes:
    return base64.b64decode(configuration_client_config(kube)["ca_bundle"])


CUSTOMERS = ["John", "Jane", "Alice", "Bob", "Emily"]


def run_workload_of(kube: Any, pod: Any, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Do the kubelet's part for ``pod`` and run the workload with its injected environment.

    Checks the injected volume and mount on the way; the token is a TokenRequest for the volume's
    service account, audience and lifetime, bound to the pod, written where the injected
    AZURE_FEDERATED_TOKEN_FILE points once the mount path is rebased into ``tmp_path``.
    """
    from kubernetes import client

    container = pod.spec.containers[0]
    env = {e.name: e.value for e in container.env}
    mount = next(m for m in container.volume_mounts if m.mount_path == "/var/run/secrets/azure/wi")
    assert mount.read_only
    volume = next(v for v in pod.spec.volumes if v.name == mount.name)
    assert volume.name.startswith("azure-workload-identity-reserved-")
    source = volume.projected.sources[0].service_account_token
    assert (source.audience, source.expiration_seconds) == ("api://AzureADTokenExchange", 3600)
    assert env["AZURE_FEDERATED_TOKEN_FILE"] == f"{mount.mount_path}/{source.path}"

    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(
            audiences=[source.audience],
            expiration_seconds=source.expiration_seconds,
            bound_object_ref=client.V1BoundObjectReference(
                kind="Pod", api_version="v1", name=pod.metadata.name, uid=pod.metadata.uid
            ),
        )
    )
    core: Any = client.CoreV1Api(kube)
    token = core.create_namespaced_service_account_token(
        pod.spec.service_account_name, pod.metadata.namespace, request
    )
    local_file = tmp_path / source.path
    local_file.parent.mkdir(parents=True, exist_ok=True)
    local_file.write_text(token.status.token)

    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("AZ_", "AZURE_"))}
    run_env.update(env)
    run_env["AZURE_FEDERATED_TOKEN_FILE"] = str(local_file)
    run_env.setdefault("AZ_QUERY", SEED_QUERY)
    return subprocess.run(
        [sys.executable, "-m", "swi_workload"],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
