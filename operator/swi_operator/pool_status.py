"""What ``kubectl get sqlidentitypools`` shows, and the resources a pool change must move.

A debounced task (``periodic.DebouncedTask``, active replica only) that, after a pool changed
(its watch), after resources on pools were admitted or deleted (at most every
``periodic.RECOUNT_MIN_S``), and every interval regardless:

1. lists each valid pool's members' federated credentials (every issuer's: Entra's budget of 20
   counts them all) and writes, per member, how many there are and how many are this cluster's;
2. counts the SqlWorkloadIdentities (and their namespaces) that name the pool;
3. re-checks at once each resource whose status records a member that is no longer one of its
   pool's (a member removed from ``spec.members``): its next pass moves it, with an Event,
   rather than at the next drift check.

An invalid pool gets its problems in ``status.message`` and grants nothing (``pool.PoolSource``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol

from swi_operator.cloud import MAX_CREDENTIALS_PER_IDENTITY, CredentialStore
from swi_operator.drift import DriftLoop, PeeringGate
from swi_operator.errors import PermanentError, Reason
from swi_operator.periodic import DebouncedTask
from swi_operator.pool import Pool, PoolSource, parse_pools
from swi_operator.spec import IdentityRef, PoolRef, SpecError, parse_spec
from swi_operator.steps.federation import IssuerSource, identity_from_status, identity_key

log = logging.getLogger(__name__)


class PoolKube(Protocol):
    async def list_pools(self) -> list[dict[str, Any]] | None: ...

    def resource_pages(self, namespaces: Sequence[str]) -> AsyncIterator[list[dict[str, Any]]]: ...

    async def patch_pool_status(self, name: str, status: Mapping[str, Any]) -> None: ...


def _dig(body: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = body.get(key)
    return value if isinstance(value, Mapping) else {}


class PoolStatus(DebouncedTask):
    what = "pool status"

    def __init__(
        self,
        kube: PoolKube,
        pools: PoolSource,
        store: CredentialStore,
        issuer: IssuerSource,
        drift: DriftLoop,
        gate: PeeringGate,
        *,
        namespaces: Sequence[str],
        interval: float,
    ) -> None:
        super().__init__(gate, namespaces=namespaces, interval=interval)
        self._kube = kube
        self._pools = pools
        self._store = store
        self._issuer = issuer
        self._drift = drift

    async def once(self) -> None:
        served = await self._served()
        if served is None:
            return
        listed = await self._kube.list_pools()
        if not listed:
            return  # no CRD, or no pool
        self._pools.invalidate()  # what the watch may not have told yet, read once: here
        parsed = parse_pools(listed)
        issuer = await self._issuer.get()
        on_pool: Counter[str] = Counter()
        namespaces: dict[str, set[str]] = {}
        stray: list[Mapping[str, Any]] = []
        async for page in self._kube.resource_pages(served):  # a page of the fleet at a time
            for body in page:
                try:
                    named = parse_spec(body.get("spec") or {}).identity
                except SpecError:
                    continue
                if not isinstance(named, PoolRef):
                    continue
                on_pool[named.name] += 1
                namespaces.setdefault(named.name, set()).add(
                    str(_dig(body, "metadata").get("namespace"))
                )
                pool = parsed.get(named.name)
                recorded = identity_from_status(
                    str(_dig(_dig(body, "status"), "federatedCredential").get("identity") or "")
                )
                if (
                    isinstance(pool, Pool)
                    and recorded is not None
                    and pool.member(recorded.key) is None
                    and not _dig(body, "metadata").get("deletionTimestamp")
                ):
                    stray.append(body)
        if stray:
            log.info("pool change: moving %d resource(s) off former members now", len(stray))
            await asyncio.gather(*(self._drift.check(body) for body in stray))
        for body in listed:
            name = str(_dig(body, "metadata").get("name") or "")
            found = parsed.get(name)
            status: dict[str, Any] = {
                "observedGeneration": _dig(body, "metadata").get("generation"),
                "resources": on_pool[name],
                "namespaces": len(namespaces.get(name, ())),
            }
            if isinstance(found, Pool):
                members = [await self._member(ref, issuer) for ref in found.members]
                used = sum(int(m.get("credentials") or 0) for m in members)
                status |= {
                    "members": members,
                    "memberCount": len(members),
                    "credentials": f"{used}/{len(members) * MAX_CREDENTIALS_PER_IDENTITY}",
                    "message": (
                        f"{len(members)} member(s), {used} of "
                        f"{len(members) * MAX_CREDENTIALS_PER_IDENTITY} credentials used"
                        + (f", {found.reserved} per member reserved" if found.reserved else "")
                    ),
                }
            else:
                status |= {
                    "members": [],
                    "memberCount": 0,
                    "credentials": "0/0",
                    "message": f"invalid, grants nothing: {found}",
                }
            current = _dig(body, "status")
            if any(current.get(key) != value for key, value in status.items()):
                await self._kube.patch_pool_status(name, status)

    async def _member(self, ref: IdentityRef, issuer: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"identity": identity_key(ref)}
        try:
            identity = await self._store.resolve(ref)
            credentials = await self._store.list(identity)
        except PermanentError as err:
            if err.reason is Reason.IDENTITY_NOT_FOUND:
                return entry | {"name": "", "credentials": 0, "thisCluster": 0, "found": False}
            raise
        return entry | {
            "name": identity.name,
            "clientId": identity.client_id,
            "credentials": len(credentials),
            "thisCluster": sum(1 for c in credentials if c.issuer == issuer),
            "found": True,
        }
