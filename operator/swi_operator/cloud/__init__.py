"""The Entra side of the operator behind one narrow interface, ``CredentialStore``.

Two implementations: ``graph.GraphCredentialStore`` (federated credentials of app registrations,
Microsoft Graph) and ``arm.ArmCredentialStore`` (of user-assigned managed identities, ARM).
``IdentityRouter`` picks one by the kind of identity, so the reconcile steps never know which.
Contract, as in Crossplane's external clients: ``upsert`` of something that exists updates it,
``delete`` of something missing succeeds; failures leave as ``errors.ReconcileError``. ``upsert``
returns the credential with no ``id`` when the service said it already existed and sent nothing
back (Graph's 204): Graph's reads lag behind its writes, so a list can miss a credential that
was written moments ago.

``CallGate`` wraps every call to one service: it bounds the requests in flight (a restart must not
be a thundering herd), classifies failures (``errors.classify``), paces writes to the service's
write quota (``Pacer``), and after a 429 holds every caller back until the service's
``Retry-After`` has passed instead of letting each of them collect its own 429. A short pause
(up to ``THROTTLE_WAIT_MAX_S``) is waited out inside the call, and the throttled call is repeated
after it (``THROTTLE_ATTEMPTS`` in all): failing the reconcile instead would make kopf run the
whole pipeline again for every resource that happened to be waiting, which is what a fleet-wide
onboarding measured (bench/onboarding.py: eight handler runs per resource at N = 1000). A longer
``Retry-After`` still fails the call, and kopf retries the reconcile after it.

Pacing: Azure's write quotas are known (shared/docs/scale.md: Graph about 20 writes/s per app and
tenant; managed identities about 2/s per subscription and 0.25/s per identity). Writing faster
only buys 429s, each of which stops every caller for a whole second (``Retry-After`` has no
fractions), so writes wait for their turn instead; reads are not paced.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from swi_operator import metrics
from swi_operator.errors import Reason, TransientError, classify
from swi_operator.spec import ApplicationRef, IdentityRef, ManagedIdentityRef

T = TypeVar("T")
V = TypeVar("V")

MAX_CREDENTIALS_PER_IDENTITY = 20
THROTTLE_WAIT_MAX_S = 30.0  # longer Retry-After: the reconcile fails, kopf retries after it
THROTTLE_ATTEMPTS = 3  # tries of one call that keeps being throttled, before kopf takes over


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


class Lookups(Generic[V]):
    """Answers of lookups remembered by key; concurrent first lookups of one key share one
    request (a restart reconciles many resources of one identity at once)."""

    def __init__(self) -> None:
        self._known: dict[str, V] = {}
        self._pending: dict[str, asyncio.Future[V]] = {}

    async def get(self, key: str, fetch: Callable[[], Awaitable[V]]) -> V:
        if key in self._known:
            return self._known[key]
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = asyncio.ensure_future(fetch())
            pending.add_done_callback(lambda done: self._settle(key, done))
        # shielded: a caller that is cancelled must not cancel the lookup the others await
        return await asyncio.shield(pending)

    def _settle(self, key: str, done: asyncio.Future[V]) -> None:
        self._pending.pop(key, None)
        if not done.cancelled() and done.exception() is None:
            self._known[key] = done.result()

    def forget(self, key: str) -> None:
        self._known.pop(key, None)


class Pacer:
    """At most ``rate`` acquisitions per second, ``burst`` of them back to back (a token bucket,
    as the generic cell rate algorithm: each caller reserves the next slot and sleeps until it).
    Callers are served in the order they arrived; ``rate`` 0 paces nothing. ``headroom`` keeps
    that share of the rate unused: with a burst of 1 (ARM's 0.25 writes/s per identity), slots
    exactly one interval apart reach the service a few milliseconds early about half the time,
    and each such 429 costs a whole slot (bench/onboarding.py --kind mi: 65 of 100 writes)."""

    def __init__(
        self,
        rate: float,
        burst: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        *,
        headroom: float = 0.0,
        name: str = "",
    ) -> None:
        self.rate = rate
        self.name = name  # the pacer label of its wait metric (metrics.PACER_WAIT): not an id
        self._interval = 1.0 / (rate * (1.0 - headroom)) if rate > 0 else 0.0
        self._tolerance = max(burst - 1.0, 0.0) * self._interval
        self._clock = clock
        self._sleep = sleep
        self._next = 0.0  # when the next acquisition is due, burst aside

    async def acquire(self) -> None:
        if self._interval == 0:
            return
        now = self._clock()
        due = max(self._next, now)
        self._next = due + self._interval
        wait = due - self._tolerance - now
        if self.name:
            metrics.PACER_WAIT.labels(self.name).observe(max(wait, 0.0))
        if wait > 0:
            await self._sleep(wait)

    def defer(self, seconds: float) -> None:
        """The service said to wait (429, Retry-After): no acquisition before ``seconds`` from
        now, whatever the burst allowance."""
        self._next = max(self._next, self._clock() + seconds + self._tolerance)


class CallGate:
    """Bounds concurrent calls to one service, paces its writes and honours its Retry-After for
    everyone."""

    def __init__(
        self,
        service: str,
        concurrency: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        writes: Pacer | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.service = service
        self._slots = asyncio.Semaphore(concurrency)
        self._clock = clock
        self._sleep = sleep
        self._writes = writes
        self._paused_until = 0.0

    async def _wait_out_pause(self, doing: str) -> None:
        while (wait := self._paused_until - self._clock()) > 0:
            if wait > THROTTLE_WAIT_MAX_S:
                raise TransientError(
                    Reason.THROTTLED,
                    f"{self.service} asked to slow down; not trying to {doing} yet",
                    wait,
                )
            await self._sleep(wait)

    async def call(
        self,
        doing: str,
        request: Callable[[], Awaitable[T]],
        *,
        write: bool = False,
        pace: Sequence[Pacer] = (),
    ) -> T:
        """Run ``request``; ``write`` paces it with the service's write quota, ``pace`` with
        others too, broadest first (one subscription's, one identity's).

        A 429 on a call with ``pace`` defers only its narrowest pacer (one identity's) by the
        Retry-After: other identities' writes and every read go on. Paced writes still meet such a
        429 when a slot's request reaches the service late and the next one on time (0.25
        writes/s per identity leaves no slack); pausing all of ARM for it cost bench/onboarding.py
        --kind mi a second or more per 429. Any other 429 pauses every call to the service."""
        for attempt in range(1, THROTTLE_ATTEMPTS + 1):
            await self._wait_out_pause(doing)
            for pacer in (self._writes, *pace) if write else pace:
                if pacer is not None:
                    await pacer.acquire()
            async with self._slots:
                try:
                    return await request()
                except Exception as exc:
                    error = classify(exc, doing)
                    if not (isinstance(error, TransientError) and error.reason is Reason.THROTTLED):
                        raise error from exc
                    delay = error.delay or 1.0
                    if pace:
                        pace[-1].defer(delay)
                    else:
                        self._paused_until = max(self._paused_until, self._clock() + delay)
                    if attempt == THROTTLE_ATTEMPTS or delay > THROTTLE_WAIT_MAX_S:
                        raise error from exc
        raise AssertionError("unreachable")


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
