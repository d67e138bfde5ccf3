"""The emulated directory: tenants, sign-in principals and their federated identity credentials.

Flow: ``load_world`` reads the ``entra:`` section of ``sandbox/world.yaml`` into a frozen ``World``
(the seed). ``Directory.from_world`` builds the mutable in-memory state from it; ``reset`` rebuilds
it. Only federated identity credentials change at run time, so a snapshot (``--snapshot FILE``)
holds just those, keyed by the holder's client id, and is rewritten after every change.

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

    def credential_by_id(self, credential_id: str) -> FederatedCredential | None:
        return next((c for c in self.credentials.values() if c.id == credential_id), None)


@dataclass(frozen=True)
class World:
    """The parsed seed; ``principals`` are templates copied into every fresh ``Directory``."""

    tenants: tuple[Tenant, ...]
    subscription_id: str
    principals: tuple[Principal, ...]


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
    return World(tenants, _require(section, "subscription", "entra"), principals)


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
        self._build()
        if snapshot is not None and snapshot.exists():
            self._load_snapshot(snapshot)

    def reset(self) -> None:
        """Back to the seed: no federated credentials."""
        self._build()
        self.save()

    def _build(self) -> None:
        self.tenants = {t.id: t for t in self.world.tenants}
        principals = [_copy(p) for p in self.world.principals]
        self._by_client_id = {p.client_id.lower(): p for p in principals}
        self._by_sp_id = {p.sp_object_id.lower(): p for p in principals}
        self._by_app_object_id = {p.app_object_id.lower(): p for p in principals if p.app_object_id}

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
        return {(p.resource_group or "").lower() for p in self.managed_identities()}

    # -- writes ----------------------------------------------------------------------------
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
