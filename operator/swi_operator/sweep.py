"""The sweep: what exists in Entra for this cluster, reconciled with what the policies allow.

Revocation and deletion work from a resource (its status, its finalizer). A tenant can take a
grant out of that view: ``deletionPolicy: Retain`` then delete, the finalizer removed before the
delete, the resource's identity changed. So, after every policy change and every deletion of a
resource (debounced), and every ``interval`` regardless, the sweep:

1. collects the identities the operator may touch: those the current policies name, those the
   served resources name (spec, and the identity status recorded), and every one it has seen since
   it started (a withdrawn policy's identity is still swept);
2. lists each identity's federated credentials, and keeps those with this cluster's issuer and a
   service account subject of a served namespace;
3. lists the resources and the policies again (after the credentials, so a credential a resource
   created just before is seen with its resource) and computes the grants live, allowed resources
   back (``backing.backed_grants``: specs in their own namespace and the policies only);
4. deletes every credential from step 2 that no such grant backs, under the identity's lock (the
   one the federated credential step holds), and logs it; unless a policy that sets
   ``allowRetain`` lets the credential's namespace bind the identity (what a ``Retain`` resource
   left behind stays while such a policy allows it, and no longer).

Nothing tenant-writable besides a resource's spec takes part: not status, annotations, finalizers
or ``deletionPolicy``. With ``--peering`` only the active replica sweeps (``PeeringGate``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from swi_operator.backing import Grant, backed_grants, parse_subject
from swi_operator.cloud import CredentialStore, FederatedCredential, ResolvedIdentity
from swi_operator.drift import PeeringGate
from swi_operator.errors import PermanentError, Reason, ReconcileError
from swi_operator.locks import KeyedLocks
from swi_operator.periodic import DebouncedTask
from swi_operator.policy import ParsedPolicies, authorize, needs_namespace_labels
from swi_operator.spec import IdentityRef, SpecError, parse_spec
from swi_operator.steps.federation import IssuerSource, identity_from_status

log = logging.getLogger(__name__)


class SweepKube(Protocol):
    async def list_resources(self, namespaces: Sequence[str]) -> list[dict[str, Any]]: ...


class SweepPolicies(Protocol):
    def invalidate(self) -> None: ...

    async def policies(self) -> ParsedPolicies: ...

    async def namespace_labels(self, namespace: str) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class Removed:
    """A credential the sweep deleted."""

    identity: str  # IdentityRef.display
    name: str
    subject: str


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
    ) -> None:
        super().__init__(gate, namespaces=namespaces, interval=interval)
        self._kube = kube
        self._store = store
        self._issuer = issuer
        self._policies = policies
        self._locks = locks
        self._require = require_policy
        self._seen: dict[str, IdentityRef] = {}  # every identity named since start, by key

    async def _parsed(self) -> ParsedPolicies:
        self._policies.invalidate()  # never decide a removal on a cached view
        try:
            return await self._policies.policies()
        except PermanentError:
            return ParsedPolicies()  # no policy CRD: only what requirePolicy off allows counts

    def _remember(self, parsed: ParsedPolicies, resources: Sequence[Mapping[str, Any]]) -> None:
        for policy in parsed.valid:
            if policy.identity is not None:
                self._seen.setdefault(policy.identity.key, policy.identity)
        for body in resources:
            try:
                ref: IdentityRef | None = parse_spec(body.get("spec") or {}).identity
            except SpecError:
                ref = None
            if ref is not None:
                self._seen.setdefault(ref.key, ref)
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
        decision = authorize(ref, None, namespace, labels, parsed.valid, self._require, retain=True)
        return decision.allowed

    async def once(self) -> None:
        await self.sweep()

    async def sweep(self) -> list[Removed]:
        """One pass; what it removed."""
        served = await self._served()
        if served is None:
            return []
        issuer = await self._issuer.get()
        self._remember(await self._parsed(), await self._kube.list_resources(served))
        found = await asyncio.gather(
            *(self._ours(ref, issuer, served) for ref in list(self._seen.values()))
        )
        candidates = [entry for entry in found if entry is not None and entry[1]]
        if not candidates:
            return []
        resources = await self._kube.list_resources(served)
        parsed = await self._parsed()
        self._remember(parsed, resources)
        backed = await backed_grants(resources, _Fixed(parsed, self._policies), self._require)
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


class _Fixed:
    """The policies read for this pass (one view for every decision of it)."""

    def __init__(self, parsed: ParsedPolicies, source: SweepPolicies) -> None:
        self._parsed = parsed
        self._source = source

    async def policies(self) -> ParsedPolicies:
        return self._parsed

    async def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        return await self._source.namespace_labels(namespace)
