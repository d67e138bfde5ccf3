"""Workload identity federation end to end with the sandbox's real Kubernetes issuer.

A TokenRequest token from the control plane is exchanged at the emulator (started by the
launcher, like everything in the shared ``sandbox`` fixture), which fetches the API server's
discovery document and JWKS anonymously over HTTPS, as Entra does with an AKS issuer.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import WorkloadIdentityCredential
from entra_harness import WORLD_FILE

from sandbox.entra.state import load_world

pytestmark = pytest.mark.controlplane

AUDIENCE = "api://AzureADTokenExchange"
APP = "customer-api"


@pytest.fixture
def federated_app(sandbox: Any, namespace: str, admin_graph: Any) -> Iterator[tuple[str, str]]:
    """customer-api federated with ``system:serviceaccount:<ns>:customer-reader`` at the issuer."""
    app = next(p for p in load_world(WORLD_FILE).principals if p.name == APP)
    name = f"test-{uuid.uuid4().hex[:12]}"
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
        yield app.client_id, app.sp_object_id
    finally:
        admin_graph("DELETE", f"{path}(name='{name}')")


def _service_account_token(kube: Any, namespace: str, audience: str) -> str:
    from kubernetes import client

    core = client.CoreV1Api(kube)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="customer-reader"))
    )
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[audience], expiration_seconds=3600)
    )
    status = core.create_namespaced_service_account_token(
        "customer-reader", namespace, request
    ).status
    assert status is not None and status.token
    return str(status.token)


def test_token_request_token_is_exchanged(
    sandbox: Any, kube: Any, namespace: str, federated_app: tuple[str, str], tmp_path: Path
) -> None:
    client_id, object_id = federated_app
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text(_service_account_token(kube, namespace, AUDIENCE))
    credential = WorkloadIdentityCredential(
        tenant_id=os.environ["AZURE_TENANT_ID"],
        client_id=client_id,
        token_file_path=str(token_file),
    )
    access = credential.get_token("https://database.windows.net/.default").token
    claims = jwt.decode(access, options={"verify_signature": False})
    assert (claims["oid"], claims["aud"]) == (object_id, "https://database.windows.net/")


def test_wrong_audience_is_700212(
    sandbox: Any, kube: Any, namespace: str, federated_app: tuple[str, str], tmp_path: Path
) -> None:
    client_id, _ = federated_app
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text(_service_account_token(kube, namespace, "api://not-entra"))
    credential = WorkloadIdentityCredential(
        tenant_id=os.environ["AZURE_TENANT_ID"],
        client_id=client_id,
        token_file_path=str(token_file),
    )
    with pytest.raises(ClientAuthenticationError, match="AADSTS700212:"):
        credential.get_token("https://database.windows.net/.default")
