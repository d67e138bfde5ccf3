"""The sandbox as a drop-in Azure: unmodified clients reach the emulators by environment alone.

The session fixture applies `python -m sandbox env` to this process, as a user's shell would
(`HTTPS_PROXY`, `NO_PROXY`, `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`). Nothing below passes an
authority, a base URL or a certificate to a client: they use Azure's default endpoints and the
sandbox proxy sends them to the Entra emulator.
"""

from __future__ import annotations

import time
import uuid

import jwt
import pytest
import requests
from azure.core.exceptions import ResourceNotFoundError
from azure.identity import ClientSecretCredential
from azure.identity.aio import ClientSecretCredential as AsyncClientSecretCredential
from azure.mgmt.msi import ManagedServiceIdentityClient
from kubernetes import client
from kubernetes.client.rest import should_bypass_proxies
from msgraph import GraphServiceClient
from msgraph.generated.models.federated_identity_credential import FederatedIdentityCredential

from sandbox.proxy import AZURE_HOSTS

TENANT = "8a1f3c2e-5b7d-4e90-a1c3-0f2e4d6b8a10"
OPERATOR_APP = "5e0c1d9a-7b3f-4c2e-9a1d-000000000001"
OPERATOR_SECRET = "sandbox-operator-secret"
CUSTOMER_API_APP = "5e0c1d9a-7b3f-4c2e-9a1d-000000000003"
CUSTOMER_API_OBJECT = "5e0c1d9a-7b3f-4c2e-9a1d-0000000000a3"
IDENTITY_RG = "sandbox-rg"
IDENTITY_NAME = "customer-api-identity"
AUDIENCE = "api://AzureADTokenExchange"


def test_client_secret_credential_with_default_authority(sandbox):
    sandbox.component("proxy")
    credential = ClientSecretCredential(
        sandbox.env["AZ_TENANT_ID"], sandbox.env["AZ_CLIENT_ID"], sandbox.env["AZ_CLIENT_SECRET"]
    )
    token = credential.get_token("https://database.windows.net/.default")
    claims = jwt.decode(token.token, options={"verify_signature": False})
    assert claims["appid"] == sandbox.env["AZ_CLIENT_ID"]
    assert claims["aud"].rstrip("/") == "https://database.windows.net"
    assert token.expires_on > time.time() + 3000


async def test_msgraph_with_default_base_url_creates_and_lists_credentials(sandbox):
    sandbox.component("proxy")
    credential = AsyncClientSecretCredential(TENANT, OPERATOR_APP, OPERATOR_SECRET)
    graph = GraphServiceClient(credential, scopes=["https://graph.microsoft.com/.default"])
    name = f"drop-in-{uuid.uuid4().hex[:8]}"
    creds = graph.applications.by_application_id(CUSTOMER_API_OBJECT).federated_identity_credentials
    try:
        created = await creds.post(
            FederatedIdentityCredential(
                name=name,
                issuer="https://issuer.example.test/drop-in",
                subject=f"system:serviceaccount:drop-in:{name}",
                audiences=[AUDIENCE],
            )
        )
        assert created is not None
        assert created.id
        listed = await creds.get()
        assert listed is not None
        assert name in {c.name for c in listed.value or []}
    finally:
        await creds.by_federated_identity_credential_id(name).delete()
        await credential.close()


def test_mgmt_msi_with_default_endpoint_writes_a_credential(sandbox):
    sandbox.component("proxy")
    credential = ClientSecretCredential(TENANT, OPERATOR_APP, OPERATOR_SECRET)
    msi = ManagedServiceIdentityClient(credential, sandbox.env["SANDBOX_SUBSCRIPTION_ID"])
    name = f"drop-in-{uuid.uuid4().hex[:8]}"
    written = msi.federated_identity_credentials.create_or_update(
        IDENTITY_RG,
        IDENTITY_NAME,
        name,
        {
            "properties": {
                "issuer": "https://issuer.example.test/drop-in",
                "subject": f"system:serviceaccount:drop-in:{name}",
                "audiences": [AUDIENCE],
            }
        },
    )
    assert written.name == name
    assert msi.federated_identity_credentials.get(
        IDENTITY_RG, IDENTITY_NAME, name
    ).subject.endswith(name)
    msi.federated_identity_credentials.delete(IDENTITY_RG, IDENTITY_NAME, name)
    with pytest.raises(ResourceNotFoundError):
        msi.federated_identity_credentials.get(IDENTITY_RG, IDENTITY_NAME, name)


async def test_raw_token_post_exchanges_a_service_account_token(sandbox, kube, namespace):
    """The seed's Step 6: a form POST to the default token URL with a cluster token."""
    sandbox.component("proxy")
    sa = "drop-in-reader"
    core = client.CoreV1Api(kube)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=sa))
    )
    credential = AsyncClientSecretCredential(TENANT, OPERATOR_APP, OPERATOR_SECRET)
    graph = GraphServiceClient(credential, scopes=["https://graph.microsoft.com/.default"])
    creds = graph.applications.by_application_id(CUSTOMER_API_OBJECT).federated_identity_credentials
    name = f"drop-in-{namespace}"
    await creds.post(
        FederatedIdentityCredential(
            name=name,
            issuer=sandbox.issuer,
            subject=f"system:serviceaccount:{namespace}:{sa}",
            audiences=[AUDIENCE],
        )
    )
    try:
        sa_token = core.create_namespaced_service_account_token(
            sa,
            namespace,
            client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(audiences=[AUDIENCE], expiration_seconds=3600)
            ),
        ).status.token
        response = requests.post(
            f"https://login.microsoftonline.com:443/{TENANT}/oauth2/v2.0/token",
            data={
                "scope": "https://database.windows.net/.default",
                "client_id": CUSTOMER_API_APP,
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": sa_token,
                "grant_type": "client_credentials",
            },
            timeout=30,
        )
        assert response.status_code == 200, response.text
        access = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
        assert access["appid"] == CUSTOMER_API_APP
        assert access["tid"] == TENANT
    finally:
        await creds.by_federated_identity_credential_id(name).delete()
        await credential.close()


def test_any_other_host_fails_fast_with_the_proxy_message(sandbox):
    sandbox.component("proxy")
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ProxyError) as refused:
        requests.get("https://example.com/", timeout=10)
    assert time.monotonic() - started < 5
    assert "403" in str(refused.value)
    # The body names what the sandbox serves; read it straight from the proxy.
    proxy_url = sandbox.env["HTTPS_PROXY"]
    body = requests.get("http://example.com/", proxies={"http": proxy_url}, timeout=10)
    assert body.status_code == 403
    for host in AZURE_HOSTS:
        assert host in body.text


def test_kubernetes_client_is_not_proxied(sandbox, kube):
    """HTTPS_PROXY is set in this process; the API server on loopback is still reached directly."""
    assert sandbox.env["HTTPS_PROXY"]
    assert "127.0.0.1" in sandbox.env["NO_PROXY"]
    # The client picks the proxy up from the environment, and NO_PROXY makes it go around it.
    assert should_bypass_proxies(kube.configuration.host, kube.configuration.no_proxy or "")
    assert client.CoreV1Api(kube).read_namespace("default").metadata.name == "default"
