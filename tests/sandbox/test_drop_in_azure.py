"""The sandbox as a drop-in Azure: unmodified clients reach the emulators by environment alone.

Each client below runs in its own Python process whose environment is exactly what
`eval "$(python -m sandbox env)"` gives a shell (`HTTPS_PROXY`, `NO_PROXY`, `SSL_CERT_FILE`,
`REQUESTS_CA_BUNDLE`), minus `AZURE_AUTHORITY_HOST`, so that every client uses Azure's default
endpoints. No client is given an authority, a base URL or a certificate: the sandbox proxy sends
them to the Entra emulator. (A fresh process also matters because aiohttp reads `SSL_CERT_FILE`
when it is first imported.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import jwt
import pytest
import requests
from kubernetes import client
from kubernetes.client.rest import should_bypass_proxies

from sandbox.proxy import AZURE_HOSTS

TENANT = "8a1f3c2e-5b7d-4e90-a1c3-0f2e4d6b8a10"
OPERATOR_APP = "5e0c1d9a-7b3f-4c2e-9a1d-000000000001"
OPERATOR_SECRET = "sandbox-operator-secret"
CUSTOMER_API_APP = "5e0c1d9a-7b3f-4c2e-9a1d-000000000003"
CUSTOMER_API_OBJECT = "5e0c1d9a-7b3f-4c2e-9a1d-0000000000a3"
AUDIENCE = "api://AzureADTokenExchange"


def _client(sandbox, code: str, *args: str, **extra_env: str) -> dict:
    """Run ``code`` (which prints one JSON line) as a separate, unmodified client program."""
    sandbox.component("proxy")
    env = {**os.environ, **sandbox.env, **extra_env}
    env.pop("AZURE_AUTHORITY_HOST", None)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_client_secret_credential_with_default_authority(sandbox):
    out = _client(
        sandbox,
        """
        import json, os
        from azure.identity import ClientSecretCredential
        credential = ClientSecretCredential(
            os.environ["AZ_TENANT_ID"], os.environ["AZ_CLIENT_ID"], os.environ["AZ_CLIENT_SECRET"]
        )
        token = credential.get_token("https://database.windows.net/.default")
        print(json.dumps({"token": token.token, "expires_on": token.expires_on}))
        """,
    )
    claims = jwt.decode(out["token"], options={"verify_signature": False})
    assert claims["appid"] == sandbox.env["AZ_CLIENT_ID"]
    assert claims["aud"].rstrip("/") == "https://database.windows.net"
    assert out["expires_on"] > time.time() + 3000


GRAPH_CLIENT = """
import asyncio, json, sys
from azure.identity.aio import ClientSecretCredential
from msgraph import GraphServiceClient
from msgraph.generated.models.federated_identity_credential import FederatedIdentityCredential

async def main(tenant, client_id, secret, app_object, name, issuer, subject, delete_after):
    credential = ClientSecretCredential(tenant, client_id, secret)
    graph = GraphServiceClient(credential, scopes=["https://graph.microsoft.com/.default"])
    creds = graph.applications.by_application_id(app_object).federated_identity_credentials
    created = await creds.post(FederatedIdentityCredential(
        name=name, issuer=issuer, subject=subject, audiences=["api://AzureADTokenExchange"]))
    listed = await creds.get()
    if delete_after == "yes":
        await creds.by_federated_identity_credential_id(name).delete()
    await credential.close()
    print(json.dumps({"id": created.id, "listed": [c.name for c in listed.value]}))

asyncio.run(main(*sys.argv[1:]))
"""


def _graph_client(sandbox, name: str, issuer: str, subject: str, delete_after: bool) -> dict:
    return _client(
        sandbox,
        GRAPH_CLIENT,
        *(TENANT, OPERATOR_APP, OPERATOR_SECRET, CUSTOMER_API_OBJECT, name, issuer, subject),
        "yes" if delete_after else "no",
    )


def test_msgraph_with_default_base_url_creates_and_lists_credentials(sandbox, admin_graph):
    name = f"drop-in-{uuid.uuid4().hex[:8]}"
    out = _graph_client(
        sandbox,
        name,
        "https://issuer.example.test/drop-in",
        f"system:serviceaccount:drop-in:{name}",
        delete_after=True,
    )
    assert out["id"]
    assert name in out["listed"]
    # It really reached the emulator: the credential existed there and is gone again.
    gone = admin_graph(
        "GET", f"/applications/{CUSTOMER_API_OBJECT}/federatedIdentityCredentials(name='{name}')"
    )
    assert gone.status_code == 404


def test_mgmt_msi_with_default_endpoint_writes_a_credential(sandbox):
    name = f"drop-in-{uuid.uuid4().hex[:8]}"
    out = _client(
        sandbox,
        f"""
        import json, os
        from azure.core.exceptions import ResourceNotFoundError
        from azure.identity import ClientSecretCredential
        from azure.mgmt.msi import ManagedServiceIdentityClient
        credential = ClientSecretCredential("{TENANT}", "{OPERATOR_APP}", "{OPERATOR_SECRET}")
        msi = ManagedServiceIdentityClient(credential, os.environ["SANDBOX_SUBSCRIPTION_ID"])
        fics = msi.federated_identity_credentials
        body = {{"properties": {{"issuer": "https://issuer.example.test/drop-in",
                 "subject": "system:serviceaccount:drop-in:{name}",
                 "audiences": ["{AUDIENCE}"]}}}}
        written = fics.create_or_update("sandbox-rg", "customer-api-identity", "{name}", body)
        read = fics.get("sandbox-rg", "customer-api-identity", "{name}")
        fics.delete("sandbox-rg", "customer-api-identity", "{name}")
        try:
            fics.get("sandbox-rg", "customer-api-identity", "{name}")
            gone = False
        except ResourceNotFoundError:
            gone = True
        print(json.dumps({{"written": written.name, "subject": read.subject, "gone": gone}}))
        """,
    )
    assert out == {
        "written": name,
        "subject": f"system:serviceaccount:drop-in:{name}",
        "gone": True,
    }


def test_raw_token_post_exchanges_a_service_account_token(sandbox, kube, namespace, admin_graph):
    """The seed's Step 6: a form POST to the default token URL with a cluster token."""
    sa = "drop-in-reader"
    core = client.CoreV1Api(kube)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=sa))
    )
    name = f"drop-in-{namespace}"
    _graph_client(
        sandbox,
        name,
        sandbox.issuer,
        f"system:serviceaccount:{namespace}:{sa}",
        delete_after=False,
    )
    try:
        sa_token = core.create_namespaced_service_account_token(
            sa,
            namespace,
            client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(audiences=[AUDIENCE], expiration_seconds=3600)
            ),
        ).status.token
        out = _client(
            sandbox,
            f"""
            import json, os, requests
            response = requests.post(
                "https://login.microsoftonline.com:443/{TENANT}/oauth2/v2.0/token",
                data={{
                    "scope": "https://database.windows.net/.default",
                    "client_id": "{CUSTOMER_API_APP}",
                    "client_assertion_type":
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    "client_assertion": os.environ["SA_TOKEN"],
                    "grant_type": "client_credentials",
                }},
                timeout=30,
            )
            print(json.dumps({{"status": response.status_code, "body": response.json()}}))
            """,
            SA_TOKEN=sa_token,
        )
        assert out["status"] == 200, out["body"]
        access = jwt.decode(out["body"]["access_token"], options={"verify_signature": False})
        assert access["appid"] == CUSTOMER_API_APP
        assert access["tid"] == TENANT
    finally:
        admin_graph(
            "DELETE",
            f"/applications/{CUSTOMER_API_OBJECT}/federatedIdentityCredentials(name='{name}')",
        )


def test_any_other_host_fails_fast_with_the_proxy_message(sandbox):
    sandbox.component("proxy")
    proxies = {"https": sandbox.env["HTTPS_PROXY"], "http": sandbox.env["HTTPS_PROXY"]}
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ProxyError) as refused:
        requests.get("https://example.com/", proxies=proxies, timeout=10)
    assert time.monotonic() - started < 5
    assert "403" in str(refused.value)
    # The body names what the sandbox serves; read it straight from the proxy.
    body = requests.get("http://example.com/", proxies=proxies, timeout=10)
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
