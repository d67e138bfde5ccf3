"""The Entra side of the operator behind one narrow interface, ``CredentialStore``.

Two implementations: ``graph.GraphCredentialStore`` (federated credentials of app registrations,
Microsoft Graph) and ``arm.ArmCredentialStore`` (of user-assigned managed identities, ARM).
``IdentityRouter`` picks one by the kind of identity, so the reconcile steps never know which.
Contract, as in Crossplane's external clients: ``upsert`` of something that exists updates it,
``delete`` of something missing succeeds; failures leave as ``errors.ReconcileError``.

``CallGate`` wraps every call to one service: it bounds the requests in flight (a restart must not
be a thundering herd), classifies failures (``errors.classify``), and after a 429 holds every
caller back until the service's ``Retry-After`` has passed instead of letting each of them collect
its own 429.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from swi_operator.errors import Reason, TransientError, classify
from swi_operator.spec import ApplicationRef, IdentityRef, ManagedIdentityRef

T = TypeVar("T")

MAX_CREDENTIALS_PER_IDENTITY = 20


@dataclass(frozen=True)
class FederatedCredential:
    name: str
    issuer: str
    subject: str
    audiences: tuple[str, ...]
    description: str | None = None  # Graph only: ARM credentials have none
    id: str | None = None

    def same_trust(self, other: FederatedCredential) -> bool:
        """Whether both accept the same tokens (description and id aside)."""
        return (self.issuer, self.subject, self.audiences) == (
            other.issuer,
            other.subject,
            other.audiences,
        )


@dataclass(frozen=True)
class ResolvedIdentity:
    """An identity as found in Entra/ARM: what the service account annotations need."""

    ref: IdentityRef
    client_id: str
    tenant_id: str
    name: str
    object_id: str  # application object id, or the managed identity's principal id


class CredentialStore(Protocol):
    async def resolve(self, ref: IdentityRef) -> ResolvedIdentity: ...

    async def list(self, identity: ResolvedIdentity) -> list[FederatedCredential]: ...

    async def upsert(
        self, identity: ResolvedIdentity, credential: FederatedCredential
    ) -> FederatedCredential: ...

    async def delete(self, identity: ResolvedIdentity, name: str) -> None: ...


class CallGate:
    """Bounds concurrent calls to one service and honours its Retry-After for everyone."""

    def __init__(
        self, service: str, concurrency: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.service = service
        self._slots = asyncio.Semaphore(concurrency)
        self._clock = clock
        self._paused_until = 0.0

    async def call(self, doing: str, request: Callable[[], Awaitable[T]]) -> T:
        wait = self._paused_until - self._clock()
        if wait > 0:
            raise TransientError(
                Reason.THROTTLED,
                f"{self.service} asked to slow down; not trying to {doing} yet",
                wait,
            )
        async with self._slots:
            try:
                return await request()
            except Exception as exc:
                error = classify(exc, doing)
                if isinstance(error, TransientError) and error.reason is Reason.THROTTLED:
                    self._paused_until = max(
                        self._paused_until, self._clock() + (error.delay or 1.0)
                    )
                raise error from exc


class IdentityRouter:
    """A ``CredentialStore`` that sends each identity to the store of its kind."""

    def __init__(self, applications: CredentialStore, managed_identities: CredentialStore) -> None:
        self._applications = applications
        self._managed_identities = managed_identities

    def _store(self, ref: IdentityRef) -> CredentialStore:
        if isinstance(ref, ApplicationRef):
            return self._applications
        assert isinstance(ref, ManagedIdentityRef)
        return self._managed_identities

    async def resolve(self, ref: IdentityRef) -> ResolvedIdentity:
        return await self._store(ref).resolve(ref)

    async def list(self, identity: ResolvedIdentity) -> list[FederatedCredential]:
        return await self._store(identity.ref).list(identity)

    async def upsert(
        self, identity: ResolvedIdentity, credential: FederatedCredential
    ) -> FederatedCredential:
        return await self._store(identity.ref).upsert(identity, credential)

    async def delete(self, identity: ResolvedIdentity, name: str) -> None:
        await self._store(identity.ref).delete(identity, name)
