"""SqlIdentityPolicy: which namespaces may bind which identity, and what database access it may get.

Pure logic, no I/O and no kopf: the reconcile gate (``steps.authorization``), the validating
admission webhook (``policy_webhook``) and the policy status review (``policy_review``) all call
``authorize`` with the same inputs and so give the same answer, in the same words.

A policy is cluster-scoped and written by the platform team. It names exactly one identity (an app
registration's client id or a managed identity's resource id; immutable, so a policy can never be
turned into a grant of another identity), the namespaces that may bind it (by name, or by a label
selector over Namespace objects), and optionally the SQL servers, databases and roles resources
bound to it may ask for. Roles default to ``db_datareader`` and ``db_datawriter``; anything else
(``db_ddladmin``, ``db_owner``, a custom role) must be listed explicitly.

The decision for a SqlWorkloadIdentity in namespace N with identity I (``authorize``):

1. The policies about I. None: with ``requirePolicy`` (the default) the resource is not
   authorised; without it, an identity no policy mentions is unrestricted (so policies can be
   introduced one identity at a time). An identity that some policy mentions is always restricted.
2. Of those, the ones whose namespaces include N. None: not authorised (whatever requirePolicy).
3. Narrower wins: only the most specific of those govern. A policy that lists N by name is
   narrower than one that selects N by labels, which is narrower than one whose empty selector
   selects every namespace. Policies equally narrow all govern, and the resource must satisfy
   every one of them (so between equals, the stricter grant holds).
4. With ``spec.sql``, every governing policy must allow its server, its database and each of its
   roles; with ``deletionPolicy: Retain``, every governing policy must set ``allowRetain`` (the
   sweep keeps what a deleted resource retained only while such a policy allows it). Names
   compare as Azure SQL does: server host names and database and role names case-insensitively,
   the server's ``tcp:`` prefix and default port 1433 aside. Matching is exact: no prefixes, no
   patterns.

Every refusal names what is missing (the identity, the namespace, the server, the database, the
roles) and the policies consulted, so a tenant knows what to ask the platform team for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from swi_operator.spec import (
    SQL_SERVER,
    ApplicationRef,
    LabelSelector,
    NamedIdentity,
    PoolRef,
    SelectorRequirement,
    SpecError,
    SqlSpec,
    is_guid,
    is_pool_name,
    parse_managed_identity_id,
)

DEFAULT_ROLES = ("db_datareader", "db_datawriter")
DEFAULT_SQL_PORT = 1433

# Ranks of a policy's namespace match: lower is narrower.
BY_NAME, BY_SELECTOR, EVERY_NAMESPACE = 0, 1, 2
_RANK_WORDS = {
    BY_NAME: "lists it by name",
    BY_SELECTOR: "selects it by labels",
    EVERY_NAMESPACE: "selects every namespace",
}

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_ROLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_@$#-]*$")
_DATABASE = re.compile(r"^[^\x00-\x1f\[\]]+$")
_SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


@dataclass(frozen=True, order=True)
class ServerKey:
    """A SQL server as a connection reaches it: lower-case host name and port."""

    host: str
    port: int = DEFAULT_SQL_PORT

    def __str__(self) -> str:
        return self.host if self.port == DEFAULT_SQL_PORT else f"{self.host},{self.port}"


def server_key(server: str) -> ServerKey | None:
    """``myserver.database.windows.net``, ``tcp:host,port`` or ``host,port``; None if invalid."""
    match = SQL_SERVER.fullmatch(server)
    if match is None:
        return None
    port = int(match["port"]) if match["port"] else DEFAULT_SQL_PORT
    return ServerKey(match["host"].lower(), port)


@dataclass(frozen=True)
class NamespaceScope:
    names: frozenset[str] = frozenset()
    selector: LabelSelector | None = None

    def rank(self, namespace: str, labels: Mapping[str, str]) -> int | None:
        """How narrowly this scope includes ``namespace`` (BY_NAME...); None if it does not."""
        if namespace in self.names:
            return BY_NAME
        if self.selector is None or not self.selector.matches(labels):
            return None
        empty = not self.selector.match_labels and not self.selector.match_expressions
        return EVERY_NAMESPACE if empty else BY_SELECTOR


@dataclass(frozen=True)
class SqlGrant:
    servers: frozenset[ServerKey]
    databases: frozenset[str]  # casefolded
    roles: frozenset[str]  # casefolded
    role_names: tuple[str, ...]  # as written, for messages
    allow_ddl_triggers: bool = False  # databases with DDL triggers (steps/database.py)


@dataclass(frozen=True)
class Policy:
    name: str
    identity_key: (
        str  # NamedIdentity.key: app:<client id>, mi:<resource id, lower case>, pool:<name>
    )
    identity_display: str
    namespaces: NamespaceScope
    sql: SqlGrant | None = None
    generation: int = 0
    allow_retain: bool = False  # resources may use deletionPolicy: Retain
    identity: NamedIdentity | None = field(default=None, compare=False)  # what identity_key names


@dataclass(frozen=True)
class Decision:
    allowed: bool
    message: str
    governing: tuple[str, ...] = ()  # names of the policies that decided
    checked_identity: bool = True  # False: no policy mentions the identity (requirePolicy off)
    allow_ddl_triggers: bool = False  # every governing policy's sql.allowDdlTriggers


@dataclass(frozen=True)
class ParsedPolicies:
    """Every policy in the cluster: the valid ones, and why the others grant nothing."""

    valid: tuple[Policy, ...] = ()
    invalid: Mapping[str, SpecError] = field(default_factory=dict)


# --- parsing ----------------------------------------------------------------------------------


def parse_policy(body: Mapping[str, Any]) -> Policy:
    """A SqlIdentityPolicy object as the API server returns it; raise ``SpecError``.

    The CRD validates the same rules; they are checked again because an invalid policy must grant
    nothing rather than crash the operator or grant more than it says.
    """
    meta = body.get("metadata") or {}
    raw = body.get("spec")
    problems: list[tuple[str, str]] = []
    if not isinstance(raw, Mapping):
        raise SpecError([("spec", "Required value")])
    identity = _policy_identity(raw.get("identity"), problems)
    scope = _scope(raw.get("namespaces"), problems)
    sql = _grant(raw.get("sql"), problems)
    allow_retain = raw.get("allowRetain", False)
    if not isinstance(allow_retain, bool):
        problems.append(("spec.allowRetain", f"Invalid value {allow_retain!r}: true or false"))
    if problems or identity is None or scope is None:
        raise SpecError(problems or [("spec", "invalid")])
    return Policy(
        name=str(meta.get("name", "")),
        identity_key=identity.key,
        identity_display=identity.display,
        namespaces=scope,
        sql=sql,
        generation=int(meta.get("generation") or 0),
        allow_retain=allow_retain is True,
        identity=identity,
    )


def parse_policies(
    bodies: Sequence[Mapping[str, Any]], memo: PolicyMemo | None = None
) -> ParsedPolicies:
    """Every policy parsed; with ``memo``, a policy parsed before at the same uid and generation
    is not parsed again (the list is read again after every policy's status write, and parsing
    every policy for every read was a thirtieth of the operator's CPU while onboarding)."""
    valid: list[Policy] = []
    invalid: dict[str, SpecError] = {}
    seen: dict[tuple[str, int], Policy | SpecError] = {}
    for body in bodies:
        meta = body.get("metadata") or {}
        key = (str(meta.get("uid") or ""), int(meta.get("generation") or 0))
        parsed = memo.known.get(key) if memo is not None and key[0] else None
        if parsed is None:
            try:
                parsed = parse_policy(body)
            except SpecError as err:
                parsed = err
        if key[0]:
            seen[key] = parsed
        if isinstance(parsed, SpecError):
            invalid[str(meta.get("name", ""))] = parsed
        else:
            valid.append(parsed)
    if memo is not None:
        memo.known = seen  # policies deleted or changed since are forgotten
    return ParsedPolicies(tuple(valid), invalid)


@dataclass
class PolicyMemo:
    """What ``parse_policies`` made of each policy, by uid and ``metadata.generation`` (which
    the API server raises on every change of the spec; name and generation are all of the
    metadata a parse reads)."""

    known: dict[tuple[str, int], Policy | SpecError] = field(default_factory=dict)


def _policy_identity(raw: object, problems: list[tuple[str, str]]) -> NamedIdentity | None:
    path = "spec.identity"
    if not isinstance(raw, Mapping):
        problems.append((path, "Required value"))
        return None
    app, mi = raw.get("applicationClientId"), raw.get("managedIdentityResourceId")
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
            problems.append((f"{path}.poolName", f"Invalid value {pool!r}: not a pool name"))
            return None
        return PoolRef(name=str(pool))
    if app is not None:
        if not is_guid(app):
            problems.append((f"{path}.applicationClientId", f"Invalid value {app!r}: not a GUID"))
            return None
        return ApplicationRef(client_id=str(app).lower())
    ref = parse_managed_identity_id(mi) if isinstance(mi, str) else None
    if ref is None:
        problems.append(
            (f"{path}.managedIdentityResourceId", f"Invalid value {mi!r}: not a resource id")
        )
    return ref


def _selector(raw: object, path: str, problems: list[tuple[str, str]]) -> LabelSelector | None:
    if not isinstance(raw, Mapping):
        problems.append((path, "must be an object"))
        return None
    labels = raw.get("matchLabels") or {}
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        problems.append((f"{path}.matchLabels", "must map label keys to string values"))
        return None
    requirements: list[SelectorRequirement] = []
    expressions = raw.get("matchExpressions") or []
    if not isinstance(expressions, list):
        problems.append((f"{path}.matchExpressions", "must be a list"))
        return None
    for i, expr in enumerate(expressions):
        epath = f"{path}.matchExpressions[{i}]"
        if not isinstance(expr, Mapping):
            problems.append((epath, "must be an object"))
            return None
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if not isinstance(key, str) or not key:
            problems.append((f"{epath}.key", "Required value"))
            return None
        if op not in _SELECTOR_OPERATORS:
            problems.append(
                (f"{epath}.operator", f"Unsupported value {op!r}: {', '.join(_SELECTOR_OPERATORS)}")
            )
            return None
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            problems.append((f"{epath}.values", "must be a list of strings"))
            return None
        if (op in ("In", "NotIn")) != bool(values):
            problems.append((epath, "In and NotIn need values; Exists and DoesNotExist take none"))
            return None
        requirements.append(SelectorRequirement(key, str(op), tuple(values)))
    return LabelSelector(dict(labels), tuple(requirements))


def _scope(raw: object, problems: list[tuple[str, str]]) -> NamespaceScope | None:
    path = "spec.namespaces"
    if not isinstance(raw, Mapping):
        problems.append((path, "Required value"))
        return None
    names = raw.get("names") or []
    if not isinstance(names, list):
        problems.append((f"{path}.names", "must be a list of namespace names"))
        return None
    ok = True
    for i, name in enumerate(names):
        if not isinstance(name, str) or not _DNS1123_LABEL.fullmatch(name):
            problems.append((f"{path}.names[{i}]", f"Invalid value {name!r}: not a namespace name"))
            ok = False
    selector = None
    if raw.get("selector") is not None:
        selector = _selector(raw["selector"], f"{path}.selector", problems)
        ok = ok and selector is not None
    if not names and raw.get("selector") is None:
        problems.append((path, "set names, selector or both"))
        ok = False
    return NamespaceScope(frozenset(names), selector) if ok else None


def _grant(raw: object, problems: list[tuple[str, str]]) -> SqlGrant | None:
    if raw is None:
        return None
    path = "spec.sql"
    if not isinstance(raw, Mapping):
        problems.append((path, "must be an object"))
        return None
    servers: set[ServerKey] = set()
    databases: set[str] = set()
    ok = True
    raw_servers, raw_databases = raw.get("servers"), raw.get("databases")
    if not isinstance(raw_servers, list) or not raw_servers:
        problems.append((f"{path}.servers", "Required value: at least one server"))
        ok = False
    else:
        for i, server in enumerate(raw_servers):
            key = server_key(server) if isinstance(server, str) and len(server) <= 260 else None
            if key is None:
                problems.append((f"{path}.servers[{i}]", f"Invalid value {server!r}"))
                ok = False
            else:
                servers.add(key)
    if not isinstance(raw_databases, list) or not raw_databases:
        problems.append((f"{path}.databases", "Required value: at least one database"))
        ok = False
    else:
        for i, database in enumerate(raw_databases):
            if (
                not isinstance(database, str)
                or len(database) > 128
                or not _DATABASE.fullmatch(database)
            ):
                problems.append((f"{path}.databases[{i}]", f"Invalid value {database!r}"))
                ok = False
            else:
                databases.add(database.casefold())
    raw_roles = raw.get("roles")
    roles = list(DEFAULT_ROLES) if raw_roles is None else raw_roles
    if not isinstance(roles, list):
        problems.append((f"{path}.roles", "must be a list of role names"))
        return None
    for i, role in enumerate(roles):
        if not isinstance(role, str) or len(role) > 128 or not _ROLE.fullmatch(role):
            problems.append((f"{path}.roles[{i}]", f"Invalid value {role!r}: not a role name"))
            ok = False
    triggers = raw.get("allowDdlTriggers", False)
    if not isinstance(triggers, bool):
        problems.append((f"{path}.allowDdlTriggers", f"Invalid value {triggers!r}: true or false"))
        ok = False
    if not ok:
        return None
    return SqlGrant(
        frozenset(servers),
        frozenset(databases),
        frozenset(r.casefold() for r in roles),
        tuple(roles),
        triggers is True,
    )


# --- the decision -----------------------------------------------------------------------------


def needs_namespace_labels(policies: Iterable[Policy], namespace: str) -> bool:
    """Whether deciding for ``namespace`` can depend on its labels (so they must be read)."""
    return any(
        p.namespaces.selector is not None and namespace not in p.namespaces.names for p in policies
    )


def _names(policies: Sequence[Policy]) -> str:
    return ", ".join(p.name for p in policies)


def sql_problems(policy: Policy, sql: SqlSpec) -> list[str]:
    """What ``policy`` does not allow of ``sql`` (empty: it allows all of it)."""
    grant = policy.sql
    if grant is None:
        return [f"SqlIdentityPolicy {policy.name} grants no database access (it has no spec.sql)"]
    problems = []
    key = server_key(sql.server)
    if key is None or key not in grant.servers:
        allowed = ", ".join(sorted(str(s) for s in grant.servers))
        problems.append(
            f"SqlIdentityPolicy {policy.name} does not allow server {sql.server} "
            f"(allowed: {allowed})"
        )
    if sql.database.casefold() not in grant.databases:
        allowed = ", ".join(sorted(grant.databases))
        problems.append(
            f"SqlIdentityPolicy {policy.name} does not allow database {sql.database} "
            f"(allowed: {allowed})"
        )
    refused = [role for role in sql.roles if role.casefold() not in grant.roles]
    if refused:
        allowed = ", ".join(grant.role_names) or "none"
        problems.append(
            f"SqlIdentityPolicy {policy.name} does not allow role{'s' if len(refused) > 1 else ''} "
            f"{', '.join(refused)} (allowed: {allowed})"
        )
    return problems


def authorize(
    identity: NamedIdentity,
    sql: SqlSpec | None,
    namespace: str,
    namespace_labels: Mapping[str, str],
    policies: Sequence[Policy],
    require_policy: bool = True,
    *,
    retain: bool = False,
) -> Decision:
    """Whether a SqlWorkloadIdentity in ``namespace`` may bind ``identity`` (and get ``sql``;
    with ``retain``, use ``deletionPolicy: Retain``)."""
    about = sorted((p for p in policies if p.identity_key == identity.key), key=lambda p: p.name)
    if not about:
        if not require_policy:
            return Decision(
                True,
                f"no SqlIdentityPolicy mentions {identity.display}, and requirePolicy is off",
                checked_identity=False,
            )
        return Decision(
            False,
            f"no SqlIdentityPolicy allows {identity.display}: a platform administrator must "
            f"create one that names this identity and namespace {namespace}",
        )
    scoped = [
        (rank, p)
        for p in about
        if (rank := p.namespaces.rank(namespace, namespace_labels)) is not None
    ]
    if not scoped:
        return Decision(
            False,
            f"no SqlIdentityPolicy allows namespace {namespace} to bind {identity.display} "
            f"(policies for this identity: {_names(about)}; none includes namespace {namespace})",
        )
    narrowest = min(rank for rank, _ in scoped)
    governing = [p for rank, p in scoped if rank == narrowest]
    names = tuple(p.name for p in governing)
    problems = (
        [problem for p in governing for problem in sql_problems(p, sql)] if sql is not None else []
    )
    if retain:
        problems += [
            f"SqlIdentityPolicy {p.name} does not allow deletionPolicy: Retain (it has no "
            "spec.allowRetain: true): use deletionPolicy: Delete"
            for p in governing
            if not p.allow_retain
        ]
    if problems:
        overridden = [p for rank, p in scoped if rank != narrowest]
        note = f" (the narrower policy wins over {_names(overridden)})" if overridden else ""
        return Decision(False, "; ".join(problems) + note, names)
    what = f"{identity.display} in namespace {namespace}"
    if sql is not None:
        what += f" with {', '.join(sql.roles) or 'no roles'} on {sql.database}"
    plural = "ies" if len(names) > 1 else "y"
    return Decision(
        True,
        f"SqlIdentityPolic{plural} {', '.join(names)} allow{'' if len(names) > 1 else 's'} {what}"
        f" ({_RANK_WORDS[narrowest]})",
        names,
        allow_ddl_triggers=all(p.sql is not None and p.sql.allow_ddl_triggers for p in governing),
    )
