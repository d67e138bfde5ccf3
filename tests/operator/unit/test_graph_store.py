"""GraphCredentialStore over msgraph-sdk, with Graph played by an httpx mock transport.

Found by bench/onboarding.py: concurrent lookups of different app ids must each get their own
application (msgraph's root client shares one path-parameter dict with the builder that takes
the app id), and concurrent lookups of one app id share one request.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter

import httpx
import pytest
from kiota_abstractions.authentication import AuthenticationProvider
from kiota_abstractions.request_information import RequestInformation
from msgraph.graph_request_adapter import GraphRequestAdapter
from msgraph.graph_service_client import GraphServiceClient
from swi_operator.cloud import CallGate, FederatedCredential, ResolvedIdentity
from swi_operator.cloud.graph import GraphCredentialStore
from swi_operator.errors import PermanentError, Reason
from swi_operator.spec import ApplicationRef

BASE = "https://graph.test/v1.0"
TENANT = "8a1f3c2e-5b7d-4e90-a1c3-0f2e4d6b8a10"
APP_IDS = [f"5e0c1d9a-7b3f-4c2e-9a1d-00000000010{i}" for i in range(6)]
_BY_APP_ID = re.compile(r"/applications\(appId='([^']+)'\)$")


class YieldingAuth(AuthenticationProvider):
    """Like azure-identity's provider, it awaits before the request's URL is built."""

    async def authenticate_request(
        self, request: RequestInformation, additional_authentication_context: object = None
    ) -> None:
        await asyncio.sleep(0.001)
        request.headers.add("Authorization", "Bearer test")


class FakeGraph:
    """Answers application lookups (slowly, so that requests overlap) and credential calls."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.credentials: dict[str, dict[str, object]] = {}

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.requests[f"{request.method} {path}"] += 1
        await asyncio.sleep(0.01)
        found = _BY_APP_ID.search(path)
        if found:
            app_id = found.group(1)
            if app_id not in APP_IDS:
                return httpx.Response(
                    404, json={"error": {"code": "Request_ResourceNotFound", "message": "gone"}}
                )
            return httpx.Response(
                200, json={"id": f"object-of-{app_id}", "appId": app_id, "displayName": app_id}
            )
        if request.method == "PATCH":
            body = json.loads(request.content)
            created = body["name"] not in self.credentials
            self.credentials[body["name"]] = {**body, "id": f"id-{body['name']}"}
            return (
                httpx.Response(201, json=self.credentials[body["name"]])
                if created
                else (httpx.Response(204))
            )
        if request.method == "GET" and path.endswith("/federatedIdentityCredentials"):
            return httpx.Response(200, json={"value": list(self.credentials.values())})
        return httpx.Response(404, json={"error": {"code": "NotFound", "message": path}})


@pytest.fixture
def graph() -> FakeGraph:
    return FakeGraph()


@pytest.fixture
def store(graph: FakeGraph) -> GraphCredentialStore:
    http = httpx.AsyncClient(transport=httpx.MockTransport(graph), base_url=BASE)
    adapter = GraphRequestAdapter(YieldingAuth(), client=http)
    adapter.base_url = BASE
    return GraphCredentialStore(
        GraphServiceClient(request_adapter=adapter), CallGate("Microsoft Graph", 8), TENANT
    )


async def test_concurrent_lookups_of_different_apps_each_get_their_own(store, graph):
    refs = [ApplicationRef(client_id=app_id) for app_id in APP_IDS * 3]
    resolved = await asyncio.gather(*(store.resolve(ref) for ref in refs))
    assert [r.object_id for r in resolved] == [f"object-of-{r.client_id}" for r in refs]
    # one request per app id, however many reconciles asked at once
    lookups = {k: n for k, n in graph.requests.items() if "appId=" in k}
    assert sorted(lookups.values()) == [1] * len(APP_IDS)


async def test_a_failed_lookup_reaches_every_waiter_and_is_tried_again_later(store, graph):
    ref = ApplicationRef(client_id="5e0c1d9a-7b3f-4c2e-9a1d-0000000009ff")
    results = await asyncio.gather(store.resolve(ref), store.resolve(ref), return_exceptions=True)
    assert all(isinstance(r, PermanentError) for r in results)
    assert all(r.reason is Reason.IDENTITY_NOT_FOUND for r in results)  # type: ignore[union-attr]
    with pytest.raises(PermanentError):
        await store.resolve(ref)
    assert sum(graph.requests.values()) == 2


async def test_credentials_are_read_and_written_as_plain_json(store, graph):
    identity = ResolvedIdentity(
        ApplicationRef(client_id=APP_IDS[0]), APP_IDS[0], TENANT, "app", "object-1"
    )
    wanted = FederatedCredential(
        "swi-ns_sa-12345678", "https://issuer", "system:serviceaccount:ns:sa", ("aud",), "ours"
    )
    created = await store.upsert(identity, wanted)
    assert created.id == "id-swi-ns_sa-12345678"
    updated = await store.upsert(identity, wanted)  # 204: nothing returned, the id is kept
    assert updated == wanted
    assert await store.list(identity) == [
        FederatedCredential(
            "swi-ns_sa-12345678",
            "https://issuer",
            "system:serviceaccount:ns:sa",
            ("aud",),
            "ours",
            "id-swi-ns_sa-12345678",
        )
    ]
