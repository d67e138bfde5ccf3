"""Service principal object ids, for ``CREATE USER ... FROM EXTERNAL PROVIDER WITH OBJECT_ID``.

Only the ``object-id`` form of database users needs them (``--sql-user-form``); the default
``WITH SID`` form needs no directory lookup at all. A managed identity's principal id is its
service principal's object id already; an app registration's is looked up once in Graph
(``servicePrincipals(appId='...')``; ``Application.ReadWrite.OwnedBy`` may read those of the apps
the operator owns) and remembered.
"""

from __future__ import annotations

from msgraph.generated.service_principals_with_app_id.service_principals_with_app_id_request_builder import (  # noqa: E501
    ServicePrincipalsWithAppIdRequestBuilder,
)
from msgraph.graph_service_client import GraphServiceClient

from swi_operator.cloud import CallGate, ResolvedIdentity
from swi_operator.errors import PermanentError, Reason
from swi_operator.spec import ManagedIdentityRef


class GraphServicePrincipals:
    def __init__(self, client: GraphServiceClient, gate: CallGate) -> None:
        self._client = client
        self._gate = gate
        self._known: dict[str, str] = {}  # app id -> service principal object id

    async def object_id(self, identity: ResolvedIdentity) -> str:
        if isinstance(identity.ref, ManagedIdentityRef):
            return identity.object_id
        app_id = identity.client_id
        if app_id not in self._known:
            # Its own copy of the path parameters: msgraph's root client would hand the builder
            # its shared dict, which the builder writes the app id into.
            builder = ServicePrincipalsWithAppIdRequestBuilder(
                self._client.request_adapter, dict(self._client.path_parameters), app_id
            )
            found = await self._gate.call(
                f"find the service principal of application {app_id}", builder.get
            )
            if found is None or not found.id:
                raise PermanentError(
                    Reason.IDENTITY_NOT_FOUND,
                    f"application {app_id} has no service principal in the tenant, so no "
                    f"database user can be created for it: create one (az ad sp create --id "
                    f"{app_id}), or run the operator with --sql-user-form sid",
                )
            self._known[app_id] = found.id
        return self._known[app_id]
