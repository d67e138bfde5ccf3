"""Which grants live, allowed resources back: the rule revocation, deletion and the sweep share.

A federated credential of this cluster's issuer on identity I for the subject
``system:serviceaccount:NS:SA`` is *backed* when a SqlWorkloadIdentity in NS

* exists and is not being deleted,
* names SA and I in its spec, or names a SqlIdentityPool (``pool.py``) of which I is a member
  (the spec is the only part of a resource its tenant writes that the operator trusts here, and
  only within its own namespace; a pool's members are the platform team's), and
* is allowed by the current policies (``policy.authorize``, the gate's own decision).

Nothing else a tenant can write decides it: not the ``sqlidentity.io/owner`` annotation of a
service account (finding 1 of issue 18: an annotation naming another resource made revocation and
deletion skip the credential), not finalizers, not ``deletionPolicy``, not kopf's state. Revocation
and deletion keep a credential only when another resource backs it; the sweep (``sweep.py``)
removes every unbacked one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from swi_operator.errors import PermanentError
from swi_operator.policy import ParsedPolicies, authorize, needs_namespace_labels
from swi_operator.pool import PoolSource
from swi_operator.spec import PoolRef, SpecError, parse_spec

# Each valid SqlIdentityPool's members (identity keys), by pool name.
PoolMembers = Mapping[str, frozenset[str]]

SUBJECT_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True)
class Grant:
    """Identity ``identity_key`` (``IdentityRef.key``) trusts service account ``namespace/name``."""

    identity_key: str
    namespace: str
    service_account: str


class Grants:
    """The grants a set of resources backs. A pool resource backs its subject on every member of
    its pool, so its grant is kept once, by pool, and a member's grant is looked up through the
    pools it is in: expanded, 5,000 resources on a pool of 250 members were 1.25 million grants
    (the sweep's largest allocation, docs/benchmarks.md)."""

    def __init__(self, pools: PoolMembers | None = None) -> None:
        self.direct: set[Grant] = set()
        self.pooled: set[tuple[str, str, str]] = set()  # (pool, namespace, service account)
        self._pools_of: dict[str, list[str]] = {}  # member identity key -> its pools
        for pool, keys in (pools or {}).items():
            for key in keys:
                self._pools_of.setdefault(key, []).append(pool)
        self._members = pools or {}

    def add(self, grant: Grant) -> None:
        self.direct.add(grant)

    def add_pool(self, pool: str, namespace: str, service_account: str) -> None:
        """Every member of ``pool`` trusts ``namespace/service_account`` (none if the pool is
        unknown: it grants nothing)."""
        if self._members.get(pool):
            self.pooled.add((pool, namespace, service_account))

    def __contains__(self, grant: object) -> bool:
        if not isinstance(grant, Grant):
            return False
        if grant in self.direct:
            return True
        return any(
            (pool, grant.namespace, grant.service_account) in self.pooled
            for pool in self._pools_of.get(grant.identity_key, ())
        )


def parse_subject(subject: str) -> tuple[str, str] | None:
    """(namespace, service account) of a service account subject, else None."""
    if not subject.startswith(SUBJECT_PREFIX):
        return None
    parts = subject[len(SUBJECT_PREFIX) :].split(":")
    if len(parts) != 2 or not all(parts):
        return None
    return parts[0], parts[1]


class ResourceLister(Protocol):
    async def list_resources(self, namespaces: Sequence[str]) -> list[dict[str, Any]]: ...


class Policies(Protocol):
    async def policies(self) -> ParsedPolicies: ...

    async def namespace_labels(self, namespace: str) -> Mapping[str, str]: ...


def _meta(body: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = body.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


async def backed_grants(
    resources: Sequence[Mapping[str, Any]],
    policies: Policies | None,
    require_policy: bool,
    exclude_uid: str | None = None,
    pools: PoolMembers | None = None,
) -> Grants:
    """The grants ``resources`` back (``policies`` None: every live resource counts, as in the
    unit tests of the steps that run without the gate). A pool resource backs its subject on
    every member of ``pools[its pool]`` (none if the pool is unknown)."""
    parsed: ParsedPolicies | None = None
    if policies is not None:
        try:
            parsed = await policies.policies()
        except PermanentError:
            parsed = ParsedPolicies()  # no policy CRD: with requirePolicy on, nothing is allowed
    labels: dict[str, Mapping[str, str]] = {}
    grants = Grants(pools)
    for body in resources:
        meta = _meta(body)
        if meta.get("deletionTimestamp") or (exclude_uid and meta.get("uid") == exclude_uid):
            continue
        try:
            spec = parse_spec(body.get("spec") or {})
        except SpecError:
            continue
        namespace = str(meta.get("namespace", ""))
        if parsed is not None and policies is not None:
            if namespace not in labels and needs_namespace_labels(parsed.valid, namespace):
                labels[namespace] = await policies.namespace_labels(namespace)
            decision = authorize(
                spec.identity,
                spec.sql,
                namespace,
                labels.get(namespace, {}),
                parsed.valid,
                require_policy,
                retain=spec.retain_cloud_objects,
            )
            if not decision.allowed:
                continue
        if isinstance(spec.identity, PoolRef):
            grants.add_pool(spec.identity.name, namespace, spec.service_account_name)
        else:
            grants.add(Grant(spec.identity.key, namespace, spec.service_account_name))
    return grants


async def pool_members(pools: PoolSource | None) -> dict[str, frozenset[str]]:
    """``PoolMembers`` as ``pools`` read them now (nothing without pools)."""
    return {} if pools is None else await pools.members()


class Backing:
    """``backed_grants`` over the cluster, for one namespace at a time (revocation, deletion)."""

    def __init__(
        self,
        kube: ResourceLister,
        policies: Policies | None,
        require_policy: bool = True,
        pools: PoolSource | None = None,
    ) -> None:
        self._kube = kube
        self._policies = policies
        self._require = require_policy
        self._pools = pools

    async def elsewhere(self, grant: Grant, me_uid: str) -> bool:
        """Whether a resource other than ``me_uid`` backs ``grant``."""
        resources = await self._kube.list_resources([grant.namespace])
        members = await pool_members(self._pools)
        backed = await backed_grants(resources, self._policies, self._require, me_uid, members)
        return grant in backed
