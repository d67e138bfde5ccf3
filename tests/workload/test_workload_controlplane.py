"""The whole chain with a real Kubernetes TokenRequest: cluster token -> Entra -> TDS -> rows.

Uses the shared ``sandbox`` fixture (control plane + Entra + proxy + SQL, tests/conftest.py): a
service account's projected-token equivalent (TokenRequest, audience api://AzureADTokenExchange)
is exchanged by ``python -m swi_workload`` through WorkloadIdentityCredential, after a federated
credential for that service account was created through Graph, as the operator would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlbox import DEMO, EXCHANGE_AUDIENCE, SqlBox, federate, run_workload

pytestmark = pytest.mark.controlplane

SERVICE_ACCOUNT = "workload-demo-service-account"


@pytest.fixture
def pod_token(sandbox: Any, kube: Any, namespace: str, tmp_path: Path) -> Path:
    """A TokenRequest token for a service account annotated with the demo app's client id."""
    from kubernetes import client

    core = client.CoreV1Api(kube)
    core.create_namespaced_service_account(
        namespace,
        client.V1ServiceAccount(
            metadata=client.V1ObjectMeta(
                name=SERVICE_ACCOUNT, annotations={"azure.workload.identity/client-id": DEMO.app_id}
            )
        ),
    )
    token = core.create_namespaced_service_account_token(
        SERVICE_ACCOUNT,
        namespace,
        client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[EXCHANGE_AUDIENCE], expiration_seconds=3600)
        ),
    )
    assert token.status is not None and token.status.token
    path = tmp_path / "azure-identity-token"
    path.write_text(token.status.token)
    return path


@pytest.fixture
def box(sandbox: Any) -> SqlBox:
    return SqlBox(sandbox.state_dir, dict(sandbox.env))


def test_token_request_token_reads_the_five_customers(
    box: SqlBox, sandbox: Any, namespace: str, pod_token: Path
) -> None:
    subject = f"system:serviceaccount:{namespace}:{SERVICE_ACCOUNT}"
    credential_id = federate(box, DEMO, sandbox.issuer, subject)
    env = {
        "AZURE_CLIENT_ID": DEMO.app_id,
        "AZURE_FEDERATED_TOKEN_FILE": str(pod_token),
        "AZ_CLIENT_SECRET": "",
    }
    try:
        for extra in ((), ("--encrypt", "strict")):
            done = run_workload(box, *extra, **env)
            assert done.returncode == 0, done.stderr
            assert [line.split()[0] for line in done.stdout.splitlines()[2:7]] == [
                "1",
                "2",
                "3",
                "4",
                "5",
            ]
    finally:
        box.graph(
            "DELETE", f"applications/{DEMO.object_id}/federatedIdentityCredentials/{credential_id}"
        )


def test_token_request_token_without_a_federated_credential_exit_4(
    box: SqlBox, sandbox: Any, namespace: str, pod_token: Path
) -> None:
    done = run_workload(
        box,
        AZURE_CLIENT_ID=DEMO.app_id,
        AZURE_FEDERATED_TOKEN_FILE=str(pod_token),
        AZ_CLIENT_SECRET="",
    )
    assert done.returncode == 4, done.stderr
    assert f"issuer '{sandbox.issuer}'" in done.stderr
    assert f"service account '{SERVICE_ACCOUNT}' in namespace '{namespace}'" in done.stderr
