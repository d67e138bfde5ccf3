"""DatabaseAccessReady: the identity has a contained user in ``spec.sql``'s database, with roles.

The operator works in the database as its own Entra identity (the server's Entra admin, or a member
of the admin group; ``sql.OdbcDatabase``). Read before write, under a lock per database user:

1. the roles asked for must exist in the database (none is granted otherwise:
   ``DatabaseRoleNotFound``);
2. the user: one whose SID is the identity's (its client id, as Azure SQL stores it) is the
   identity's user, whatever its name: kept, or adopted if the operator did not create it. A
   principal with the wanted name but another SID belongs to someone else: ``DatabaseUserConflict``,
   nothing is changed. Otherwise the user is created, ``WITH SID = <client id bytes>, TYPE = E``
   (no directory read needed) or, with ``--sql-user-form object-id``, ``FROM EXTERNAL PROVIDER
   WITH OBJECT_ID = '<service principal object id>'`` (the server's identity reads the directory).
   Its name is ``spec.sql.userName``, else the identity's display name;
3. roles: those listed but missing are added; those the operator added earlier
   (``status.databaseUser.grantedRoles``) and no longer listed are dropped; roles it did not grant
   are never touched.

Deletion (``deletionPolicy: Delete``), ``spec.sql`` removed, or moved to another database, user
name or identity: the user the operator created is dropped; from an adopted user only the roles
the operator granted are removed. Only a user whose SID is the recorded identity's is ever dropped.

Before it creates a user or grants a role, the step writes what it is about to do into the
ledger (``ledger.py``, out of tenants' reach), and removes the entry once it is undone: the sweep
drops what no live, allowed resource backs any more (``release_entry``), whatever status says.

Several clusters on one tenant share the database user: it is the identity's, and every cluster
federating the identity logs in as it, while each operator sees only its own cluster's resources.
So a user is neither dropped nor stripped of the roles this operator granted while the identity
trusts service accounts of another cluster's issuer (``OtherClusters``: a federated credential with
a ``system:serviceaccount:`` subject and another issuer). The ledger entry stays, and the sweep
undoes it once no other cluster is federated (issue 21: deleting the last resource in the cluster
that created the user cut the other cluster's pods off until its next drift check).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from swi_operator.cloud import ResolvedIdentity
from swi_operator.errors import PermanentError, Reason, TransientError
from swi_operator.ledger import Ledger, MemoryLedgerStore, UserEntry
from swi_operator.locks import KeyedLocks
from swi_operator.policy import server_key
from swi_operator.spec import ApplicationRef
from swi_operator.sql import (
    Database,
    Principal,
    SqlTarget,
    UserExists,
    quote_name,
    roles_in,
    sid_of,
)
from swi_operator.steps import Context, StepResult
from swi_operator.steps.federation import identity_key

UserForm = Literal["sid", "object-id"]
PUBLIC_ROLE = "public"  # every user is a member; it cannot be granted or dropped


class ServicePrincipals(Protocol):
    async def object_id(self, identity: ResolvedIdentity) -> str: ...


class OtherClusters(Protocol):
    async def issuers(self, identity: str, client_id: str) -> list[str]:
        """The other clusters' issuers the identity (as status records it; else the app of
        ``client_id``) trusts service accounts of."""
        ...


class Resources(Protocol):
    async def get_resource(self, namespace: str, name: str) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class DatabaseUserRecord:
    """``status.databaseUser``: what the operator made, so it can later undo exactly that."""

    name: str
    server: str
    database: str
    client_id: str
    roles: tuple[str, ...]
    granted_roles: tuple[str, ...]
    created: bool

    @property
    def target(self) -> SqlTarget:
        return SqlTarget(self.server, self.database)

    @classmethod
    def from_status(cls, status: Mapping[str, Any]) -> DatabaseUserRecord | None:
        raw = status.get("databaseUser")
        if not isinstance(raw, Mapping) or not all(
            raw.get(k) for k in ("name", "server", "database", "clientId")
        ):
            return None
        if server_key(str(raw["server"])) is None:
            return None  # not a server spec.sql could name (a forged ";..." keyword): ignored
        return cls(
            name=str(raw["name"]),
            server=str(raw["server"]),
            database=str(raw["database"]),
            client_id=str(raw["clientId"]),
            roles=tuple(str(r) for r in raw.get("roles") or ()),
            granted_roles=tuple(str(r) for r in raw.get("grantedRoles") or ()),
            created=bool(raw.get("created")),
        )

    def to_status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "server": self.server,
            "database": self.database,
            "clientId": self.client_id,
            "roles": list(self.roles),
            "grantedRoles": list(self.granted_roles),
            "created": self.created,
        }

    def same_user(self, target: SqlTarget, client_id: str) -> bool:
        """Whether this records the identity's user in ``target`` (a user is its SID: its name
        may differ from today's spec; the server may be spelled another way, ``tcp:host,1433``
        for ``host``: issue 18 found a re-spelled server dropping the user it had just kept)."""
        return (
            server_key(self.server) == server_key(target.server)
            and self.database == target.database
            and self.client_id.lower() == client_id.lower()
        )

    def entry(self, ctx: Context, identity: str = "") -> UserEntry:
        """This record as the ledger keeps it for ``ctx``'s resource."""
        return UserEntry(
            namespace=ctx.resource.namespace,
            resource=ctx.resource.name,
            uid=ctx.resource.uid,
            identity=identity,
            server=self.server,
            database=self.database,
            client_id=self.client_id,
            user=self.name,
            created=self.created,
            granted_roles=self.granted_roles,
        )


def _lock_key(target: SqlTarget, sid: bytes) -> str:
    return f"sql:{target.server.lower()}/{target.database}/{sid.hex()}"


def _holder(principal: Principal) -> str:
    kinds = {"R": "role", "X": "group", "E": "user", "S": "SQL user"}
    sid = f"SID 0x{principal.sid.hex().upper()}" if principal.sid else "no SID"
    return f"{kinds.get(principal.type, 'principal')} {quote_name(principal.name)} ({sid})"


class DatabaseAccessStep:
    condition = "DatabaseAccessReady"

    def __init__(
        self,
        database: Database,
        locks: KeyedLocks,
        user_form: UserForm = "sid",
        principals: ServicePrincipals | None = None,
        ledger: Ledger | None = None,
        resources: Resources | None = None,
        elsewhere: OtherClusters | None = None,
    ) -> None:
        if user_form == "object-id" and principals is None:
            raise ValueError("the object-id form needs service principal lookups")
        self._ledger = ledger or Ledger(MemoryLedgerStore())
        self._resources = resources  # None: every other ledger entry counts as live (unit tests)
        self._db = database
        self._locks = locks
        self._form = user_form
        self._principals = principals
        self._elsewhere = elsewhere  # None: no other cluster is asked about (unit tests)

    async def reconcile(self, ctx: Context) -> StepResult:
        recorded = DatabaseUserRecord.from_status(ctx.status)
        sql = ctx.spec.sql
        if sql is None:
            if recorded is not None:
                await self._release_previous(ctx, recorded)
            return StepResult(
                "True",
                "NotRequested",
                "spec.sql is not set: the operator manages no database access for it",
                {"databaseUser": None},
            )
        identity = ctx.require_identity()
        target = SqlTarget(sql.server, sql.database)
        name = sql.user_name or identity.name
        try:
            quote_name(name)
        except ValueError as err:
            raise PermanentError(
                Reason.INVALID_SPEC,
                f"the database user would be named after {identity.ref.display}, but {err}: "
                "set spec.sql.userName",
            ) from err
        sid = sid_of(identity.client_id)
        async with self._locks.hold(_lock_key(target, sid)):
            wanted, missing = roles_in(sql.roles, await self._db.role_names(target))
            if missing:
                raise PermanentError(
                    Reason.DATABASE_ROLE_NOT_FOUND,
                    f"{target.display} has no role {', '.join(map(quote_name, missing))}, so none "
                    "was granted: use existing roles (db_datareader, db_datawriter, ...) or create "
                    "the role in the database first",
                )
            previous = (
                recorded
                if recorded is not None and recorded.same_user(target, identity.client_id)
                else None
            )
            # What the ledger says this resource did here (if status was lost: a crash
            # between the CREATE USER and the status write, or status re-created).
            noted = await self._ledger.user(
                DatabaseUserRecord(
                    name, target.server, target.database, identity.client_id, (), (), False
                )
                .entry(ctx)
                .key
            )
            note = _Note(ctx, target, identity_key(identity.ref), identity.client_id, noted, wanted)
            user, created = await self._ensure_user(
                ctx, target, name, sid, identity, previous, note
            )
            note.created = created
            granted = await self._ensure_roles(ctx, target, user, wanted, previous, note)
            record = DatabaseUserRecord(
                name=user.name,
                server=target.server,
                database=target.database,
                client_id=identity.client_id,
                roles=tuple(sorted(wanted)),
                granted_roles=tuple(sorted(granted)),
                created=created,
            )
            # Also an adopted user with nothing granted: whoever created it then sees that
            # another resource uses it (``_release``, the sweep's hand-over).
            await self._ledger.put_user(record.entry(ctx, note.identity))
        if recorded is not None and previous is None:
            await self._release_previous(ctx, recorded)
        roles = ", ".join(record.roles) or "no roles"
        renamed = (
            f"; it is not named {quote_name(name)}: rename it with ALTER USER "
            f"{quote_name(user.name)} WITH NAME = {quote_name(name)} if that matters"
            if user.name.lower() != name.lower()
            else ""
        )
        return StepResult(
            "True",
            "AccessGranted",
            f"user {quote_name(user.name)} in {target.display} is {identity.ref.display} with "
            f"{roles}{renamed}",
            {"databaseUser": record.to_status()},
        )

    async def _refuse_ddl_triggers(self, allowed: bool, target: SqlTarget, doing: str) -> None:
        """A DDL trigger runs with the rights of whoever ran the statement, the operator's (the
        server's Entra admin) here: a tenant with db_ddladmin could make itself dbo through one.
        So no CREATE USER, ALTER ROLE or DROP USER where one exists, unless the policies say the
        database's triggers are trusted (``sql.allowDdlTriggers``: ``allowed``)."""
        if allowed:
            return
        triggers = await self._db.ddl_triggers(target)
        if triggers:
            raise PermanentError(
                Reason.DATABASE_HAS_DDL_TRIGGERS,
                f"{target.display} has DDL trigger{'s' if len(triggers) > 1 else ''} "
                f"{', '.join(map(quote_name, triggers))}, which would run with the operator's "
                f"admin rights, so it did not {doing}: drop the trigger (DROP TRIGGER ... ON "
                "DATABASE), or have the platform team set sql.allowDdlTriggers in the "
                "SqlIdentityPolicy if it is trusted",
            )

    async def _ensure_user(
        self,
        ctx: Context,
        target: SqlTarget,
        name: str,
        sid: bytes,
        identity: ResolvedIdentity,
        previous: DatabaseUserRecord | None,
        note: _Note,
    ) -> tuple[Principal, bool]:
        """The identity's user and whether the operator created it (found by SID first)."""
        found = await self._db.find_principals(target, name, sid)
        mine = next((p for p in found if p.sid == sid), None)
        if mine is not None:
            if previous is not None:
                return mine, previous.created
            if note.noted is not None and note.noted.created:
                return mine, True  # created by this resource, its status lost since
            ctx.record(
                "DatabaseUserAdopted",
                f"adopted the existing user {quote_name(mine.name)} of {identity.ref.display} in "
                f"{target.display}",
            )
            return mine, False
        clash = next((p for p in found if p.name.lower() == name.lower()), None)
        if clash is not None:
            raise PermanentError(
                Reason.DATABASE_USER_CONFLICT,
                f"{target.display} already has a {_holder(clash)} that is not "
                f"{identity.ref.display} (SID 0x{sid.hex().upper()}); the operator does not take "
                "it over: drop it, or set spec.sql.userName to another name",
            )
        await self._refuse_ddl_triggers(
            ctx.allow_ddl_triggers, target, f"create the user {quote_name(name)}"
        )
        # The roles it is about to grant the new user too: one ledger write, not two.
        planned = [role for role in note.wanted if role.lower() != PUBLIC_ROLE]
        await note.write(
            self._ledger, name, True, [*(previous.granted_roles if previous else ()), *planned]
        )
        object_id = None
        if self._form == "object-id":
            assert self._principals is not None
            object_id = await self._principals.object_id(identity)
        try:
            await self._db.create_user(target, name, sid, object_id)
        except UserExists as err:
            # Not ours: the note written ahead must not claim it (deletion would drop it).
            await note.write(self._ledger, name, False, previous.granted_roles if previous else ())
            raise TransientError(
                Reason.DATABASE_BUSY,
                f"{target.display} got a user {quote_name(name)} from another session while "
                "the operator was creating it (another cluster's operator on the same identity?): "
                "looking again",
                1.0,
            ) from err
        again = " again (it had been dropped)" if previous is not None else ""
        ctx.record(
            "DatabaseUserCreated",
            f"created the user {quote_name(name)} for {identity.ref.display} in "
            f"{target.display}{again}",
        )
        return Principal(name, "E", sid, frozenset()), True

    async def _ensure_roles(
        self,
        ctx: Context,
        target: SqlTarget,
        user: Principal,
        wanted: list[str],
        previous: DatabaseUserRecord | None,
        note: _Note,
    ) -> set[str]:
        """Add the missing roles, drop the ones the operator granted and no longer wanted; the
        roles the operator now holds granted (as the database spells them)."""
        current = {role.lower() for role in user.roles}
        before = previous or note.noted  # what this resource granted: status, else the ledger
        granted = {role.lower(): role for role in (before.granted_roles if before else ())}
        wanted_by_lower = {role.lower(): role for role in wanted if role.lower() != PUBLIC_ROLE}
        changes = [lower for lower in wanted_by_lower if lower not in current] + [
            lower for lower in granted if lower not in wanted_by_lower and lower in current
        ]
        if changes:
            await self._refuse_ddl_triggers(
                ctx.allow_ddl_triggers, target, f"change the roles of {user.name!r}"
            )
            adding = [wanted_by_lower[lower] for lower in changes if lower in wanted_by_lower]
            if adding:
                await note.write(
                    self._ledger, user.name, note.created, (*granted.values(), *adding)
                )
        for lower, role in sorted(wanted_by_lower.items()):
            if lower not in current:
                await self._db.set_role_member(target, role, user.name, member=True)
                granted[lower] = role
                ctx.record(
                    "DatabaseRoleGranted",
                    f"added {quote_name(user.name)} to {role} in {target.display}",
                )
        for lower, role in sorted(granted.items()):
            if lower not in wanted_by_lower and lower in current:
                await self._db.set_role_member(target, role, user.name, member=False)
                ctx.record(
                    "DatabaseRoleRevoked",
                    f"removed {quote_name(user.name)} from {role} in {target.display} (no longer "
                    "in spec.sql.roles)",
                )
        return {wanted_by_lower[lower] for lower in granted if lower in wanted_by_lower}

    async def _release(self, ctx: Context, recorded: DatabaseUserRecord) -> str:
        """Undo what ``recorded`` says the operator did; what was done, for messages."""
        expected = _own_client_id(ctx)
        if expected is not None and expected.lower() != recorded.client_id.lower():
            # status.databaseUser is written through the status subresource, which is not proof
            # that this resource's identity owns that user: never let it steer a DROP USER at a
            # user of another identity (another tenant's).
            done = (
                f"left the user {quote_name(recorded.name)} in {recorded.target.display} alone: "
                f"status.databaseUser names client id {recorded.client_id}, which is not this "
                "resource's identity; remove it by hand if it is really unused"
            )
            ctx.record("DatabaseUserNotRemoved", done, "Warning")
            return done
        mine = recorded.entry(ctx)
        # One release of a user at a time: resources sharing it that are deleted together
        # (`kubectl delete --all`) each saw the other alive, handed the user over to it, and
        # the last one read its ledger entry before the hand-over landed: nobody dropped it.
        async with self._locks.hold(f"release:{'/'.join(mine.user_key)}"):
            return await self._release_locked(ctx, recorded, mine)

    async def _release_locked(
        self, ctx: Context, recorded: DatabaseUserRecord, mine: UserEntry
    ) -> str:
        noted = await self._ledger.user(mine.key)
        created = recorded.created or (noted is not None and noted.created)
        granted = tuple({*recorded.granted_roles, *(noted.granted_roles if noted else ())})
        heir = None
        for other in await self._ledger.users():
            if (
                other.user_key == mine.user_key
                and other.uid != mine.uid
                and await self._live(other)
            ):
                heir = other
                break
        if heir is not None:
            # A shared identity: another resource (maybe of another namespace) uses the same
            # user. It stays, with its roles; whoever holds it now undoes it when it goes.
            await self._ledger.put_user(
                dataclasses.replace(
                    heir,
                    created=heir.created or created,
                    granted_roles=tuple(sorted({*heir.granted_roles, *granted})),
                )
            )
            await self._ledger.remove_user(mine)
            done = (
                f"left the user {quote_name(recorded.name)} in {recorded.target.display}: "
                f"SqlWorkloadIdentity {heir.namespace}/{heir.resource} uses it too"
            )
            ctx.record("DatabaseUserShared", done)
            return done
        identity = noted.identity if noted else mine.identity
        done, event, kept = await self._undo(
            recorded.target,
            recorded.name,
            recorded.client_id,
            created,
            granted,
            ctx.allow_ddl_triggers,
            identity,
        )
        if event:
            ctx.record(event, done)
        if kept:
            # The sweep drops it (or revokes the roles) once no other cluster is federated.
            await self._ledger.put_user(
                dataclasses.replace(
                    mine,
                    identity=identity,
                    created=created,
                    granted_roles=tuple(sorted(granted)),
                    released=True,
                )
            )
        else:
            await self._ledger.remove_user(mine)
        return done

    async def _live(self, entry: UserEntry) -> bool:
        """Whether the resource that made ``entry`` still exists (one left by ``Retain`` then
        delete does not keep a user another resource's deletion should drop: the sweep decides
        about what it left)."""
        if self._resources is None:
            return True
        body = await self._resources.get_resource(entry.namespace, entry.resource)
        meta = (body or {}).get("metadata") or {}
        return meta.get("uid") == entry.uid and not meta.get("deletionTimestamp")

    async def release_entry(self, entry: UserEntry) -> str | None:
        """Undo what a ledger entry records (the sweep: no live, allowed resource backs it any
        more); the entry is removed once done. No policy decides here, so a database with DDL
        triggers stays refused (``DatabaseHasDdlTriggers``). None: kept, and the entry with it,
        while another cluster is federated with the identity."""
        done, _, kept = await self._undo(
            entry.target,
            entry.user,
            entry.client_id,
            entry.created,
            entry.granted_roles,
            False,
            entry.identity,
        )
        if kept:
            return None
        await self._ledger.remove_user(entry)
        return done

    async def _undo(
        self,
        target: SqlTarget,
        name: str,
        client_id: str,
        created: bool,
        granted_roles: tuple[str, ...],
        allow_ddl_triggers: bool,
        identity: str = "",
    ) -> tuple[str, str | None, bool]:
        """Drop the user (``created``) or revoke ``granted_roles`` from it; what was done, the
        Event reason saying so (None: nothing was changed), and whether it was kept for another
        cluster (``OtherClusters``)."""
        sid = sid_of(client_id)
        async with self._locks.hold(_lock_key(target, sid)):
            found = await self._db.find_principals(target, name, sid)
            user = next((p for p in found if p.sid == sid), None)
            if user is None:
                gone = f"the user {quote_name(name)} was already gone from {target.display}"
                return gone, None, False
            held = {role.lower() for role in user.roles}
            revoked = [role for role in granted_roles if role.lower() in held]
            others = (
                await self._elsewhere.issuers(identity, client_id)
                if self._elsewhere is not None and (created or revoked)
                else []
            )
            if others:
                return (
                    f"kept the user {quote_name(user.name)} in {target.display}"
                    + (f" and its roles {', '.join(revoked)}" if revoked else "")
                    + f": the identity also trusts service accounts of {', '.join(others)}, "
                    "whose pods may log in as it; the sweep removes it once no other cluster is "
                    "federated",
                    "DatabaseUserKept",
                    True,
                )
            if created or revoked:
                await self._refuse_ddl_triggers(
                    allow_ddl_triggers,
                    target,
                    f"remove the user {quote_name(user.name)} or its roles",
                )
            if created:
                await self._db.drop_user(target, user.name)
                return (
                    f"dropped the user {quote_name(user.name)} from {target.display}",
                    "DatabaseUserDropped",
                    False,
                )
            for role in revoked:
                await self._db.set_role_member(target, role, user.name, member=False)
            if revoked:
                return (
                    f"removed {quote_name(user.name)} from {', '.join(revoked)} in "
                    f"{target.display} (the user existed before the operator, so it stays)",
                    "DatabaseRoleRevoked",
                    False,
                )
            as_found = f"left the user {quote_name(user.name)} in {target.display} as it found it"
            return as_found, None, False

    async def _release_previous(self, ctx: Context, recorded: DatabaseUserRecord) -> None:
        """After a spec change: a permanent failure is reported and forgotten rather than
        blocking the new database access (transient ones are retried)."""
        try:
            await self._release(ctx, recorded)
        except PermanentError as err:
            ctx.record(
                "DatabaseUserNotRemoved",
                f"could not remove the previous user {quote_name(recorded.name)} from "
                f"{recorded.target.display}: {err.message}; remove it by hand",
                "Warning",
            )

    async def finalize(self, ctx: Context) -> None:
        recorded = DatabaseUserRecord.from_status(ctx.status)
        if recorded is None:
            return
        if ctx.spec.retain_cloud_objects:
            ctx.record(
                "DatabaseUserRetained",
                f"deletionPolicy is Retain: the user {quote_name(recorded.name)} stays in "
                f"{recorded.target.display}",
            )
            return
        await self._release(ctx, recorded)

    # Revocable (swi_operator.steps): a policy that stops allowing the resource takes access back.

    def holds_grant(self, status: Mapping[str, Any]) -> bool:
        return DatabaseUserRecord.from_status(status) is not None

    async def revoke(self, ctx: Context) -> StepResult:
        recorded = DatabaseUserRecord.from_status(ctx.status)
        done = await self._release(ctx, recorded) if recorded else "no database access"
        return StepResult("False", "Revoked", done, {"databaseUser": None})


def _own_client_id(ctx: Context) -> str | None:
    """This resource's identity's client id: resolved when the pipeline ran the federation step,
    else straight from the spec for an app registration. None for a managed identity not looked
    up yet (at deletion): its record is then trusted, as the shipped roles never let a namespace
    team write status (docs/security.md)."""
    if ctx.identity is not None:
        return ctx.identity.client_id
    if isinstance(ctx.spec.identity, ApplicationRef):
        return ctx.spec.identity.client_id
    return None


@dataclass
class _Note:
    """Writes ahead into the ledger what a reconcile is about to do in one database."""

    ctx: Context
    target: SqlTarget
    identity: str  # federation.identity_key of the resource's identity
    client_id: str
    noted: UserEntry | None  # what the ledger held for this resource and user before
    wanted: list[str]  # the roles spec.sql asks for (as the database spells them)
    created: bool = False

    async def write(
        self, ledger: Ledger, user: str, created: bool, granted: tuple[str, ...] | list[str]
    ) -> None:
        self.created = created
        earlier = self.noted.granted_roles if self.noted else ()
        await ledger.put_user(
            UserEntry(
                namespace=self.ctx.resource.namespace,
                resource=self.ctx.resource.name,
                uid=self.ctx.resource.uid,
                identity=self.identity,
                server=self.target.server,
                database=self.target.database,
                client_id=self.client_id,
                user=user,
                created=created,
                granted_roles=tuple(sorted({*earlier, *granted})),
            )
        )
