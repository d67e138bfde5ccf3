"""Directory lookups for ``CREATE USER ... FROM EXTERNAL PROVIDER`` through the Entra Graph.

Azure SQL resolves the name in ``CREATE USER [name] FROM EXTERNAL PROVIDER`` with its own server
identity, which must be allowed to read the directory. The emulator does the same: it gets a Graph
token for the server's ``directoryReader`` app (client credentials) and asks
``/v1.0/servicePrincipals?$filter=displayName eq '...'`` and ``/v1.0/groups?$filter=...`` (or
``/servicePrincipals/{id}``, then ``/groups/{id}``, for ``WITH OBJECT_ID``). Service principals
(apps and managed identities) and security groups are resolved; the sandbox world holds no users.

At login, a token whose principal has no contained user of its own may still get in through a
group: Azure SQL does not read the token's ``groups`` claim for that (service principal tokens
carry none), it asks the directory which groups the principal belongs to. The emulator does the
same with ``/v1.0/servicePrincipals/{oid}/transitiveMemberOf`` (nested groups count), as the
server identity, which needs ``GroupMember.Read.All`` or ``Application.Read.All`` for it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import requests

GRAPH_SCOPE = "https://graph.microsoft.com/.default"


class DirectoryUnavailable(Exception):
    """The server identity could not read the directory (no token, no permission, no Graph)."""


@dataclass(frozen=True)
class DirectoryObject:
    object_id: str
    app_id: str | None
    display_name: str
    kind: str  # "servicePrincipal" | "user" | "group"


class Directory(Protocol):
    def find_by_name(self, name: str) -> list[DirectoryObject]: ...

    def find_by_object_id(self, object_id: str) -> DirectoryObject | None: ...

    def groups_of(self, object_id: str) -> list[DirectoryObject]: ...


class GraphDirectory:
    """:class:`Directory` over the Entra emulator, authenticated as the server's identity."""

    def __init__(
        self, entra_url: str, tenant: str, client_id: str, client_secret: str, ca_file: Path | None
    ) -> None:
        self._base = entra_url.rstrip("/")
        self._tenant = tenant
        self._client_id = client_id
        self._secret = client_secret
        self._verify: str | bool = str(ca_file) if ca_file else True
        self._lock = threading.Lock()
        self._token: tuple[float, str] | None = None

    def _access_token(self) -> str:
        with self._lock:
            if self._token and self._token[0] > time.time() + 60:
                return self._token[1]
            response = requests.post(
                f"{self._base}/{self._tenant}/oauth2/v2.0/token",
                data={
                    "grant_type": "client_credentials",
                    "client_id": self._client_id,
                    "client_secret": self._secret,
                    "scope": GRAPH_SCOPE,
                },
                verify=self._verify,
                timeout=10.0,
            )
            if response.status_code != 200:
                raise DirectoryUnavailable(f"token request failed: HTTP {response.status_code}")
            body = response.json()
            self._token = (time.time() + float(body.get("expires_in", 3599)), body["access_token"])
            return self._token[1]

    def _get(self, path: str, params: dict[str, str] | None = None) -> requests.Response:
        try:
            return requests.get(
                f"{self._base}/v1.0/{path}",
                params=params,
                verify=self._verify,
                timeout=10.0,
                headers={"Authorization": f"Bearer {self._access_token()}"},
            )
        except requests.RequestException as exc:
            raise DirectoryUnavailable(str(exc)) from exc

    @staticmethod
    def _object(item: dict[str, object], kind: str) -> DirectoryObject:
        app_id = item.get("appId")
        return DirectoryObject(
            str(item.get("id", "")),
            str(app_id) if app_id else None,
            str(item.get("displayName", "")),
            kind,
        )

    def _list(
        self, path: str, kind: str, params: dict[str, str] | None = None
    ) -> list[DirectoryObject]:
        response = self._get(path, params)
        if response.status_code != 200:
            raise DirectoryUnavailable(f"Graph lookup failed: HTTP {response.status_code}")
        return [self._object(item, kind) for item in response.json().get("value", [])]

    def find_by_name(self, name: str) -> list[DirectoryObject]:
        escaped = name.replace("'", "''")
        wanted = {"$filter": f"displayName eq '{escaped}'"}
        return self._list("servicePrincipals", "servicePrincipal", wanted) + self._list(
            "groups", "group", wanted
        )

    def find_by_object_id(self, object_id: str) -> DirectoryObject | None:
        for path, kind in (("servicePrincipals", "servicePrincipal"), ("groups", "group")):
            response = self._get(f"{path}/{object_id}")
            if response.status_code == 404:
                continue
            if response.status_code != 200:
                raise DirectoryUnavailable(f"Graph lookup failed: HTTP {response.status_code}")
            return self._object(response.json(), kind)
        return None

    def groups_of(self, object_id: str) -> list[DirectoryObject]:
        """The security groups a service principal belongs to, directly or through nesting."""
        response = self._get(f"servicePrincipals/{object_id}/transitiveMemberOf")
        if response.status_code == 404:
            return []
        if response.status_code != 200:
            raise DirectoryUnavailable(f"Graph lookup failed: HTTP {response.status_code}")
        return [
            self._object(item, "group")
            for item in response.json().get("value", [])
            if item.get("@odata.type") == "#microsoft.graph.group"
        ]
