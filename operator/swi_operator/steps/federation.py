"""FederatedCredentialReady: the identity trusts this cluster's tokens for the service account.

Order of work, all of it read-before-write so that a drift check with nothing to repair makes no
cloud write, and a restart at any point makes no duplicate:

1. the issuer (configured, or discovered once from the API server);
2. the claim: the service account must not be federated by another live resource;
3. the identity, resolved in Graph or ARM (its client id feeds the service account annotations);
4. under the identity's lock: list its credentials; one with this issuer and subject is adopted
   (whatever its name) and corrected if its audience or description drifted; otherwise the
   deterministic name is created, unless the identity's 20-credential budget (counting every
   cluster's credentials) is spent. A resource's first pass may decide "create" from the list
   this process read or wrote for the identity in the last ``RECENT_LIST_S`` (``RecentLists``)
   instead of listing again: onboarding many resources on one identity listed it once per
   resource. Only "create" is decided that way: Entra itself refuses a 21st credential or a
   second one for the same issuer and subject (another cluster's, a person's, written since),
   and on any refusal the list is read live and decided again; adopting, correcting, a name
   clash and the budget are always decided on a live list;
5. a credential recorded in status for another identity or subject (the spec changed) is removed.

Only credentials whose issuer is this cluster's are ever adopted, changed or deleted, and only for
a subject in the resource's own namespace: the status that records the previous subject is a
subresource someone other than the operator may be able to write, so a recorded subject of another
namespace is never acted on.

Revocation (a policy no longer allows the resource): the credential recorded in status is deleted,
whatever ``deletionPolicy`` says, and nothing is called on an identity the resource names now but
was never granted. Revocation and deletion keep a credential only when another live resource that a
policy allows backs it (``backing.py``): the service account's ``sqlidentity.io/owner`` annotation,
which the namespace's tenant can write, decides nothing there. What escapes them (a finalizer
removed, ``Retain`` then delete) is the sweep's (``sweep.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

from swi_operator.backing import SUBJECT_PREFIX, Backing, Grant, parse_subject
from swi_operator.cloud import (
    MAX_CREDENTIALS_PER_IDENTITY,
    CredentialStore,
    FederatedCredential,
    ResolvedIdentity,
)
from swi_operator.errors import PermanentError, Reason, ReconcileError, TransientError
from swi_operator.kube import KubeClient
from swi_operator.locks import KeyedLocks
from swi_operator.naming import Owner, credential_description, credential_name, subject_for
from swi_operator.pool import Pool, PoolGrowth, PoolSource, choose_member, exhausted
from swi_operator.spec import (
    ApplicationRef,
    IdentityRef,
    PoolRef,
    is_guid,
    parse_managed_identity_id,
)
from swi_operator.steps import Context, StepResult
from swi_operator.steps.service_account import ensure_not_claimed

# Entra refuses whatever a stale list would get wrong, so the window is about Graph calls: at
# 10 s, onboarding 1,000 resources on 72 identities still listed 407 times (issue 23).
RECENT_LIST_S = 30.0
POOL_CHOICE_ATTEMPTS = 3  # a pool member chosen, then refused as full (others filled it)


class RecentLists:
    """Each identity's credentials as this process last listed or wrote them, for ``RECENT_LIST_S``
    (used under the identity's lock only). Bounded by the identities in use; an entry older than
    the window is dropped when next read."""

    def __init__(
        self, ttl: float = RECENT_LIST_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl
        self._clock = clock
        self._lists: dict[str, tuple[float, list[FederatedCredential]]] = {}

    def get(self, key: str) -> list[FederatedCredential] | None:
        found = self._lists.get(key)
        if found is None:
            return None
        if self._clock() - found[0] > self._ttl:
            del self._lists[key]
            return None
        return list(found[1])

    def put(self, key: str, credentials: list[FederatedCredential]) -> None:
        self._lists[key] = (self._clock(), list(credentials))

    def wrote(self, key: str, credential: FederatedCredential) -> None:
        """``credential`` was written: a remembered list gains it (or its new version)."""
        found = self._lists.get(key)
        if found is not None:
            kept = [c for c in found[1] if c.name != credential.name]
            self._lists[key] = (found[0], [*kept, credential])

    def forget(self, key: str) -> None:
        self._lists.pop(key, None)


class PoolSlots:
    """Credentials chosen on pool members and not yet written (``_pool_member``): the choices
    made after them count these as taken, so that a pool's lock need not be held over a write."""

    def __init__(self) -> None:
        self._held: dict[str, dict[int, FederatedCredential]] = {}
        self._next = 0

    def hold(self, member: str, credential: FederatedCredential) -> int:
        self._next += 1
        self._held.setdefault(member, {})[self._next] = credential
        return self._next

    def release(self, member: str, slot: int) -> None:
        held = self._held.get(member)
        if held is not None:
            held.pop(slot, None)
            if not held:
                del self._held[member]

    def counted(
        self, member: str, credentials: list[FederatedCredential]
    ) -> list[FederatedCredential]:
        """``credentials`` and the held ones not among them (a held subject counts once)."""
        extra = [
            c
            for c in self._held.get(member, {}).values()
            if not any(x.issuer == c.issuer and x.subject == c.subject for x in credentials)
        ]
        return [*credentials, *extra]


def creates(existing: list[FederatedCredential], desired: FederatedCredential) -> bool:
    """Whether ``existing`` says: create ``desired`` (nothing for its issuer and subject, its name
    free, the budget not spent)."""
    return len(existing) < MAX_CREDENTIALS_PER_IDENTITY and not any(
        c.name == desired.name or (c.issuer == desired.issuer and c.subject == desired.subject)
        for c in existing
    )


class FederatedClusters:
    """``database.OtherClusters`` from the identity's credentials: the issuers other than this
    cluster's with a service-account subject (Kubernetes clusters; not GitHub's or a person's)."""

    def __init__(self, store: CredentialStore, issuer: IssuerSource) -> None:
        self._store = store
        self._issuer = issuer

    async def issuers(self, identity: str, client_id: str) -> list[str]:
        ref = identity_from_status(identity) or ApplicationRef(client_id=client_id.lower())
        try:
            resolved = await self._store.resolve(ref)
        except PermanentError as err:
            if err.reason is Reason.IDENTITY_NOT_FOUND:
                return []  # gone, and its credentials with it
            raise
        ours = await self._issuer.get()
        return sorted(
            {
                c.issuer
                for c in await self._store.list(resolved)
                if c.issuer != ours and c.subject.startswith(SUBJECT_PREFIX)
            }
        )


class IssuerSource:
    """The cluster's service-account issuer: configured, or discovered once and remembered."""

    def __init__(self, kube: KubeClient, configured: str | None = None) -> None:
        self._kube = kube
        self._issuer = configured
        self._lock = asyncio.Lock()

    async def get(self) -> str:
        if self._issuer is None:
            async with self._lock:
                if self._issuer is None:
                    try:
                        self._issuer = await self._kube.discover_issuer()
                    except ReconcileError as err:
                        raise _issuer_error(err) from err
        return self._issuer


def _issuer_error(err: ReconcileError) -> ReconcileError:
    return TransientError(
        Reason.ISSUER_UNAVAILABLE,
        f"cannot discover the cluster's issuer ({err.message}); set --issuer to configure it",
    )


def identity_key(ref: IdentityRef) -> str:
    """How status records the identity a credential lives on."""
    return ref.client_id if isinstance(ref, ApplicationRef) else ref.resource_id


def in_namespace(namespace: str, subject: str) -> bool:
    """Whether ``subject`` is a service account subject of ``namespace`` (and nothing else)."""
    prefix = subject_for(namespace, "")
    rest = subject[len(prefix) :]
    return subject.startswith(prefix) and bool(rest) and ":" not in rest


def identity_from_status(value: str) -> IdentityRef | None:
    if is_guid(value):
        return ApplicationRef(client_id=value.lower())
    return parse_managed_identity_id(value)


class IdentityNotes(Protocol):
    """Where the identities the operator federated are written down (``ledger.Ledger``)."""

    async def remember_identity(self, ref: IdentityRef) -> None: ...


class FederatedCredentialStep:
    condition = "FederatedCredentialReady"

    def __init__(
        self,
        store: CredentialStore,
        issuer: IssuerSource,
        kube: KubeClient,
        locks: KeyedLocks,
        backing: Backing | None = None,
        operator_client_id: str | None = None,
        identities: IdentityNotes | None = None,
        pools: PoolSource | None = None,
        growth: PoolGrowth | None = None,
    ) -> None:
        self._identities = identities
        self._pools = pools
        self._growth = growth
        self._operator_client_id = (operator_client_id or "").lower()
        self._store = store
        self._issuer = issuer
        self._kube = kube
        self._locks = locks
        self._backing = backing or Backing(kube, None)
        self._recent = RecentLists()
        self._slots = PoolSlots()

    async def reconcile(self, ctx: Context) -> StepResult:
        ctx.issuer = await self._issuer.get()
        ref, res = ctx.spec.identity, ctx.resource
        if ref.tenant_id and ref.tenant_id != ctx.operator_tenant:
            raise PermanentError(
                Reason.TENANT_NOT_MANAGED,
                f"spec.identity.tenantId is {ref.tenant_id}, but this operator manages identities "
                f"of tenant {ctx.operator_tenant} only",
            )
        sa = await self._kube.get_service_account(res.namespace, ctx.spec.service_account_name)
        ctx.service_account, ctx.service_account_read = sa, True  # for the next step
        await ensure_not_claimed(self._kube, sa, res)
        subject = subject_for(res.namespace, ctx.spec.service_account_name)
        desired = FederatedCredential(
            name=credential_name(ctx.issuer, res.namespace, ctx.spec.service_account_name),
            issuer=ctx.issuer,
            subject=subject,
            audiences=(ctx.spec.audience,),
            description=credential_description(ctx.issuer, Owner(res.namespace, res.name)),
        )
        if isinstance(ref, PoolRef):
            identity, credential = await self._pool_member(ctx, ref, desired)
        else:
            identity = ctx.identity = await self._store.resolve(ref)
            self._refuse_operator_identity(identity)
            if self._identities is not None:
                # Written ahead, once per identity: the sweep lists its credentials after a
                # restart too, whatever becomes of this resource (ledger.py).
                await self._identities.remember_identity(ref)
            async with self._locks.hold(ref.key):
                credential = await self._ensure(ctx, identity, desired)
        await self._remove_previous(ctx, identity, subject)
        member = identity.ref
        return StepResult(
            "True",
            "CredentialReady",
            f"{member.display} trusts {subject} from {ctx.issuer} "
            f"(credential {credential.name}"
            + (f"; member of pool {ref.name})" if isinstance(ref, PoolRef) else ")"),
            {
                "issuer": ctx.issuer,
                "subject": subject,
                "identity": {
                    "kind": member.kind,
                    "name": identity.name,
                    "clientId": identity.client_id,
                    "tenantId": identity.tenant_id,
                    "objectId": identity.object_id,
                    **({"pool": ref.name} if isinstance(ref, PoolRef) else {}),
                },
                "federatedCredential": {
                    "name": credential.name,
                    "id": credential.id or "",
                    "identity": identity_key(member),
                },
            },
        )

    def _refuse_operator_identity(self, identity: ResolvedIdentity) -> None:
        if identity.client_id.lower() == self._operator_client_id:
            raise PermanentError(
                Reason.INVALID_SPEC,
                f"spec.identity is {identity.ref.display}, the operator's own identity: no "
                "workload may borrow it (it administers every SQL server and identity the "
                "operator manages); use an identity of its own",
            )

    async def _pool(self, ref: PoolRef) -> Pool:
        if self._pools is None:
            raise PermanentError(
                Reason.POOL_NOT_FOUND,
                "spec.identity.poolName: this operator was started without SqlIdentityPools",
            )
        return await self._pools.get(ref.name)

    async def _pool_member(
        self, ctx: Context, ref: PoolRef, desired: FederatedCredential
    ) -> tuple[ResolvedIdentity, FederatedCredential]:
        """The member for this resource (``pool.py``) and its credential.

        Choices are made one at a time under the pool's lock; a choice holds a slot on its member
        (``_slots``, counted by the choices after it) until its credential is written under the
        member's own lock. The pool's lock is never held over a credential write, so resources on
        one pool write to several members at once."""
        recorded = identity_from_status(
            str((ctx.status.get("federatedCredential") or {}).get("identity", ""))
        )
        if not in_namespace(ctx.resource.namespace, str(ctx.status.get("subject") or "")):
            recorded = None  # status someone else wrote: not acted on
        why = ""
        if recorded is not None and (await self._pool(ref)).member(recorded.key) is not None:
            try:
                identity = await self._store.resolve(recorded)
                self._refuse_operator_identity(identity)
                return identity, await self._on_member(ctx, identity, desired)
            except PermanentError as err:
                if err.reason is Reason.IDENTITY_NOT_FOUND:
                    why = f"{recorded.display} no longer exists"
                elif err.reason is Reason.CREDENTIAL_LIMIT_REACHED:
                    why = f"{recorded.display} lost this credential and is full"
                else:
                    raise
        elif recorded is not None:
            why = f"{recorded.display} is no longer a member of pool {ref.name}"
        refused: set[str] = set()  # members Entra refused as full during this choice
        for attempt in range(POOL_CHOICE_ATTEMPTS):
            async with self._locks.hold(ref.key):  # one choice at a time per pool
                # Read under the lock: the pool as the last growth left it (status.grown).
                pool = await self._pool(ref)
                # Remembered lists first; every member full on them: on live ones. A refused
                # member is passed over (only it changed; listing every member live again,
                # under the pool's lock, stalled every other choice on the pool).
                chosen = await self._choose(ctx, pool, desired, False, refused)
                if chosen is None:
                    chosen = await self._choose(ctx, pool, desired, True, refused)
                assert chosen is not None  # a live choice grows the pool or raises
                slot = self._slots.hold(chosen.ref.key, desired)
            try:
                credential = await self._on_member(ctx, chosen, desired)
            except PermanentError as err:
                if err.reason is not Reason.CREDENTIAL_LIMIT_REACHED:
                    raise
                refused.add(chosen.ref.key)
                if attempt + 1 < POOL_CHOICE_ATTEMPTS:
                    continue  # filled meanwhile by others: choose again, without it
                # Not this resource's fault, nor for good: another cluster's operator keeps
                # taking the slots it chose (both fill the same members at once).
                raise TransientError(
                    Reason.CONCURRENT_WRITE,
                    f"{chosen.ref.display} was filled by others while this resource was placed "
                    f"on it, {POOL_CHOICE_ATTEMPTS} times in a row: choosing again",
                    1.0,
                ) from err
            finally:
                self._slots.release(chosen.ref.key, slot)
            was_member = (ctx.status.get("identity") or {}).get("pool") == pool.name
            if recorded is not None and recorded.key != chosen.ref.key and was_member:
                # (A spec that named another identity or pool before is no move: the previous
                # credential's removal says what happened to it.)
                ctx.record(
                    "PoolMemberChanged",
                    f"moved {desired.subject} from {recorded.display} to {chosen.ref.display} "
                    f"({why}); pods started before keep the old client id until they restart",
                    "Warning",
                )
            return chosen, credential
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _choose(
        self,
        ctx: Context,
        pool: Pool,
        desired: FederatedCredential,
        live: bool,
        refused: Collection[str] = (),
    ) -> ResolvedIdentity | None:
        """Under the pool's lock: the member for ``desired`` on the members' remembered lists
        (``live``: lists read now, all at once), counting the slots other choices hold and
        passing over the members in ``refused`` (Entra refused a write on them as full); None
        when the remembered lists show every member full; on live lists a full pool grows or
        raises ``PoolExhausted``."""
        resolved: list[ResolvedIdentity] = []
        missing: list[IdentityRef] = []
        for member in pool.members:
            try:
                identity = await self._store.resolve(member)
            except PermanentError as err:
                if err.reason is not Reason.IDENTITY_NOT_FOUND:
                    raise
                missing.append(member)
                continue
            if identity.client_id.lower() == self._operator_client_id:
                continue  # never the operator's own (a pool written by mistake)
            resolved.append(identity)
        known = {i.ref.key: None if live else self._recent.get(i.ref.key) for i in resolved}
        # Listed live here: what is not remembered (a refused member only on a live pass).
        fresh = {
            key for key, lists in known.items() if lists is None and (live or key not in refused)
        }
        unknown = [i for i in resolved if i.ref.key in fresh]
        for identity, now in zip(
            unknown, await asyncio.gather(*(self._list_member(i) for i in unknown)), strict=True
        ):
            known[identity.ref.key] = now

        def counted() -> list[tuple[ResolvedIdentity, list[FederatedCredential]]]:
            return [(i, self._slots.counted(i.ref.key, known[i.ref.key] or [])) for i in resolved]

        def open_() -> list[tuple[ResolvedIdentity, list[FederatedCredential]]]:
            return [(i, listed) for i, listed in counted() if i.ref.key not in refused]

        chosen = choose_member(pool, open_(), desired.issuer, desired.subject)
        # Entra refuses only a 21st credential: below it, the reserve is ours to keep, so a
        # member chosen on a remembered list is listed live first (another cluster may have
        # taken its last slot under the reserve since), and the choice made again.
        while chosen is not None and pool.reserved and chosen.ref.key not in fresh:
            known[chosen.ref.key] = await self._list_member(chosen)
            fresh.add(chosen.ref.key)
            chosen = choose_member(pool, open_(), desired.issuer, desired.subject)
        if chosen is not None or not live:
            return chosen
        if refused and choose_member(pool, counted(), desired.issuer, desired.subject):
            # Refused as full, yet listed with room: Entra's reads lag behind its writes. Not
            # a full pool (no growth, no PoolExhausted): the next pass chooses again.
            names = ", ".join(i.ref.display for i in resolved if i.ref.key in refused)
            raise TransientError(
                Reason.CONCURRENT_WRITE,
                f"Entra refused a credential on {names} as full (filled by others meanwhile) "
                "while its list still shows room: choosing again",
                1.0,
            )
        if not pool.can_grow or self._growth is None:
            raise exhausted(pool, counted(), missing)
        return await self._grow(ctx, pool)

    async def _list_member(self, identity: ResolvedIdentity) -> list[FederatedCredential]:
        """A member's credentials, listed and remembered under its lock: never while one of its
        writes is under way, whose credential the list could miss after the write's slot is
        given back (the choices after it would then count one too few)."""
        async with self._locks.hold(identity.ref.key):
            now = await self._store.list(identity)
            self._recent.put(identity.ref.key, now)
            return now

    async def _grow(self, ctx: Context, pool: Pool) -> ResolvedIdentity:
        """Every member is full and the pool may grow: one more member."""
        assert self._growth is not None
        ref = await self._growth.grow(pool)
        kind = "application" if isinstance(ref, ApplicationRef) else "managed identity"
        try:
            identity = await self._store.resolve(ref)
        except PermanentError as err:
            if err.reason is not Reason.IDENTITY_NOT_FOUND:
                raise
            raise TransientError(
                Reason.PROPAGATING,
                f"SqlIdentityPool {pool.name} grew by {ref.display}; Entra does not show it "
                "everywhere yet",
            ) from err
        ctx.record(
            "PoolGrown",
            f"every member of SqlIdentityPool {pool.name} was full: created {kind} "
            f"{identity.name} ({identity.client_id}), member {len(pool.members) + 1} of at most "
            f"{pool.max_members}",
        )
        return identity

    async def _on_member(
        self, ctx: Context, identity: ResolvedIdentity, desired: FederatedCredential
    ) -> FederatedCredential:
        ctx.identity = identity
        if self._identities is not None:
            await self._identities.remember_identity(identity.ref)
        async with self._locks.hold(identity.ref.key):
            return await self._ensure(ctx, identity, desired)

    async def _ensure(
        self, ctx: Context, identity: ResolvedIdentity, desired: FederatedCredential
    ) -> FederatedCredential:
        key = identity.ref.key
        first_pass = not (ctx.status.get("federatedCredential") or {}).get("name")
        recent = self._recent.get(key) if first_pass else None
        if recent is not None and creates(recent, desired):
            try:
                return await self._create(ctx, identity, desired)
            except PermanentError:
                pass  # refused (written since by someone else): decide again on a live list
        existing = await self._store.list(identity)
        self._recent.put(key, existing)
        mine = next(
            (c for c in existing if c.issuer == desired.issuer and c.subject == desired.subject),
            None,
        )
        if mine is not None:
            recorded = (ctx.status.get("federatedCredential") or {}).get("name")
            if recorded != mine.name:
                ctx.record(
                    "CredentialAdopted",
                    f"adopted existing credential {mine.name} on {identity.ref.display}",
                )
            wanted = dataclasses.replace(desired, name=mine.name, id=mine.id)
            # ARM credentials carry no description; Graph ones get ours back if edited.
            description_drifted = (
                isinstance(identity.ref, ApplicationRef) and mine.description != wanted.description
            )
            if mine.same_trust(wanted) and not description_drifted:
                return mine
            written = await self._store.upsert(identity, wanted)
            self._recent.forget(key)
            ctx.record(
                "CredentialUpdated",
                f"corrected credential {mine.name} on {identity.ref.display} "
                f"(audiences {list(mine.audiences)} -> {list(wanted.audiences)})",
            )
            return dataclasses.replace(written, id=written.id or mine.id)

        clash = next((c for c in existing if c.name == desired.name), None)
        if clash is not None:
            raise PermanentError(
                Reason.CREDENTIAL_CONFLICT,
                f"{identity.ref.display} already has a credential named {clash.name} for issuer "
                f"{clash.issuer} and subject {clash.subject}; the operator will not change it",
            )
        if len(existing) >= MAX_CREDENTIALS_PER_IDENTITY:
            ours = sum(1 for c in existing if c.issuer == desired.issuer)
            raise PermanentError(
                Reason.CREDENTIAL_LIMIT_REACHED,
                f"{identity.ref.display} already has {len(existing)} federated credentials "
                f"({ours} from this cluster, {len(existing) - ours} from other issuers); Entra "
                f"allows {MAX_CREDENTIALS_PER_IDENTITY}: remove unused ones or use another "
                "identity",
            )
        return await self._create(ctx, identity, desired)

    async def _create(
        self, ctx: Context, identity: ResolvedIdentity, desired: FederatedCredential
    ) -> FederatedCredential:
        try:
            written = await self._store.upsert(identity, desired)
        except ReconcileError:
            self._recent.forget(identity.ref.key)  # whatever it was, the next pass lists live
            raise
        self._recent.wrote(identity.ref.key, written)
        if written.id is None:
            # Graph answered 204: the name existed. Its reads lag behind its writes, so the list
            # can miss a credential written moments ago (by this operator, or before a restart);
            # the upsert changed nothing and created nothing. Keep the id status recorded.
            recorded = ctx.status.get("federatedCredential") or {}
            if recorded.get("name") == desired.name and recorded.get("id"):
                return dataclasses.replace(written, id=str(recorded["id"]))
            return written
        ctx.record(
            "CredentialCreated",
            f"created credential {desired.name} on {identity.ref.display} for {desired.subject}",
        )
        return written

    async def _remove_previous(
        self, ctx: Context, identity: ResolvedIdentity, subject: str
    ) -> None:
        """After a spec change, remove the credential status recorded for the old identity or
        subject. A permanent failure is reported and forgotten rather than blocking the new one."""
        recorded = ctx.status.get("federatedCredential") or {}
        old_ref = identity_from_status(str(recorded.get("identity", "")))
        old_subject = str(ctx.status.get("subject") or "")
        if old_ref is None or not recorded.get("name"):
            return
        if old_subject and not in_namespace(ctx.resource.namespace, old_subject):
            return  # not a subject this resource can have had: status was written by someone else
        if old_ref.key == identity.ref.key and old_subject == subject:
            return
        try:
            await self._delete_matching(ctx, old_ref, old_subject or subject)
        except PermanentError as err:
            ctx.record(
                "CredentialNotRemoved",
                f"could not remove the previous credential {recorded.get('name')} from "
                f"{old_ref.display}: {err.message}; remove it by hand",
                "Warning",
            )

    async def _delete_matching(self, ctx: Context, ref: IdentityRef, subject: str) -> None:
        """Delete the credentials of ``ref`` with this cluster's issuer and ``subject``."""
        try:
            identity = await self._store.resolve(ref)
        except PermanentError as err:
            if err.reason is Reason.IDENTITY_NOT_FOUND:
                return  # the identity is gone, and its credentials with it
            raise
        async with self._locks.hold(ref.key):
            self._recent.forget(ref.key)
            for credential in await self._store.list(identity):
                if credential.issuer == ctx.issuer and credential.subject == subject:
                    await self._store.delete(identity, credential.name)
                    ctx.record(
                        "CredentialDeleted",
                        f"deleted credential {credential.name} from {ref.display}",
                    )

    async def _backed_elsewhere(self, ctx: Context, ref: IdentityRef, subject: str) -> bool:
        """Whether another live resource that a current policy allows backs the credential of
        ``ref`` for ``subject`` (``backing.py``); never the service account's annotations, which
        the namespace's tenant can write."""
        parsed = parse_subject(subject)
        if parsed is None:
            return False
        return await self._backing.elsewhere(Grant(ref.key, *parsed), ctx.resource.uid)

    async def finalize(self, ctx: Context) -> None:
        if ctx.spec.retain_cloud_objects:
            ctx.record("CredentialRetained", "deletionPolicy is Retain: the credential stays")
            return
        ctx.issuer = await self._issuer.get()
        res = ctx.resource
        subject = subject_for(res.namespace, ctx.spec.service_account_name)
        named = ctx.spec.identity
        # A pool resource may have trusted its subject on any member: each is looked at (never
        # only the member its status records, which someone other than the operator may write).
        refs: list[IdentityRef] = (
            list(await self._pool_members(named)) if isinstance(named, PoolRef) else [named]
        )
        for ref in refs:
            if not await self._backed_elsewhere(ctx, ref, subject):
                await self._delete_matching(ctx, ref, subject)
        recorded = ctx.status.get("federatedCredential") or {}
        old_ref = identity_from_status(str(recorded.get("identity", "")))
        old_subject = str(ctx.status.get("subject") or subject)
        if (
            old_ref is not None
            and in_namespace(res.namespace, old_subject)
            and not (old_subject == subject and any(r.key == old_ref.key for r in refs))
            and not await self._backed_elsewhere(ctx, old_ref, old_subject)
        ):
            await self._delete_matching(ctx, old_ref, old_subject)

    async def _pool_members(self, ref: PoolRef) -> tuple[IdentityRef, ...]:
        """The pool's members; none if the pool is gone (the sweep then removes what is left on
        its former members, which nothing backs any more)."""
        if self._pools is None:
            return ()
        try:
            return (await self._pools.get(ref.name)).members
        except PermanentError:
            return ()

    def holds_grant(self, status: Mapping[str, Any]) -> bool:
        return bool((status.get("federatedCredential") or {}).get("name"))

    async def revoke(self, ctx: Context) -> StepResult:
        recorded = ctx.status.get("federatedCredential") or {}
        ref = identity_from_status(str(recorded.get("identity", "")))
        subject = str(ctx.status.get("subject") or "")
        cleared = {"federatedCredential": None}
        if ref is None or not in_namespace(ctx.resource.namespace, subject):
            return StepResult("False", Reason.NOT_AUTHORIZED, "no credential to revoke", cleared)
        ctx.issuer = await self._issuer.get()
        if await self._backed_elsewhere(ctx, ref, subject):
            return StepResult(
                "False",
                Reason.NOT_AUTHORIZED,
                f"the credential for {subject} stays: another SqlWorkloadIdentity of the "
                "namespace that a policy allows federates it",
                cleared,
            )
        await self._delete_matching(ctx, ref, subject)
        return StepResult(
            "False",
            Reason.NOT_AUTHORIZED,
            f"access revoked: the federated credential of {ref.display} for {subject} was removed",
            cleared,
        )
