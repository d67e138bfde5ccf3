"""App registrations the operator creates for a growing identity pool (``pool.py``), via Graph.

``Application.ReadWrite.OwnedBy`` lets an app create applications, and Graph makes the caller the
owner of what it creates, so the operator may then write their federated credentials like those
of any app it owns; a service principal is created with each (the token exchange and the database
login need one). A member is named ``<prefix>-<n>``; before creating one the operator looks for an
app of that name among those it can read (with ``OwnedBy``: those it owns), so a create whose
answer was lost, or a restart between the create and the pool's status write, adopts the app
rather than making a second.
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
        """The client id of the app named ``display_name`` the operator can read, if any."""
        quoted = display_name.replace("'", "''")
        query = _Query(filter=f"displayName eq '{quoted}'", select=["id", "appId", "displayName"])
        request = self._client.applications.to_get_request_information(
            RequestConfiguration(query_parameters=query)
        )
        found = await self._gate.call(
            f"look for application {display_name}", lambda: self._json(request)
        )
        values = (found or {}).get("value") or []
        return str(values[0]["appId"]) if values else None

    async def ensure(self, display_name: str) -> str:
        """The client id of app ``display_name`` with its service principal: adopted, or made."""
        client_id = await self.find(display_name)
        if client_id is None:
            request = self._client.applications.to_post_request_information(
                Application(display_name=display_name)
            )
            made = await self._gate.call(
                f"create application {display_name}", lambda: self._json(request), write=True
            )
            client_id = str(made["appId"])
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
