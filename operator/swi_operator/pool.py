"""SqlIdentityPool: identities with identical access, past Entra's 20 credentials per identity.

Entra allows at most 20 federated identity credentials on one app registration or user-assigned
managed identity, and its wildcard ("flexible") credentials do not accept Kubernetes issuers. A
pool is cluster-scoped and written by the platform team, like a policy: its ``spec.members`` are
identities (app registrations and managed identities) meant to have the same access, and
``spec.reservedPerMember`` credentials of each are left to others (people, other tools). A
SqlWorkloadIdentity names the pool (``spec.identity.poolName``) instead of one identity, and the
federated credential step (``steps.federation``) picks the member:

1. the member its status records, while that is still a member of the pool: a drift check or a
   restart never moves a service account (the credential step then works on that member alone);
2. otherwise (a first pass, or the recorded member left the pool, or it is full and its
   credential is gone): the first member, in ``spec.members`` order, that already holds a
   credential for this cluster's issuer and the service account's subject (adopted), else the
   first one whose credentials, counting every cluster's and every person's, are fewer than
   ``20 - reservedPerMember``; none: ``PoolExhausted``, naming each member's count.

Choices are made under the pool's lock (``pool:<name>``), so that concurrent resources do not
fill the same last slot twice; each member's credential writes run under that member's own lock,
as for a resource that names it directly. A move says so in an Event (``PoolMemberChanged``).

Policies govern a pool as they govern one identity: a SqlIdentityPolicy names the pool
(``spec.identity.poolName``). What a pool resource backs (``backing.py``) is the credential of its
service account on *every* member of the pool: never what its status says, which is how a
tenant could point the sweep elsewhere. Database access: one contained user per member (named
after it), with the roles of the resource's ``spec.sql`` (docs/operator.md explains the choice).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from swi_operator.cloud import MAX_CREDENTIALS_PER_IDENTITY, FederatedCredential, ResolvedIdentity
from swi_operator.errors import PermanentError, Reason
from swi_operator.spec import (
    ApplicationRef,
    IdentityRef,
    ManagedIdentityRef,
    SpecError,
    is_guid,
    is_pool_name,
    parse_single_identity,
)

log = logging.getLogger(__name__)

POOL_CACHE_S = 2.0
MAX_LISTED = 100  # spec.members: written by people
MAX_MEMBERS = 500  # spec.growth.maxMembers: listed and grown, 10,000 credentials in all


@dataclass(frozen=True)
class Pool:
    name: str
    members: tuple[IdentityRef, ...]  # spec.members, then the members it grew (status.grown)
    reserved: int = 0  # credentials per member left to others
    max_members: int = 0  # spec.growth.maxMembers: grow up to this many; 0: never grow
    prefix: str = ""  # spec.growth.displayNamePrefix: grown members are <prefix>-<n>
    grown: tuple[tuple[IdentityRef, str], ...] = ()  # the grown members and their names
    # spec.growth.managedIdentity: grow by user-assigned managed identities in this resource group
    # (/subscriptions/<id>/resourceGroups/<name>) and location, not by app registrations
    identity_group: str = ""
    location: str = ""

    @property
    def can_grow(self) -> bool:
        return len(self.members) < self.max_members

    def next_name(self) -> str:
        """The display name of the next member to grow: the first ``<prefix>-<n>`` not used."""
        used = {name for _, name in self.grown}
        n = 1
        while f"{self.prefix}-{n}" in used:
            n += 1
        return f"{self.prefix}-{n}"

    @property
    def capacity(self) -> int:
        """Credentials a member may hold (all issuers) before the operator stops adding more."""
        return MAX_CREDENTIALS_PER_IDENTITY - self.reserved

    @property
    def member_keys(self) -> frozenset[str]:
        return frozenset(ref.key for ref in self.members)

    def member(self, key: str) -> IdentityRef | None:
        return next((ref for ref in self.members if ref.key == key), None)


def parse_pool(body: Mapping[str, Any]) -> Pool:
    """A SqlIdentityPool as typed values; ``SpecError`` naming each bad field."""
    name = (body.get("metadata") or {}).get("name")
    raw = body.get("spec") or {}
    problems: list[tuple[str, str]] = []
    if not is_pool_name(name):
        problems.append(("metadata.name", f"Invalid value {name!r}"))
    members: list[IdentityRef] = []
    listed = raw.get("members")
    if not isinstance(listed, list) or not listed:
        problems.append(("spec.members", "Required value: at least one identity"))
        listed = []
    elif len(listed) > MAX_LISTED:
        problems.append(("spec.members", f"Too many: {len(listed)}, at most {MAX_LISTED}"))
    for i, item in enumerate(listed):
        path = f"spec.members[{i}]"
        if not isinstance(item, Mapping):
            problems.append((path, "must be an object"))
            continue
        app, mi = item.get("applicationClientId"), item.get("managedIdentityResourceId")
        if (app is None) == (mi is None):
            problems.append(
                (path, "set exactly one of applicationClientId or managedIdentityResourceId")
            )
            continue
        ref = parse_single_identity(path, app, mi, None, problems)
        if ref is None:
            continue
        if any(m.key == ref.key for m in members):
            problems.append((path, f"Duplicate value: {ref.display} is listed twice"))
            continue
        members.append(ref)
    reserved = raw.get("reservedPerMember", 0)
    if (
        not isinstance(reserved, int)
        or isinstance(reserved, bool)
        or not 0 <= reserved < MAX_CREDENTIALS_PER_IDENTITY
    ):
        problems.append(
            (
                "spec.reservedPerMember",
                f"Invalid value {reserved!r}: 0 to {MAX_CREDENTIALS_PER_IDENTITY - 1}",
            )
        )
        reserved = 0
    max_members, prefix = 0, f"swi-pool-{name}"
    growth = raw.get("growth")
    if growth is not None:
        if not isinstance(growth, Mapping):
            problems.append(("spec.growth", "must be an object"))
            growth = {}
        max_members = growth.get("maxMembers", 0)
        if (
            not isinstance(max_members, int)
            or isinstance(max_members, bool)
            or not 0 <= max_members <= MAX_MEMBERS
        ):
            problems.append(
                ("spec.growth.maxMembers", f"Invalid value {max_members!r}: 0 to {MAX_MEMBERS}")
            )
            max_members = 0
        given = growth.get("displayNamePrefix")
        if given is not None:
            if not isinstance(given, str) or not 1 <= len(given) <= 100:
                problems.append(
                    (
                        "spec.growth.displayNamePrefix",
                        f"Invalid value {given!r}: 1 to 100 characters",
                    )
                )
            else:
                prefix = given
        identity_group, location = _parse_identity_growth(growth.get("managedIdentity"), problems)
        if growth.get("managedIdentity") is not None and not _IDENTITY_PREFIX.fullmatch(prefix):
            problems.append(
                (
                    "spec.growth.displayNamePrefix",
                    f"Invalid value {prefix!r}: managed identity names take letters, digits, - "
                    "and _ (3 to 128 characters, a letter or digit first); set "
                    "spec.growth.displayNamePrefix",
                )
            )
    else:
        identity_group, location = "", ""
    status = body.get("status")
    grown: list[tuple[IdentityRef, str]] = []
    for item in (status.get("grown") or []) if isinstance(status, Mapping) else []:
        if not isinstance(item, Mapping):
            continue
        ref = grown_ref(item)
        if ref is None:
            continue  # the operator writes these; anything else is ignored, never trusted
        grown.append((ref, str(item.get("name") or "")))
        if not any(m.key == ref.key for m in members):
            members.append(ref)
    if problems:
        raise SpecError(problems)
    return Pool(
        str(name),
        tuple(members),
        int(reserved),
        int(max_members),
        prefix,
        tuple(grown),
        identity_group,
        location,
    )


_IDENTITY_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{1,120}")  # plus "-<n>": an ARM name
_RESOURCE_GROUP_ID = re.compile(
    r"/subscriptions/[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"/resourceGroups/[-\w.()]{1,90}",
    re.IGNORECASE,
)


def _parse_identity_growth(raw: object, problems: list[tuple[str, str]]) -> tuple[str, str]:
    """spec.growth.managedIdentity: (resource group id, location), or ("", "") for apps."""
    if raw is None:
        return "", ""
    path = "spec.growth.managedIdentity"
    if not isinstance(raw, Mapping):
        problems.append((path, "must be an object"))
        return "", ""
    group, location = raw.get("resourceGroupId"), raw.get("location")
    if not isinstance(group, str) or _RESOURCE_GROUP_ID.fullmatch(group) is None:
        problems.append(
            (
                f"{path}.resourceGroupId",
                f"Invalid value {group!r}: expected /subscriptions/<id>/resourceGroups/<name>",
            )
        )
        group = ""
    if not isinstance(location, str) or not location.strip():
        problems.append((f"{path}.location", "Required value: an Azure region, e.g. eastus"))
        location = ""
    return str(group), str(location)


def grown_ref(item: Mapping[str, Any]) -> IdentityRef | None:
    """The member a ``status.grown`` entry records (its ``applicationClientId`` or
    ``managedIdentityResourceId``), or None if it is not one."""
    app, mi = item.get("applicationClientId"), item.get("managedIdentityResourceId")
    if is_guid(app):
        return ApplicationRef(str(app).lower())
    if isinstance(mi, str):
        return parse_single_identity("status.grown", None, mi, None, [])
    return None


def grown_entry(ref: IdentityRef, name: str) -> dict[str, str]:
    """The ``status.grown`` entry of a grown member."""
    if isinstance(ref, ApplicationRef):
        return {"applicationClientId": ref.client_id, "name": name}
    assert isinstance(ref, ManagedIdentityRef)
    return {"managedIdentityResourceId": ref.resource_id, "name": name}


class PoolReader(Protocol):
    async def list_pools(self) -> list[dict[str, Any]] | None: ...


class PoolSource:
    """The cluster's pools, read at most every ``POOL_CACHE_S`` (and again after ``invalidate``,
    which the pool watch calls on every change)."""

    def __init__(self, reader: PoolReader, ttl: float = POOL_CACHE_S) -> None:
        self._reader = reader
        self._ttl = ttl
        self._cached: tuple[float, dict[str, Pool | SpecError]] | None = None
        self._epoch = 0  # invalidations so far
        self._lock = asyncio.Lock()

    def invalidate(self) -> None:
        self._cached = None
        self._epoch += 1

    async def all(self) -> dict[str, Pool | SpecError]:
        """Every pool by name: parsed, or the problems that make it unusable."""
        async with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] <= self._ttl:
                return self._cached[1]
            epoch = self._epoch
            pools = parse_pools(await self._reader.list_pools() or [])
            # A list that an invalidation overtook (a growth's status write, a watch event)
            # may predate it: used this once, never kept for the next reader.
            if epoch == self._epoch:
                self._cached = (now, pools)
            return pools

    async def get(self, name: str) -> Pool:
        """The pool ``name``; ``PermanentError(PoolNotFound)`` if it is missing or invalid."""
        found = (await self.all()).get(name)
        if isinstance(found, Pool):
            return found
        if found is None:
            raise PermanentError(
                Reason.POOL_NOT_FOUND,
                f"spec.identity.poolName: no SqlIdentityPool named {name}; a platform "
                "administrator must create it (kubectl get sqlidentitypools lists them)",
            )
        raise PermanentError(
            Reason.POOL_NOT_FOUND,
            f"spec.identity.poolName: SqlIdentityPool {name} is invalid ({found}); a platform "
            "administrator must fix it",
        )

    async def members(self) -> dict[str, frozenset[str]]:
        """Each valid pool's members' identity keys, by pool name (``backing.PoolMembers``)."""
        return member_keys(await self.all())


def member_keys(pools: Mapping[str, Pool | SpecError]) -> dict[str, frozenset[str]]:
    return {name: p.member_keys for name, p in pools.items() if isinstance(p, Pool)}


def parse_pools(bodies: Sequence[Mapping[str, Any]]) -> dict[str, Pool | SpecError]:
    """Every pool by name: parsed, or the problems that make it unusable."""
    parsed: dict[str, Pool | SpecError] = {}
    for body in bodies:
        name = str((body.get("metadata") or {}).get("name") or "")
        try:
            parsed[name] = parse_pool(body)
        except SpecError as err:
            parsed[name] = err
    return parsed


def holds(credentials: Sequence[FederatedCredential], issuer: str, subject: str) -> bool:
    return any(c.issuer == issuer and c.subject == subject for c in credentials)


def choose_member(
    pool: Pool,
    listed: Sequence[tuple[ResolvedIdentity, Sequence[FederatedCredential]]],
    issuer: str,
    subject: str,
) -> ResolvedIdentity | None:
    """The member (of ``listed``, in pool order) for ``subject``: one that already trusts it,
    else the first with room under the pool's capacity; None when every one is full."""
    for identity, credentials in listed:
        if holds(credentials, issuer, subject):
            return identity
    for identity, credentials in listed:
        if len(credentials) < pool.capacity:
            return identity
    return None


def exhausted(
    pool: Pool,
    listed: Sequence[tuple[ResolvedIdentity, Sequence[FederatedCredential]]],
    missing: Sequence[IdentityRef],
) -> PermanentError:
    counts = ", ".join(
        f"{identity.ref.display} {len(credentials)}/{MAX_CREDENTIALS_PER_IDENTITY}"
        for identity, credentials in listed
    )
    gone = f"; not found in Entra: {', '.join(ref.display for ref in missing)}" if missing else ""
    reserve = f", {pool.reserved} of each reserved for others" if pool.reserved else ""
    grew = (
        f"; it has grown to its spec.growth.maxMembers ({pool.max_members})"
        if pool.max_members
        else ""
    )
    return PermanentError(
        Reason.POOL_EXHAUSTED,
        f"every member of SqlIdentityPool {pool.name} is full ({counts}{reserve}{gone}{grew}): a "
        "platform administrator must add members to its spec.members"
        + (" or raise spec.growth.maxMembers" if pool.max_members else ""),
    )


class AppMaker(Protocol):
    async def ensure(self, display_name: str) -> str: ...


class IdentityMaker(Protocol):
    async def ensure_identity(self, resource_group_id: str, name: str, location: str) -> str:
        """Create (or find) a user-assigned managed identity; its resource id."""
        ...


class PoolStatusWriter(Protocol):
    async def patch_pool_status(self, name: str, status: Mapping[str, Any]) -> None: ...


class PoolGrowth:
    """Grows a full pool by one member (``spec.growth``): an app registration made (or adopted by
    its name) through ``cloud.applications``, or with ``spec.growth.managedIdentity`` a
    user-assigned managed identity created through ARM (a PUT of its name: one of that name is
    adopted, so two clusters growing one pool at once meet on it), then recorded in the pool's
    ``status.grown``, which only the operator writes (the pool is cluster-scoped: namespace teams
    cannot touch it)."""

    def __init__(
        self,
        apps: AppMaker,
        kube: PoolStatusWriter,
        pools: PoolSource,
        identities: IdentityMaker | None = None,
    ) -> None:
        self._apps = apps
        self._identities = identities
        self._kube = kube
        self._pools = pools

    async def grow(self, pool: Pool) -> IdentityRef:
        name = pool.next_name()
        ref: IdentityRef | None
        if pool.identity_group:
            if self._identities is None:
                raise PermanentError(
                    Reason.POOL_EXHAUSTED,
                    f"SqlIdentityPool {pool.name} grows by managed identities, but this operator "
                    "has no ARM client",
                )
            resource_id = await self._identities.ensure_identity(
                pool.identity_group, name, pool.location
            )
            ref = parse_single_identity("managed identity", None, resource_id, None, [])
            if ref is None:
                raise PermanentError(
                    Reason.CREDENTIAL_REJECTED,
                    f"ARM answered the creation of {name} with resource id {resource_id!r}",
                )
        else:
            ref = ApplicationRef((await self._apps.ensure(name)).lower())
        grown = [grown_entry(r, n) for r, n in pool.grown]
        grown.append(grown_entry(ref, name))
        await self._kube.patch_pool_status(pool.name, {"grown": grown})
        self._pools.invalidate()
        log.info("SqlIdentityPool %s grew: %s (%s)", pool.name, name, ref.display)
        return ref
