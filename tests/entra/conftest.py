"""Fixtures for the Entra emulator tests: the emulator as a real subprocess, and an OIDC issuer.

``entra`` starts ``python -m sandbox.entra serve`` once per session in a temporary state
directory, exactly as the launcher does (READY line, ``entra.json``). Tests trust its CA
explicitly (``connection_verify=``, ``EntraService.http``) rather than through
``REQUESTS_CA_BUNDLE``, because the shared ``sandbox`` fixture points that variable at its own CA
for the rest of the session. Every test starts from the world seed with no injected faults
(``reset_emulator`` is autouse). ``issuer`` is a small HTTPS OIDC issuer on loopback (its own RSA
keys, certificate from the sandbox CA) that plays a cluster's issuer for the fast jwt-bearer
tests; test_controlplane_federation.py uses the real control plane's issuer. ``graph_as(app)``
is msgraph-sdk signed in as one of the world's apps, pointed at the emulator the documented way
(a ``GraphClientFactory`` httpx client whose ``base_url`` is the emulator's ``/v1.0``, explicit
scopes, an async azure-identity credential; nothing in the SDK is patched).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack

import httpx
import pytest
from azure.identity.aio import ClientSecretCredential
from entra_harness import (
    WORLD_FILE,
    EntraService,
    GraphFactory,
    OidcIssuer,
    start_emulator,
    stop_emulator,
)
from kiota_authentication_azure.azure_identity_authentication_provider import (
    AzureIdentityAuthenticationProvider,
)
from msgraph.graph_request_adapter import GraphRequestAdapter
from msgraph.graph_service_client import GraphServiceClient
from msgraph_core import GraphClientFactory  # type: ignore[import-untyped]


@pytest.fixture(scope="session")
def entra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EntraService]:
    state_dir = tmp_path_factory.mktemp("entra")
    process, _ = start_emulator(state_dir, "--world", str(WORLD_FILE), "--port", "0")
    service = EntraService.attach(state_dir, process)
    try:
        yield service
    finally:
        assert stop_emulator(process) == 0


@pytest.fixture(autouse=True)
def reset_emulator(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("controlplane") is None:  # those use the sandbox's own
        entra: EntraService = request.getfixturevalue("entra")
        entra.admin.reset()


@pytest.fixture(scope="session")
def issuer(entra: EntraService) -> Iterator[OidcIssuer]:
    with OidcIssuer.start(entra.state_dir) as running:
        yield running


@pytest.fixture
def fresh_issuer(issuer: OidcIssuer) -> OidcIssuer:
    """The issuer with its published keys as at start (undoes key rotation and outages)."""
    issuer.restore()
    return issuer


@pytest.fixture
async def graph_as(entra: EntraService) -> AsyncIterator[GraphFactory]:
    """``graph_as(app_name)`` -> a GraphServiceClient signed in as that app (closed afterwards)."""
    async with AsyncExitStack() as stack:

        def build(app: str) -> GraphServiceClient:
            principal = entra.principal(app)
            credential = ClientSecretCredential(
                entra.tenant_id,
                principal.client_id,
                principal.secrets[0],
                authority=entra.url,
                disable_instance_discovery=True,
                connection_verify=str(entra.ca),
            )
            stack.push_async_callback(credential.close)
            http = httpx.AsyncClient(
                base_url=entra.graph_url, verify=ssl.create_default_context(cafile=str(entra.ca))
            )
            stack.push_async_callback(http.aclose)
            auth = AzureIdentityAuthenticationProvider(
                credential, scopes=["https://graph.microsoft.com/.default"]
            )
            adapter = GraphRequestAdapter(
                auth, GraphClientFactory.create_with_default_middleware(client=http)
            )
            return GraphServiceClient(request_adapter=adapter)

        yield build
