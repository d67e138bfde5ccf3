"""The sweep: what exists in Entra for this cluster, reconciled with what the policies allow.

Revocation and deletion work from a resource (its status, its finalizer). A tenant can take a
grant out of that view: ``deletionPolicy: Retain`` then delete, the finalizer removed before the
delete, the resource's identity changed. So, after every policy change and every deletion of a
resource (debounced), and every ``interval`` regardless, the sweep:

1. collects the identities the operator may touch: those the current policies name, those the
   served resources name (spec, and the identity status recorded), every one it has seen since
   it started, and every one the ledger says it federated (``ledger.py``: a withdrawn policy's
   identity is still swept, also after a restart);
2. lists each identity's federated credentials, and keeps those with this cluster's issuer and a
   service account subject of a served namespace;
3. lists the resources and the policies again (after the credentials, so a credential a resource
   created just before is seen with its resource) and computes the grants live, allowed resources
   back (``backing.backed_grants``: specs in their own namespace and the policies only);
4. deletes every credential from step 2 that no such grant backs, under the identity's lock (the
   one the federated credential step holds), and logs it; unless a policy that sets
   ``allowRetain`` lets the credential's namespace bind the identity (what a ``Retain`` resource
   left behind stays while such a policy allows it, and no longer);
5. does the same for the database users the ledger says the operator created (or granted roles
   to) in served namespaces: an entry is backed while its resource (by uid) is live, allowed, and
   its spec still names the same identity, server and database. An unbacked entry's user is
   dropped (or the roles revoked: ``DatabaseAccessStep.release_entry``), unless another backed
   entry uses the same user (then the entry is handed over), ``allowRetain`` keeps it, or the
   identity is federated with another cluster's issuer (kept, and looked at again next sweep).
   A live resource whose status records the user gets one pass to revoke it itself (its Event).

Nothing tenant-writable besides a resource's spec takes part: not status, annotations, finalizers
or ``deletionPolicy``. With ``--peering`` only the active replica sweeps (``PeeringGate``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from swi_operator.backing import Grant, Grants, backed_grants, parse_subject
from swi_operator.cloud import CredentialStore, FederatedCredential, ResolvedIdentity
from swi_operator.drift import PeeringGate
from swi_operator.errors import PermanentError, Reason, ReconcileError
from swi_operator.ledger import Ledger, UserEntry
from swi_operator.locks import KeyedLocks
from swi_operator.periodic import DebouncedTask
from swi_operator.policy import ParsedPolicies, authorize, needs_namespace_labels, server_key
from swi_operator.pool import Pool, PoolSource, member_keys
from swi_operator.spec import IdentityRef, NamedIdentity, PoolRef, SpecError, parse_spec
from swi_operator.steps.database import DatabaseUserRecord
from swi_operator.steps.federation import IssuerSource, identity_from_status

log = logging.getLogger(__name__)


class SweepKube(Protocol):
    def resource_pages(self, namespaces: Sequence[str]) -> AsyncIterator[list[dict[str, Any]]]: ...


class SweepPolicies(Protocol):
    def invalidate(self) -> None: ...

    async def policies(self) -> ParsedPolicies: ...

    async def namespace_labels(self, namespace: str) -> Mapping[str, str]: ...


class UserReleaser(Protocol):
    """Drops a ledger entry's database user, or revokes its roles (``DatabaseAccessStep``)."""

    async def release_entry(self, entry: UserEntry) -> str | None: ...


@dataclass(frozen=True)
class Removed:
    """A credential (or a database user) the sweep removed."""

    identity: str  # IdentityRef.display, or the identity's status string for a database user
    name: str  # the credential's name, or what was done to the database user
    subject: str  # the credential's subject, or namespace/name of the resource that made the user


class CredentialSweep(DebouncedTask):
    what = "sweep"

    def __init__(
        self,
        kube: SweepKube,
        store: CredentialStore,
        issuer: IssuerSource,
        policies: SweepPolicies,
        locks: KeyedLocks,
        gate: PeeringGate,
        *,
        namespaces: Sequence[str],
        require_policy: bool,
        interval: float,
        ledger: Ledger | None = None,
        users: UserReleaser | None = None,
        pools: PoolSource | None = None,
    ) -> None:
        super().__init__(gate, namespaces=namespaces, interval=interval)
        self._pools = pools
        self._pool_view: dict[str, Pool] = {}  # this pass's valid pools
        self._ledger = ledger
        self._users = users
        self._kube = kube
        self._store = store
        self._issuer = issuer
        self._policies = policies
        self._locks = locks
        self._require = require_policy
        self._seen: dict[str, IdentityRef] = {}  # every identity named since start, by key
        # Ledger entries whose live resource's status records the user: its own revocation drops
        # it (with an Event); the sweep waits one pass for that before it does it itself.
        self._revoking: set[str] = set()

    async def _parsed(self) -> ParsedPolicies:
        self._policies.invalidate()  # never decide a removal on a cached view
        try:
            return await self._policies.policies()
        except PermanentError:
            return ParsedPolicies()  # no policy CRD: only what requirePolicy off allows counts

    @property
    def _members(self) -> dict[str, frozenset[str]]:
        """This pass's pools' members' identity keys, by pool (``backing.PoolMembers``)."""
        return member_keys(self._pool_view)

    async def _pools_now(self) -> dict[str, Pool]:
        """The valid pools, read for this pass (never a cached view for a removal)."""
        if self._pools is None:
            return {}
        self._pools.invalidate()
        return {name: p for name, p in (await self._pools.all()).items() if isinstance(p, Pool)}

    async def _resources(self, served: Sequence[str]) -> list[dict[str, Any]]:
        """The served resources with only what a sweep reads of them (``_SWEPT``), read a page
        at a time: a pass over a fleet of thousands holds none of their conditions or workloads."""
        kept: list[dict[str, Any]] = []
        async for page in self._kube.resource_pages(served):
            kept.extend(_swept(body) for body in page)
        return kept

    def _remember(self, parsed: ParsedPolicies, resources: Sequence[Mapping[str, Any]]) -> None:
        for pool in self._pool_view.values():
            for member in pool.members:  # every pool's members: the operator may federate them
                self._seen.setdefault(member.key, member)
        for policy in parsed.valid:
            if policy.identity is not None and not isinstance(policy.identity, PoolRef):
                self._seen.setdefault(policy.identity.key, policy.identity)
        for body in resources:
            try:
                named: NamedIdentity | None = parse_spec(body.get("spec") or {}).identity
            except SpecError:
                named = None
            if named is not None and not isinstance(named, PoolRef):
                self._seen.setdefault(named.key, named)
            status = body.get("status")
            recorded = status.get("federatedCredential") if isinstance(status, Mapping) else None
            if isinstance(recorded, Mapping):
                old = identity_from_status(str(recorded.get("identity", "")))
                if old is not None:
                    self._seen.setdefault(old.key, old)

    async def _ours(
        self, ref: IdentityRef, issuer: str, served: Sequence[str]
    ) -> tuple[ResolvedIdentity, list[FederatedCredential]] | None:
        try:
            identity = await self._store.resolve(ref)
            listed = await self._store.list(identity)
        except PermanentError as err:
            if err.reason is Reason.IDENTITY_NOT_FOUND:
                self._seen.pop(ref.key, None)  # gone, and its credentials with it
                if self._ledger is not None:
                    await self._ledger.forget_identity(ref)
            else:
                log.warning("sweep: cannot list %s: %s", ref.display, err.message)
            return None
        ours = []
        for credential in listed:
            parsed = parse_subject(credential.subject)
            if credential.issuer != issuer or parsed is None:
                continue
            if served and parsed[0] not in served:
                continue
            ours.append(credential)
        return identity, ours

    async def _retention_allowed(
        self, parsed: ParsedPolicies, ref: IdentityRef, namespace: str
    ) -> bool:
        """Whether the policies would let a resource of ``namespace`` bind ``ref`` with
        ``deletionPolicy: Retain``: what such a resource left behind may stay, while they do."""
        labels: Mapping[str, str] = {}
        if needs_namespace_labels(parsed.valid, namespace):
            labels = await self._policies.namespace_labels(namespace)
        # A pool member's credentials are the pool's: the policies that name the pool decide.
        named: list[NamedIdentity] = [ref]
        named += [PoolRef(name) for name, p in self._pool_view.items() if ref.key in p.member_keys]
        return any(
            authorize(
                one, None, namespace, labels, parsed.valid, self._require, retain=True
            ).allowed
            for one in named
        )

    async def once(self) -> None:
        started = time.monotonic()
        removed = await self.sweep()
        log.info("sweep done in %.1f s, %d removed", time.monotonic() - started, len(removed))

    async def sweep(self) -> list[Removed]:
        """One pass; what it removed."""
        served = await self._served()
        if served is None:
            return []
        issuer = await self._issuer.get()
        entries: list[UserEntry] = []
        if self._ledger is not None:
            await self._ledger.refresh()  # another replica may have written since
            for ref in await self._ledger.identities():
                self._seen.setdefault(ref.key, ref)
            if self._users is not None:
                entries = [
                    entry
                    for entry in await self._ledger.users()
                    if not served or entry.namespace in served
                ]
        self._pool_view = await self._pools_now()
        self._remember(await self._parsed(), await self._resources(served))
        found = await asyncio.gather(
            *(self._ours(ref, issuer, served) for ref in list(self._seen.values()))
        )
        candidates = [entry for entry in found if entry is not None and entry[1]]
        if not candidates and not entries:
            return []
        resources = await self._resources(served)
        parsed = await self._parsed()
        self._pool_view = await self._pools_now()
        self._remember(parsed, resources)
        backed = await backed_grants(
            resources, _Fixed(parsed, self._policies), self._require, pools=self._members
        )
        removed = await self._credentials(candidates, parsed, backed)
        return removed + await self._database_users(entries, resources, parsed, backed)

    async def _credentials(
        self,
        candidates: Sequence[tuple[ResolvedIdentity, list[FederatedCredential]]],
        parsed: ParsedPolicies,
        backed: Grants,
    ) -> list[Removed]:
        removed: list[Removed] = []
        for identity, credentials in candidates:
            stale = []
            for c in credentials:
                subject = parse_subject(c.subject)
                if subject is None or Grant(identity.ref.key, *subject) in backed:
                    continue
                if not await self._retention_allowed(parsed, identity.ref, subject[0]):
                    stale.append(c)
            if not stale:
                continue
            async with self._locks.hold(identity.ref.key):
                for credential in stale:
                    try:
                        await self._store.delete(identity, credential.name)
                    except ReconcileError as err:
                        log.warning(
                            "sweep: could not delete credential %s of %s: %s",
                            credential.name,
                            identity.ref.display,
                            err.message,
                        )
                        continue
                    log.warning(
                        "sweep: deleted credential %s of %s for %s: no live SqlWorkloadIdentity "
                        "that a current SqlIdentityPolicy allows backs it",
                        credential.name,
                        identity.ref.display,
                        credential.subject,
                    )
                    removed.append(
                        Removed(identity.ref.display, credential.name, credential.subject)
                    )
        return removed

    async def _database_users(
        self,
        entries: Sequence[UserEntry],
        resources: Sequence[Mapping[str, Any]],
        parsed: ParsedPolicies,
        backed: Grants,
    ) -> list[Removed]:
        if not entries or self._users is None or self._ledger is None:
            return []
        live: dict[str, Mapping[str, Any]] = {}
        for body in resources:
            meta = body.get("metadata") or {}
            if meta.get("uid") and not meta.get("deletionTimestamp"):
                live[str(meta["uid"])] = body
        members = self._members
        kept = [entry for entry in entries if _backs(live.get(entry.uid), entry, backed, members)]
        in_use = {entry.user_key: entry for entry in kept}
        removed: list[Removed] = []
        revoking = {e.key for e in entries if e not in kept and _recorded(live.get(e.uid), e)}
        waited, self._revoking = self._revoking & revoking, revoking
        for entry in entries:
            ref = entry.identity_ref
            if entry in kept or ref is None:
                continue
            if entry.key in revoking and entry.key not in waited:
                continue  # the resource's own revocation comes first (the next pass: the sweep)
            if not entry.released and await self._retention_allowed(parsed, ref, entry.namespace):
                continue  # what a Retain resource left (a released one was meant to go)
            heir = in_use.get(entry.user_key)
            if not entry.created and not entry.granted_roles:
                await self._ledger.remove_user(entry)  # adopted as it was: nothing to undo
                continue
            if heir is not None:
                # Another live resource uses the same user (a shared identity): it stays, and
                # whoever holds it now drops it when it goes, if this one had created it.
                heir = dataclasses.replace(
                    heir,
                    created=heir.created or entry.created,
                    granted_roles=tuple(sorted({*heir.granted_roles, *entry.granted_roles})),
                )
                in_use[entry.user_key] = heir
                await self._ledger.put_user(heir)
                await self._ledger.remove_user(entry)
                continue
            try:
                done = await self._users.release_entry(entry)
            except ReconcileError as err:
                log.warning(
                    "sweep: could not remove database user %s of %s/%s in %s: %s",
                    entry.user,
                    entry.namespace,
                    entry.resource,
                    entry.target.display,
                    err.message,
                )
                continue
            if done is None:
                # Another cluster is federated with the identity and may use the user: kept,
                # with its entry, until it no longer is (DatabaseAccessStep, OtherClusters).
                log.debug("sweep: kept database user %s: other clusters use it", entry.user)
                continue
            log.warning(
                "sweep: %s, made for %s/%s: no live SqlWorkloadIdentity that a current "
                "SqlIdentityPolicy allows backs it",
                done,
                entry.namespace,
                entry.resource,
            )
            removed.append(Removed(entry.identity, done, f"{entry.namespace}/{entry.resource}"))
        return removed


# What the sweep reads of a resource: who it is and whether it is going, the spec (the grants it
# backs), and the identity and database user its status records (``_remember``, ``_recorded``).
_SWEPT = {
    "metadata": ("name", "namespace", "uid", "deletionTimestamp"),
    "status": ("federatedCredential", "databaseUser"),
}


def _swept(body: Mapping[str, Any]) -> dict[str, Any]:
    kept: dict[str, Any] = {"spec": body.get("spec")}
    for part, keys in _SWEPT.items():
        within = body.get(part)
        if isinstance(within, Mapping):
            kept[part] = {key: within[key] for key in keys if key in within}
    return kept


def _backs(
    body: Mapping[str, Any] | None,
    entry: UserEntry,
    backed: Grants,
    pools: Mapping[str, frozenset[str]],
) -> bool:
    """Whether live resource ``body`` (the one that made ``entry``) still wants that user: the
    same identity (or a pool the identity is a member of), server (however spelled) and
    database, and a grant the policies allow."""
    ref = entry.identity_ref
    if body is None or ref is None:
        return False
    try:
        spec = parse_spec(body.get("spec") or {})
    except SpecError:
        return False
    if spec.sql is None:
        return False
    if isinstance(spec.identity, PoolRef):
        if ref.key not in pools.get(spec.identity.name, frozenset()):
            return False
    elif spec.identity.key != ref.key:
        return False
    if server_key(spec.sql.server) != server_key(entry.server):
        return False
    if spec.sql.database != entry.database:
        return False
    return Grant(ref.key, entry.namespace, spec.service_account_name) in backed


def _recorded(body: Mapping[str, Any] | None, entry: UserEntry) -> bool:
    """Whether live resource ``body`` records ``entry``'s user in its status (so its revocation
    or clean-up will undo it, and say so in an Event)."""
    if body is None:
        return False
    status = body.get("status")
    record = DatabaseUserRecord.from_status(status) if isinstance(status, Mapping) else None
    return record is not None and record.same_user(entry.target, entry.client_id)


class _Fixed:
    """The policies read for this pass (one view for every decision of it)."""

    def __init__(self, parsed: ParsedPolicies, source: SweepPolicies) -> None:
        self._parsed = parsed
        self._source = source

    async def policies(self) -> ParsedPolicies:
        return self._parsed

    async def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        return await self._source.namespace_labels(namespace)
