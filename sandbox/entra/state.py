"""The emulated directory: tenants, sign-in principals and their federated identity credentials.

Flow: ``load_world`` reads the ``entra:`` section of ``sandbox/world.yaml`` into a frozen ``World``
(the seed). ``Directory.from_world`` builds the mutable in-memory state from it; ``reset`` rebuilds
it. Only federated identity credentials change at run time, so a snapshot (``--snapshot FILE``)
holds just those, keyed by the holder's client id, and is rewritten after every change.
Applications, service principals, managed identities and security groups can also be created at
run time (Graph and ARM); those objects live in memory only (a restart or ``reset`` is back to the
seed), and the snapshot keeps credentials of seeded principals only.

An app registration and a user-assigned managed identity are both a ``Principal``: something with
a client id and a service principal that can sign in at the token endpoint. Apps hold their
credentials through Graph, managed identities through ARM; the token endpoint matches assertions
against either the same way. The credential rules both surfaces share (name syntax, one audience,
unique issuer+subject, 20 per holder) live here as ``CredentialProblem`` values; Graph and ARM each
turn them into their own error codes and texts.
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_WORLD = Path(__file__).resolve().parent.parent / "world.yaml"
DEMO_APP = "SP-AZURESQL-USER"  # the seed's service principal, exported as AZ_CLIENT_ID/SECRET
MAX_CREDENTIALS = 20
MAX_FIELD_LENGTH = 600
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{2,119}")

PrincipalKind = Literal["application", "managedIdentity"]


class WorldError(ValueError):
    """The world file is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class Tenant:
    id: str
    domain: str


@dataclass
class FederatedCredential:
    """One federated identity credential; ``updated_at`` (real time) drives propagation."""

    id: str
    name: str
    issuer: str
    subject: str
    audiences: list[str]
    description: str | None
    updated_at: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FederatedCredential:
        return cls(
            id=str(data["id"]),
            name=str(data["name"]),
            issuer=str(data["issuer"]),
            subject=str(data["subject"]),
            audiences=[str(a) for a in data["audiences"]],
            description=data.get("description"),
            updated_at=float(data.get("updated_at", 0.0)),
        )


@dataclass
class Principal:
    """An app registration or a user-assigned managed identity (with its service principal)."""

    kind: PrincipalKind
    name: str
    tenant_id: str
    client_id: str
    sp_object_id: str
    app_object_id: str | None = None  # applications only
    resource_group: str | None = None  # managed identities only
    secrets: list[str] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)  # Graph application permissions granted
    owners: set[str] = field(default_factory=set)  # service principal object ids (apps)
    writers: set[str] = field(default_factory=set)  # service principal object ids (identities)
    credentials: dict[str, FederatedCredential] = field(default_factory=dict)  # by name
    # An application registered through Graph has no service principal until one is created for
    # it (POST /servicePrincipals); seeded principals and managed identities always have one.
    has_service_principal: bool = True
    location: str = "eastus"  # managed identities only (ARM)
    created: str = ""  # applications made through Graph: createdDateTime (seeded ones: none)
    tags: dict[str, str] = field(default_factory=dict)  # managed identities only (ARM)

    def credential_by_id(self, credential_id: str) -> FederatedCredential | None:
        return next((c for c in self.credentials.values() if c.id == credential_id), None)


@dataclass
class Group:
    """A security group (Graph ``group`` with ``securityEnabled`` and not ``mailEnabled``).

    ``owners`` and ``members`` hold directory object ids: service principals, and for members
    also other groups (nesting, which ``transitiveMemberOf`` follows).
    """

    id: str
    tenant_id: str
    display_name: str
    mail_nickname: str
    description: str | None
    created: str
    owners: set[str] = field(default_factory=set)
    members: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class ResourceGroup:
    """A resource group and who holds Managed Identity Contributor on all of it (sp object ids)."""

    name: str
    contributors: frozenset[str]


@dataclass(frozen=True)
class World:
    """The parsed seed; ``principals`` are templates copied into every fresh ``Directory``."""

    tenants: tuple[Tenant, ...]
    subscription_id: str
    principals: tuple[Principal, ...]
    resource_groups: tuple[ResourceGroup, ...] = ()


class CredentialProblem(enum.Enum):
    """Why a federated credential write is rejected (each surface words it its own way)."""

    BAD_NAME = "bad_name"
    AUDIENCE_COUNT = "audience_count"
    EMPTY_FIELD = "empty_field"
    FIELD_TOO_LONG = "field_too_long"
    DUPLICATE_ISSUER_SUBJECT = "duplicate_issuer_subject"
    LIMIT_REACHED = "limit_reached"


def valid_credential_name(name: str) -> bool:
    return _NAME_RE.fullmatch(name) is not None


def check_credential(
    holder: Principal, name: str, issuer: str, subject: str, audiences: list[str]
) -> CredentialProblem | None:
    """Validate a create-or-replace of credential ``name`` on ``holder``."""
    if not valid_credential_name(name):
        return CredentialProblem.BAD_NAME
    if len(audiences) != 1:
        return CredentialProblem.AUDIENCE_COUNT
    if not issuer or not subject or not audiences[0]:
        return CredentialProblem.EMPTY_FIELD
    if max(len(issuer), len(subject), len(audiences[0])) > MAX_FIELD_LENGTH:
        return CredentialProblem.FIELD_TOO_LONG
    for other in holder.credentials.values():
        if other.name != name and other.issuer == issuer and other.subject == subject:
            return CredentialProblem.DUPLICATE_ISSUER_SUBJECT
    if name not in holder.credentials and len(holder.credentials) >= MAX_CREDENTIALS:
        return CredentialProblem.LIMIT_REACHED
    return None


def _require(entry: dict[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise WorldError(f"{where}: '{key}' is required")
    return value


def load_world(path: Path) -> World:
    """Parse the ``entra:`` section of the world file."""
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise WorldError(f"cannot read world file {path}: {exc}") from exc
    section = document.get("entra") if isinstance(document, dict) else None
    if not isinstance(section, dict):
        raise WorldError(f"{path}: no 'entra:' section")
    tenants = tuple(
        Tenant(_require(t, "id", "entra.tenants"), _require(t, "domain", "entra.tenants"))
        for t in section.get("tenants") or []
    )
    tenant_ids = {t.id for t in tenants}
    apps: list[Principal] = []
    for entry in section.get("applications") or []:
        where = f"entra.applications[{entry.get('name')}]"
        apps.append(
            Principal(
                kind="application",
                name=_require(entry, "name", where),
                tenant_id=_require(entry, "tenant", where),
                client_id=_require(entry, "appId", where),
                app_object_id=_require(entry, "objectId", where),
                sp_object_id=_require(entry, "servicePrincipalObjectId", where),
                secrets=[str(s) for s in entry.get("secrets") or []],
                roles=[str(r) for r in entry.get("roles") or []],
            )
        )
    sp_by_app_name = {a.name: a.sp_object_id for a in apps}

    def principals_named(names: list[str], where: str) -> set[str]:
        missing = [n for n in names if n not in sp_by_app_name]
        if missing:
            raise WorldError(f"{where}: unknown application(s) {missing}")
        return {sp_by_app_name[n] for n in names}

    for app, entry in zip(apps, section.get("applications") or [], strict=True):
        app.owners = principals_named(entry.get("owners") or [], f"{app.name}.owners")
    identities: list[Principal] = []
    for entry in section.get("managedIdentities") or []:
        where = f"entra.managedIdentities[{entry.get('name')}]"
        identities.append(
            Principal(
                kind="managedIdentity",
                name=_require(entry, "name", where),
                tenant_id=_require(entry, "tenant", where),
                client_id=_require(entry, "clientId", where),
                sp_object_id=_require(entry, "principalId", where),
                resource_group=_require(entry, "resourceGroup", where),
                writers=principals_named(entry.get("writers") or [], f"{where}.writers"),
            )
        )
    principals = tuple(apps + identities)
    for p in principals:
        if p.tenant_id not in tenant_ids:
            raise WorldError(f"{p.name}: tenant {p.tenant_id} is not in entra.tenants")
    resource_groups = tuple(
        ResourceGroup(
            _require(entry, "name", "entra.resourceGroups"),
            frozenset(
                principals_named(
                    entry.get("managedIdentityContributors") or [],
                    f"entra.resourceGroups[{entry.get('name')}].managedIdentityContributors",
                )
            ),
        )
        for entry in section.get("resourceGroups") or []
    )
    return World(tenants, _require(section, "subscription", "entra"), principals, resource_groups)


def _copy(template: Principal) -> Principal:
    return Principal(
        kind=template.kind,
        name=template.name,
        tenant_id=template.tenant_id,
        client_id=template.client_id,
        sp_object_id=template.sp_object_id,
        app_object_id=template.app_object_id,
        resource_group=template.resource_group,
        secrets=list(template.secrets),
        roles=list(template.roles),
        owners=set(template.owners),
        writers=set(template.writers),
    )


class Directory:
    """Mutable state with the indexes the surfaces look things up by."""

    def __init__(self, world: World, snapshot: Path | None = None) -> None:
        self.world = world
        self.snapshot = snapshot
        self.tenants: dict[str, Tenant] = {}
        self._by_client_id: dict[str, Principal] = {}
        self._by_sp_id: dict[str, Principal] = {}
        self._by_app_object_id: dict[str, Principal] = {}
        self.groups: dict[str, Group] = {}  # by lower-case object id
        self._build()
        if snapshot is not None and snapshot.exists():
            self._load_snapshot(snapshot)

    def reset(self) -> None:
        """Back to the seed: no federated credentials."""
        self._build()
        self.save()

    def _build(self) -> None:
        self.tenants = {t.id: t for t in self.world.tenants}
        self._by_client_id, self._by_sp_id, self._by_app_object_id = {}, {}, {}
        for p in self.world.principals:
            self._index(_copy(p))
        self.groups = {}

    def _index(self, p: Principal) -> None:
        self._by_client_id[p.client_id.lower()] = p
        if p.has_service_principal:
            self._by_sp_id[p.sp_object_id.lower()] = p
        if p.app_object_id:
            self._by_app_object_id[p.app_object_id.lower()] = p

    # -- lookups ---------------------------------------------------------------------------
    def tenant(self, key: str) -> Tenant | None:
        """Find a tenant by id or by domain (both case-insensitive, as Entra does)."""
        key = key.lower()
        return next((t for t in self.tenants.values() if key in (t.id, t.domain.lower())), None)

    def principals(self) -> Iterator[Principal]:
        return iter(self._by_client_id.values())

    def by_client_id(self, client_id: str) -> Principal | None:
        return self._by_client_id.get(client_id.lower())

    def by_sp_object_id(self, object_id: str) -> Principal | None:
        return self._by_sp_id.get(object_id.lower())

    def application(self, object_id: str) -> Principal | None:
        return self._by_app_object_id.get(object_id.lower())

    def managed_identity(self, resource_group: str, name: str) -> Principal | None:
        return next(
            (
                p
                for p in self.managed_identities()
                if (p.resource_group or "").lower() == resource_group.lower()
                and p.name.lower() == name.lower()
            ),
            None,
        )

    def managed_identities(self, resource_group: str | None = None) -> list[Principal]:
        return [
            p
            for p in self._by_client_id.values()
            if p.kind == "managedIdentity"
            and (
                resource_group is None or (p.resource_group or "").lower() == resource_group.lower()
            )
        ]

    def resource_groups(self) -> set[str]:
        seeded = {rg.name.lower() for rg in self.world.resource_groups}
        return seeded | {(p.resource_group or "").lower() for p in self.managed_identities()}

    def may_write_identity(self, sp_object_id: str, resource_group: str, name: str) -> bool:
        """Managed Identity Contributor on the identity itself or on its whole resource group."""
        identity = self.managed_identity(resource_group, name)
        if identity is not None and sp_object_id in identity.writers:
            return True
        return any(
            rg.name.lower() == resource_group.lower() and sp_object_id in rg.contributors
            for rg in self.world.resource_groups
        )

    def group(self, object_id: str) -> Group | None:
        return self.groups.get(object_id.lower())

    def directory_object(self, object_id: str) -> Principal | Group | None:
        """A service principal or a group by object id (what ``directoryObjects/{id}`` names)."""
        return self.by_sp_object_id(object_id) or self.group(object_id)

    def member_of(self, object_id: str, *, transitive: bool) -> list[Group]:
        """The groups ``object_id`` is a member of; with ``transitive``, through nesting too."""
        found: dict[str, Group] = {}
        frontier = {object_id.lower()}
        while frontier:
            direct = [
                g
                for g in self.groups.values()
                if g.id not in found and {m.lower() for m in g.members} & frontier
            ]
            for g in direct:
                found[g.id] = g
            frontier = {g.id.lower() for g in direct} if transitive else set()
        return sorted(found.values(), key=lambda g: g.display_name.lower())

    def _forget_member(self, object_id: str) -> None:
        for g in self.groups.values():
            g.members.discard(object_id)
            g.owners.discard(object_id)

    # -- writes ----------------------------------------------------------------------------
    def create_application(self, tenant_id: str, name: str, owners: set[str]) -> Principal:
        """A new app registration (no service principal yet), with fresh ids."""
        app = Principal(
            kind="application",
            name=name,
            tenant_id=tenant_id,
            client_id=str(uuid.uuid4()),
            sp_object_id=str(uuid.uuid4()),
            app_object_id=str(uuid.uuid4()),
            owners=set(owners),
            has_service_principal=False,
            created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        )
        self._index(app)
        return app

    def create_service_principal(self, app: Principal, owners: set[str]) -> None:
        app.has_service_principal = True
        app.owners |= owners
        self._index(app)

    def create_managed_identity(
        self, tenant_id: str, resource_group: str, name: str, location: str, tags: dict[str, str]
    ) -> Principal:
        identity = Principal(
            kind="managedIdentity",
            name=name,
            tenant_id=tenant_id,
            client_id=str(uuid.uuid4()),
            sp_object_id=str(uuid.uuid4()),
            resource_group=resource_group,
            location=location,
            tags=dict(tags),
        )
        self._index(identity)
        return identity

    def delete_principal(self, principal: Principal) -> None:
        """An app registration or managed identity, gone with its service principal, its
        credentials and its group memberships."""
        self._by_client_id.pop(principal.client_id.lower(), None)
        self._by_sp_id.pop(principal.sp_object_id.lower(), None)
        if principal.app_object_id:
            self._by_app_object_id.pop(principal.app_object_id.lower(), None)
        self._forget_member(principal.sp_object_id)
        if principal.credentials:
            principal.credentials.clear()
            self.save()

    def create_group(
        self,
        tenant_id: str,
        display_name: str,
        mail_nickname: str,
        description: str | None,
        owners: set[str],
        members: set[str],
        created: str,
    ) -> Group:
        group = Group(
            id=str(uuid.uuid4()),
            tenant_id=tenant_id,
            display_name=display_name,
            mail_nickname=mail_nickname,
            description=description,
            created=created,
            owners=set(owners),
            members=set(members),
        )
        self.groups[group.id.lower()] = group
        return group

    def delete_group(self, group: Group) -> None:
        self.groups.pop(group.id.lower(), None)
        self._forget_member(group.id)

    def put_credential(
        self,
        holder: Principal,
        name: str,
        issuer: str,
        subject: str,
        audiences: list[str],
        description: str | None,
        now: float,
    ) -> tuple[FederatedCredential, bool]:
        """Create or replace; returns the credential and whether it was created. Validate first.

        ``updated_at`` (which starts the propagation delay) moves only when what the token
        endpoint matches on changes: rewriting the same issuer, subject and audience, or just the
        description, does not make a working credential stop working.
        """
        existing = holder.credentials.get(name)
        matching = (issuer, subject, list(audiences))
        unchanged = existing is not None and (
            (existing.issuer, existing.subject, existing.audiences) == matching
        )
        credential = FederatedCredential(
            id=existing.id if existing else str(uuid.uuid4()),
            name=name,
            issuer=issuer,
            subject=subject,
            audiences=list(audiences),
            description=description,
            updated_at=existing.updated_at if existing and unchanged else now,
        )
        holder.credentials[name] = credential
        self.save()
        return credential, existing is None

    def delete_credential(self, holder: Principal, name: str) -> bool:
        removed = holder.credentials.pop(name, None) is not None
        if removed:
            self.save()
        return removed

    # -- snapshot --------------------------------------------------------------------------
    def save(self) -> None:
        if self.snapshot is None:
            return
        document = {
            "version": 1,
            "credentials": {
                p.client_id: [c.to_json() for c in p.credentials.values()]
                for p in self.principals()
                if p.credentials
            },
        }
        self.snapshot.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.snapshot.with_suffix(self.snapshot.suffix + ".tmp")
        tmp.write_text(json.dumps(document, indent=1))
        tmp.replace(self.snapshot)

    def _load_snapshot(self, path: Path) -> None:
        try:
            document = json.loads(path.read_text())
            for client_id, credentials in document.get("credentials", {}).items():
                holder = self.by_client_id(client_id)
                if holder is None:
                    continue  # the world no longer has this principal: drop its credentials
                for data in credentials:
                    credential = FederatedCredential.from_json(data)
                    holder.credentials[credential.name] = credential
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise WorldError(f"cannot load snapshot {path}: {exc}") from exc
