"""The SqlWorkloadIdentity spec as typed values, validated with the CRD's own rules.

The CRD schema (crds/sqlidentity.io_sqlworkloadidentities.yaml) rejects bad input at
``kubectl apply``; this module checks the same rules again because the operator cannot know
that the installed CRD carries them (an older CRD, a hand-edited one). Every problem names its
field, like the API server's messages, and all problems are reported at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

DEFAULT_AUDIENCE = "api://AzureADTokenExchange"

# Always fullmatch: a pattern's `$` alone also matches before a trailing newline ("x\n"), where the
# API server's RE2 does not.
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def is_guid(value: object) -> bool:
    return isinstance(value, str) and bool(_GUID.fullmatch(value))


_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
# Exactly the CRDs' pattern (issue 18 found this parser looser): "/subscriptions/" in lower case,
# the fixed segments in any case, ASCII \w as the API server's RE2 has it; and their maxLength.
_MANAGED_IDENTITY_ID = re.compile(
    r"^/subscriptions/(?P<subscription>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}"
    r"-[0-9a-fA-F]{12})/(?i:resourceGroups)/(?P<group>[-\w.()]{1,90})/"
    r"(?i:providers/Microsoft\.ManagedIdentity/userAssignedIdentities)/"
    r"(?P<name>[A-Za-z0-9][A-Za-z0-9_-]{2,127})$",
    re.ASCII,
)
_MANAGED_IDENTITY_ID_MAX = 512
# A port 1-65535 without leading zeros, as the CRDs' patterns say: what the API server admits is
# exactly what the operator accepts.
SQL_PORT_PATTERN = (
    r"6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}"
)
SQL_SERVER = re.compile(
    r"^(?:tcp:)?(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
    rf"(?:,(?P<port>{SQL_PORT_PATTERN}))?$"
)
_SQL_DATABASE = re.compile(r"^[^\x00-\x1f\[\]]+$")
_SQL_ROLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_@$#-]*$")
_SQL_USER = re.compile(r"^[^\x00-\x1f\x7f]+$")  # any sysname; quoted wherever it is used
_SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


class SpecError(ValueError):
    """The spec breaks one or more rules; ``problems`` are ``(field path, message)`` pairs."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(f"{path}: {message}" for path, message in self.problems))


@dataclass(frozen=True)
class ApplicationRef:
    """An Entra app registration, by its application (client) id."""

    client_id: str
    tenant_id: str | None = None
    kind: Literal["Application"] = "Application"

    @property
    def key(self) -> str:
        """Identifies the identity across resources (for per-identity serialisation)."""
        return f"app:{self.client_id}"

    @property
    def display(self) -> str:
        return f"application {self.client_id}"


@dataclass(frozen=True)
class ManagedIdentityRef:
    """A user-assigned managed identity, by its ARM resource id."""

    resource_id: str
    subscription_id: str
    resource_group: str
    name: str
    tenant_id: str | None = None
    kind: Literal["ManagedIdentity"] = "ManagedIdentity"

    @property
    def key(self) -> str:
        # ARM resource ids are case-insensitive: one identity, one key.
        return f"mi:{self.resource_id.lower()}"

    @property
    def display(self) -> str:
        return f"managed identity {self.name} (resource group {self.resource_group})"


IdentityRef = ApplicationRef | ManagedIdentityRef

# An identity pool's name: what a SqlIdentityPool is called (a DNS-1123 subdomain, as any
# cluster-scoped object's name).
POOL_NAME_MAX = 253


@dataclass(frozen=True)
class PoolRef:
    """A SqlIdentityPool (``swi_operator.pool``): the operator picks one of its members."""

    name: str
    tenant_id: str | None = None
    kind: Literal["Pool"] = "Pool"

    @property
    def key(self) -> str:
        """What policies name and identity locks serialise on (``pool:<name>``)."""
        return f"pool:{self.name}"

    @property
    def display(self) -> str:
        return f"identity pool {self.name}"


# What a SqlWorkloadIdentity or a SqlIdentityPolicy names: one identity, or a pool of them.
NamedIdentity = ApplicationRef | ManagedIdentityRef | PoolRef


@dataclass(frozen=True)
class SelectorRequirement:
    key: str
    operator: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return labels.get(self.key) not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels  # DoesNotExist


@dataclass(frozen=True)
class LabelSelector:
    """Kubernetes label selector semantics: every matchLabels pair and every expression holds."""

    match_labels: Mapping[str, str] = field(default_factory=dict)
    match_expressions: tuple[SelectorRequirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items()) and all(
            req.matches(labels) for req in self.match_expressions
        )


@dataclass(frozen=True)
class SqlSpec:
    server: str
    database: str
    roles: tuple[str, ...] = ()
    user_name: str | None = None  # default: the identity's display name


@dataclass(frozen=True)
class Spec:
    service_account_name: str
    identity: NamedIdentity
    audience: str = DEFAULT_AUDIENCE
    workload_selector: LabelSelector | None = None
    sql: SqlSpec | None = None
    deletion_policy: Literal["Delete", "Retain"] = "Delete"

    @property
    def retain_cloud_objects(self) -> bool:
        return self.deletion_policy == "Retain"


def parse_managed_identity_id(resource_id: str) -> ManagedIdentityRef | None:
    if len(resource_id) > _MANAGED_IDENTITY_ID_MAX:
        return None
    match = _MANAGED_IDENTITY_ID.fullmatch(resource_id)
    if match is None:
        return None
    return ManagedIdentityRef(
        resource_id=resource_id,
        subscription_id=match["subscription"].lower(),
        resource_group=match["group"],
        name=match["name"],
    )


def parse_spec(raw: Mapping[str, Any]) -> Spec:
    """Validate ``raw`` (the resource's ``spec``) and return it typed; raise ``SpecError``."""
    problems: list[tuple[str, str]] = []

    sa = raw.get("serviceAccountName")
    if not isinstance(sa, str) or not sa:
        problems.append(("spec.serviceAccountName", "Required value"))
    elif len(sa) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(sa):
        problems.append(
            (
                "spec.serviceAccountName",
                f"Invalid value {sa!r}: must be a DNS-1123 subdomain (lower-case letters, digits, "
                "'-' and '.', at most 253 characters)",
            )
        )

    identity = _parse_identity(raw.get("identity"), problems)

    audience = raw.get("audience", DEFAULT_AUDIENCE)
    if not isinstance(audience, str) or not 1 <= len(audience) <= 600:
        problems.append(("spec.audience", "must be a non-empty string of at most 600 characters"))

    selector = _parse_workloads(raw.get("workloads"), problems)
    sql = _parse_sql(raw.get("sql"), problems)

    if isinstance(identity, PoolRef) and sql is not None and sql.user_name is not None:
        problems.append(
            (
                "spec.sql.userName",
                "not allowed with spec.identity.poolName: each member of the pool gets a "
                "database user of its own, named after it; remove spec.sql.userName",
            )
        )

    policy = raw.get("deletionPolicy", "Delete")
    if policy not in ("Delete", "Retain"):
        problems.append(
            ("spec.deletionPolicy", f'Unsupported value {policy!r}: "Delete" or "Retain"')
        )

    if problems or identity is None:
        raise SpecError(problems)
    return Spec(
        service_account_name=str(sa),
        identity=identity,
        audience=str(audience),
        workload_selector=selector,
        sql=sql,
        deletion_policy="Retain" if policy == "Retain" else "Delete",
    )


def _parse_identity(raw: object, problems: list[tuple[str, str]]) -> NamedIdentity | None:
    path = "spec.identity"
    if not isinstance(raw, Mapping):
        problems.append((path, "Required value"))
        return None
    tenant = raw.get("tenantId")
    if tenant is not None and not is_guid(tenant):
        problems.append((f"{path}.tenantId", f"Invalid value {tenant!r}: must be a GUID"))
        tenant = None
    app = raw.get("applicationClientId")
    mi = raw.get("managedIdentityResourceId")
    pool = raw.get("poolName")
    if sum(value is not None for value in (app, mi, pool)) != 1:
        problems.append(
            (
                path,
                "set exactly one of applicationClientId, managedIdentityResourceId or poolName",
            )
        )
        return None
    if pool is not None:
        if not is_pool_name(pool):
            problems.append(
                (
                    f"{path}.poolName",
                    f"Invalid value {pool!r}: must be the name of a SqlIdentityPool (a DNS-1123 "
                    "subdomain)",
                )
            )
            return None
        return PoolRef(name=str(pool), tenant_id=tenant.lower() if tenant else None)
    return parse_single_identity(path, app, mi, tenant, problems)


def is_pool_name(value: object) -> bool:
    return (
        isinstance(value, str)
        and len(value) <= POOL_NAME_MAX
        and bool(_DNS1123_SUBDOMAIN.fullmatch(value))
    )


def parse_single_identity(
    path: str, app: Any, mi: Any, tenant: Any, problems: list[tuple[str, str]]
) -> IdentityRef | None:
    if app is not None:
        if not is_guid(app):
            problems.append((f"{path}.applicationClientId", f"Invalid value {app!r}: not a GUID"))
            return None
        return ApplicationRef(client_id=app.lower(), tenant_id=tenant.lower() if tenant else None)
    ref = parse_managed_identity_id(mi) if isinstance(mi, str) else None
    if ref is None:
        problems.append(
            (
                f"{path}.managedIdentityResourceId",
                f"Invalid value {mi!r}: expected /subscriptions/<id>/resourceGroups/<group>/"
                "providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>",
            )
        )
        return None
    return ManagedIdentityRef(
        resource_id=ref.resource_id,
        subscription_id=ref.subscription_id,
        resource_group=ref.resource_group,
        name=ref.name,
        tenant_id=tenant.lower() if tenant else None,
    )


def _parse_workloads(raw: object, problems: list[tuple[str, str]]) -> LabelSelector | None:
    if raw is None:
        return None
    path = "spec.workloads"
    if not isinstance(raw, Mapping):
        problems.append((path, "must be an object"))
        return None
    selector = raw.get("selector")
    if selector is None:
        return None
    path += ".selector"
    if not isinstance(selector, Mapping):
        problems.append((path, "must be an object"))
        return None
    labels = selector.get("matchLabels") or {}
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        problems.append((f"{path}.matchLabels", "must map label keys to string values"))
        labels = {}
    requirements = []
    for i, expr in enumerate(selector.get("matchExpressions") or ()):
        epath = f"{path}.matchExpressions[{i}]"
        if not isinstance(expr, Mapping):
            problems.append((epath, "must be an object"))
            continue
        key, op, values = expr.get("key"), expr.get("operator"), tuple(expr.get("values") or ())
        if not isinstance(key, str) or not key:
            problems.append((f"{epath}.key", "Required value"))
            continue
        if op not in _SELECTOR_OPERATORS:
            problems.append(
                (f"{epath}.operator", f"Unsupported value {op!r}: {', '.join(_SELECTOR_OPERATORS)}")
            )
            continue
        if (op in ("In", "NotIn")) != bool(values):
            problems.append((epath, "In and NotIn need values; Exists and DoesNotExist take none"))
            continue
        requirements.append(SelectorRequirement(key, str(op), tuple(str(v) for v in values)))
    return LabelSelector(dict(labels), tuple(requirements))


def _parse_sql(raw: object, problems: list[tuple[str, str]]) -> SqlSpec | None:
    if raw is None:
        return None
    path = "spec.sql"
    if not isinstance(raw, Mapping):
        problems.append((path, "must be an object"))
        return None
    server, database, roles = raw.get("server"), raw.get("database"), raw.get("roles") or []
    ok = True
    if not isinstance(server, str) or len(server) > 260 or not SQL_SERVER.fullmatch(server):
        problems.append(
            (
                f"{path}.server",
                f"Invalid value {server!r}: expected host, tcp:host,port or host,port",
            )
        )
        ok = False
    if (
        not isinstance(database, str)
        or len(database) > 128
        or not _SQL_DATABASE.fullmatch(database)
    ):
        problems.append((f"{path}.database", f"Invalid value {database!r}"))
        ok = False
    if not isinstance(roles, list):
        problems.append((f"{path}.roles", "must be a list of role names"))
        return None
    for i, role in enumerate(roles):
        if not isinstance(role, str) or len(role) > 128 or not _SQL_ROLE.fullmatch(role):
            problems.append((f"{path}.roles[{i}]", f"Invalid value {role!r}: not a role name"))
            ok = False
    user = raw.get("userName")
    if user is not None and (
        not isinstance(user, str) or len(user) > 128 or not _SQL_USER.fullmatch(user)
    ):
        problems.append(
            (f"{path}.userName", f"Invalid value {user!r}: 1 to 128 characters, no control ones")
        )
        ok = False
    if not ok:
        return None
    return SqlSpec(
        server=str(server),
        database=str(database),
        roles=tuple(roles),
        user_name=str(user) if user is not None else None,
    )
