"""Federated credentials of user-assigned managed identities, through azure-mgmt-msi (async).

An ARM client is bound to one subscription; a managed identity's resource id names its own. The
client for the configured default subscription is built at start-up, others on first use, all
sharing the one credential, and all with azure-core's retry policy switched off (retries belong to
the operator, see ``swi_operator.errors``).

ARM answers 409 when two credential writes on one identity overlap. Callers serialise writes per
identity (``steps.federation`` holds the identity's lock), so a 409 can only come from another
writer (another cluster's operator, a person): the write is repeated here a few times, briefly,
before it is reported as transient.

Writes are paced (``cloud.Pacer``) with the managed identity provider's quotas: one pacer per
subscription and one per identity (shared/docs/scale.md: about 2/s and 0.25/s); the identity is
looked up once, however many resources ask for it at the same time.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import HttpResponseError
from azure.mgmt.msi.aio import ManagedServiceIdentityClient
from azure.mgmt.msi.v2024_11_30.models import (
    FederatedIdentityCredential as ArmCredential,
)
from azure.mgmt.msi.v2024_11_30.models import (
    Identity as ArmIdentity,
)

from swi_operator import metrics
from swi_operator.cloud import CallGate, FederatedCredential, Lookups, Pacer, ResolvedIdentity
from swi_operator.cycle import changed, shared_read
from swi_operator.spec import IdentityRef, ManagedIdentityRef

API_VERSION = "2024-11-30"
CONCURRENT_WRITE_ATTEMPTS = 5
CONCURRENT_WRITE_PAUSE_S = 1.0

T = TypeVar("T")
ClientFactory = Callable[[str], ManagedServiceIdentityClient]


def arm_client_factory(
    credential: AsyncTokenCredential,
    base_url: str,
    scope: str,
    transport_options: Mapping[str, Any] | None = None,
) -> ClientFactory:
    def build(subscription_id: str) -> ManagedServiceIdentityClient:
        return ManagedServiceIdentityClient(
            credential,
            subscription_id,
            api_version=API_VERSION,
            base_url=base_url,
            credential_scopes=[scope],
            retry_total=0,
            **metrics.azure_hooks("arm"),
            **(transport_options or {}),
        )

    return build


def _mi(ref: IdentityRef) -> ManagedIdentityRef:
    assert isinstance(ref, ManagedIdentityRef)
    return ref


IDENTITY_TYPE = "Microsoft.ManagedIdentity/userAssignedIdentities"
ARM_HEADROOM = 0.05  # share of ARM's write quotas left unused (``Pacer``)


class ArmCredentialStore:
    def __init__(
        self,
        build_client: ClientFactory,
        gate: CallGate,
        default_subscription: str | None,
        *,
        subscription_write_rate: float = 0.0,
        identity_write_rate: float = 0.0,
    ) -> None:
        self._build = build_client
        self._gate = gate
        self._clients: dict[str, ManagedServiceIdentityClient] = {}
        self._identities: Lookups[ResolvedIdentity] = Lookups()
        self._subscription_rate = subscription_write_rate
        self._identity_rate = identity_write_rate
        self._pacers: dict[str, Pacer] = {}  # per subscription and per identity, by key
        if default_subscription:
            self._client(default_subscription)

    def _paces(self, mi: ManagedIdentityRef) -> tuple[Pacer, ...]:
        wanted = (
            (f"subscription {mi.subscription_id}", "arm-subscription", self._subscription_rate),
            (mi.key, "arm-identity", self._identity_rate),
        )
        for key, name, rate in wanted:
            if key not in self._pacers:
                # a second's worth of burst; 5% of the rate left unused against arrival jitter
                self._pacers[key] = Pacer(
                    rate, burst=max(rate, 1.0), headroom=ARM_HEADROOM, name=name
                )
        return tuple(self._pacers[key] for key, _, _ in wanted)

    def _client(self, subscription_id: str) -> ManagedServiceIdentityClient:
        client = self._clients.get(subscription_id)
        if client is None:
            client = self._clients[subscription_id] = self._build(subscription_id)
        return client

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()  # type: ignore[no-untyped-call]
        self._clients.clear()

    async def resolve(self, ref: IdentityRef) -> ResolvedIdentity:
        mi = _mi(ref)
        client = self._client(mi.subscription_id)

        async def look_up() -> ResolvedIdentity:
            found = await self._gate.call(
                f"look up {mi.display}",
                lambda: client.user_assigned_identities.get(mi.resource_group, mi.name),
            )
            return ResolvedIdentity(
                ref=mi,
                client_id=str(found.client_id),
                tenant_id=str(found.tenant_id),
                name=found.name or mi.name,
                object_id=str(found.principal_id),
            )

        return await self._identities.get(mi.key, look_up)

    async def list(self, identity: ResolvedIdentity) -> list[FederatedCredential]:
        mi = _mi(identity.ref)
        client = self._client(mi.subscription_id)

        async def collect() -> list[FederatedCredential]:
            pages = client.federated_identity_credentials.list(mi.resource_group, mi.name)
            return [
                FederatedCredential(
                    name=item.name or "",
                    issuer=item.issuer or "",
                    subject=item.subject or "",
                    audiences=tuple(item.audiences or ()),
                    id=item.id,
                )
                async for item in pages
            ]

        try:
            found = await shared_read(
                ("credentials", mi.key),
                lambda: self._gate.call(f"list the federated credentials of {mi.display}", collect),
            )
            return list(found)
        except Exception:
            self._identities.forget(mi.key)  # maybe deleted: look it up afresh next time
            raise

    async def _write(
        self, mi: ManagedIdentityRef, doing: str, operation: Callable[[], Awaitable[T]]
    ) -> T:
        """Run one credential write, paced, repeating it briefly while ARM reports a concurrent
        one."""

        async def attempts() -> T:
            for attempt in range(CONCURRENT_WRITE_ATTEMPTS):
                try:
                    return await operation()
                except HttpResponseError as exc:
                    if exc.status_code != 409 or attempt == CONCURRENT_WRITE_ATTEMPTS - 1:
                        raise
                    await asyncio.sleep(CONCURRENT_WRITE_PAUSE_S * (1 + random.random()))
            raise AssertionError("unreachable")

        try:
            return await self._gate.call(doing, attempts, write=True, pace=self._paces(mi))
        finally:
            changed(("credentials", mi.key))  # what a drift cycle read is stale

    async def ensure_identity(self, resource_group_id: str, name: str, location: str) -> str:
        """The resource id of user-assigned managed identity ``name`` in the resource group
        (``/subscriptions/<id>/resourceGroups/<name>``), made by a PUT: ARM's create-or-update
        adopts an identity of that name, whoever made it (a growing pool, ``pool.PoolGrowth``)."""
        _, subscription, _, group = resource_group_id.strip("/").split("/")[:4]
        client = self._client(subscription)
        mi = ManagedIdentityRef(
            resource_id=f"{resource_group_id}/providers/{IDENTITY_TYPE}/{name}",
            subscription_id=subscription,
            resource_group=group,
            name=name,
        )
        body = ArmIdentity(location=location, tags={"created-by": "sql-workload-identity-operator"})
        made = await self._gate.call(
            f"create managed identity {name} in {resource_group_id}",
            lambda: client.user_assigned_identities.create_or_update(group, name, body),
            write=True,
            pace=self._paces(mi),
        )
        return str(made.id or mi.resource_id)

    async def upsert(
        self, identity: ResolvedIdentity, credential: FederatedCredential
    ) -> FederatedCredential:
        mi = _mi(identity.ref)
        client = self._client(mi.subscription_id)
        body = ArmCredential(
            issuer=credential.issuer,
            subject=credential.subject,
            audiences=list(credential.audiences),
        )
        written = await self._write(
            mi,
            f"write federated credential {credential.name} on {mi.display}",
            lambda: client.federated_identity_credentials.create_or_update(
                mi.resource_group, mi.name, credential.name, body
            ),
        )
        return FederatedCredential(
            name=credential.name,
            issuer=credential.issuer,
            subject=credential.subject,
            audiences=credential.audiences,
            id=written.id,
        )

    async def delete(self, identity: ResolvedIdentity, name: str) -> None:
        mi = _mi(identity.ref)
        client = self._client(mi.subscription_id)

        async def delete_if_present() -> None:
            try:
                await client.federated_identity_credentials.delete(mi.resource_group, mi.name, name)
            except HttpResponseError as exc:
                if exc.status_code != 404:
                    raise

        await self._write(
            mi, f"delete federated credential {name} from {mi.display}", delete_if_present
        )
