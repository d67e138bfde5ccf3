"""App registrations the operator creates for a growing identity pool (``pool.py``), via Graph.

``Application.ReadWrite.OwnedBy`` lets an app create applications, and Graph makes the caller the
owner of what it creates, so the operator may then write their federated credentials like those
of any app it owns; a service principal is created with each (the token exchange and the database
login need one). A member is named ``<prefix>-<n>``; before creating one the operator looks for an
app of that name among those it can read (with ``OwnedBy``: those it owns), so a create whose
answer was lost, a restart between the create and the pool's status write, or another cluster's
operator (the same app) that grew the same pool first, adopts the app rather than making a second.

Two clusters growing one pool at the same moment can both create ``<prefix>-<n>``. Graph allows
duplicate display names, so after a create the operator looks again: of the apps of that name,
the oldest (``createdDateTime``, then ``appId``) is the member, and a younger one this operator
just made (no credential on it yet) is deleted. Both operators decide the same way; only two
creates that Graph's replicas have not yet shown each other can still leave two members of one
name, and both then serve (each cluster's pool status lists its own).
"""

from __future__ import annotations

import json
from typing import Any

from kiota_abstractions.base_request_configuration import RequestConfiguration
from kiota_abstractions.request_information import RequestInformation
from msgraph.generated.applications.applications_request_builder import (
    ApplicationsRequestBuilder,
)
from msgraph.generated.models.application import Application
from msgraph.generated.models.o_data_errors.o_data_error import ODataError
from msgraph.generated.models.service_principal import ServicePrincipal
from msgraph.graph_service_client import GraphServiceClient

from swi_operator.cloud import CallGate
from swi_operator.errors import PermanentError, Reason, TransientError

_ERRORS: dict[str, Any] = {"XXX": ODataError}
_Query = ApplicationsRequestBuilder.ApplicationsRequestBuilderGetQueryParameters


class GraphApplications:
    def __init__(self, client: GraphServiceClient, gate: CallGate) -> None:
        self._client = client
        self._gate = gate

    async def _json(self, request: RequestInformation) -> Any:
        adapter = self._client.request_adapter
        raw = await adapter.send_primitive_async(request, "bytes", _ERRORS)  # type: ignore[func-returns-value]
        return json.loads(raw) if raw else None

    async def find(self, display_name: str) -> str | None:
        """The client id of the oldest app named ``display_name`` the operator can read."""
        found = await self._named(display_name)
        return str(found[0]["appId"]) if found else None

    async def _named(self, display_name: str) -> list[dict[str, Any]]:
        """The apps named ``display_name`` the operator can read, oldest first."""
        quoted = display_name.replace("'", "''")
        query = _Query(
            filter=f"displayName eq '{quoted}'",
            select=["id", "appId", "displayName", "createdDateTime"],
        )
        request = self._client.applications.to_get_request_information(
            RequestConfiguration(query_parameters=query)
        )
        found = await self._gate.call(
            f"look for application {display_name}", lambda: self._json(request)
        )
        values = [v for v in (found or {}).get("value") or [] if v.get("appId")]
        # Seeded or older apps without a creation time sort first: they were there before.
        return sorted(values, key=lambda v: (str(v.get("createdDateTime") or ""), str(v["appId"])))

    async def ensure(self, display_name: str) -> str:
        """The client id of app ``display_name`` with its service principal: adopted, or made."""
        client_id = await self.find(display_name)
        if client_id is None:
            client_id = await self._create(display_name)
        principal = self._client.service_principals.to_post_request_information(
            ServicePrincipal(app_id=client_id)
        )

        async def create_principal() -> None:
            try:
                await self._json(principal)
            except ODataError as exc:
                if exc.response_status_code != 409:  # it has one already: adopted
                    raise

        try:
            await self._gate.call(
                f"create the service principal of application {display_name}",
                create_principal,
                write=True,
            )
        except PermanentError as err:
            if "does not reference a valid application" in err.message:
                # Graph's replicas have not all seen the new app yet: the next pass adopts it.
                raise TransientError(
                    Reason.PROPAGATING,
                    f"application {display_name} ({client_id}) was created; Graph does not "
                    "show it everywhere yet",
                ) from err
            raise
        return client_id

    async def _create(self, display_name: str) -> str:
        """A new app ``display_name``, unless another of that name is older (module doc)."""
        request = self._client.applications.to_post_request_information(
            Application(display_name=display_name)
        )
        made = await self._gate.call(
            f"create application {display_name}", lambda: self._json(request), write=True
        )
        mine = str(made["appId"])
        named = await self._named(display_name)
        keeper = str(named[0]["appId"]) if named else mine
        if keeper.lower() == mine.lower():
            return mine
        removal = self._client.applications.by_application_id(str(made["id"]))
        await self._gate.call(
            f"delete application {display_name} ({mine}), a younger duplicate of {keeper}",
            removal.delete,
            write=True,
        )
        return keeper
