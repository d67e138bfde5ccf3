"""Authorized: a SqlIdentityPolicy allows this resource. The first step, before any cloud call.

The gate reads the cluster's SqlIdentityPolicies (and, when a policy selects namespaces by label,
the resource's Namespace) and asks ``policy.authorize``. Refused: ``NotAuthorizedError`` with a
message naming what is missing; the pipeline stops there, so neither Entra, ARM nor SQL is called,
and if the resource had access before (a policy was changed or deleted since), the pipeline revokes
it through the later steps (``pipeline``). The validating webhook (``policy_webhook``) calls the
same ``decide``, so `kubectl apply` and the status say the same thing.

``KubePolicySource`` reads policies through the Kubernetes API with a short cache (a drift check of
a thousand resources lists them once, not a thousand times), dropped whenever kopf reports a policy
change, so a revocation is not delayed by it; namespace labels come from the operator's namespace
watch (``policy_review.NamespaceLabels``), read live only for a namespace it has not seen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, Protocol

from swi_operator.errors import NotAuthorizedError, PermanentError, Reason
from swi_operator.policy import (
    Decision,
    ParsedPolicies,
    PolicyMemo,
    authorize,
    needs_namespace_labels,
    parse_policies,
)
from swi_operator.spec import NamedIdentity, SqlSpec
from swi_operator.steps import Context, StepResult

POLICY_CACHE_S = 2.0


class PolicyReader(Protocol):
    """What the gate needs from the cluster (``kube.KubernetesClient`` implements it)."""

    async def list_policies(self) -> list[dict[str, Any]] | None: ...

    async def namespace_labels(self, namespace: str) -> dict[str, str]: ...


class PolicySource(Protocol):
    async def policies(self) -> ParsedPolicies: ...

    async def namespace_labels(self, namespace: str) -> Mapping[str, str]: ...


class WatchedLabels(Protocol):
    """A namespace's labels as a watch saw them; None if unseen (``NamespaceLabels``)."""

    def labels(self, name: str) -> dict[str, str] | None: ...


class KubePolicySource:
    def __init__(
        self,
        reader: PolicyReader,
        require_policy: bool,
        ttl: float = POLICY_CACHE_S,
        watched: WatchedLabels | None = None,
    ):
        self._reader = reader
        self._watched = watched
        self._require = require_policy
        self._ttl = ttl
        self._cached: tuple[float, ParsedPolicies] | None = None
        self._memo = PolicyMemo()
        self._lock = asyncio.Lock()

    def invalidate(self) -> None:
        self._cached = None

    async def policies(self) -> ParsedPolicies:
        async with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > self._ttl:
                listed = await self._reader.list_policies()
                if listed is None:
                    if self._require:
                        raise PermanentError(
                            Reason.NOT_AUTHORIZED,
                            "the SqlIdentityPolicy CRD is not installed (crds/), and requirePolicy "
                            "is on: install it and create a policy for this resource",
                        )
                    listed = []
                self._cached = (now, parse_policies(listed, self._memo))
            return self._cached[1]

    async def namespace_labels(self, namespace: str) -> Mapping[str, str]:
        """From the namespace watch when it has seen the namespace, else read live."""
        seen = self._watched.labels(namespace) if self._watched is not None else None
        return seen if seen is not None else await self._reader.namespace_labels(namespace)


async def decide(
    source: PolicySource,
    identity: NamedIdentity,
    sql: SqlSpec | None,
    namespace: str,
    require_policy: bool,
    *,
    retain: bool = False,
) -> Decision:
    """``policy.authorize`` over the cluster's policies; the Namespace is read only if needed."""
    parsed = await source.policies()
    about = [p for p in parsed.valid if p.identity_key == identity.key]
    needs = needs_namespace_labels(about, namespace)
    labels = await source.namespace_labels(namespace) if needs else {}
    return authorize(identity, sql, namespace, labels, parsed.valid, require_policy, retain=retain)


class AuthorizationStep:
    condition = "Authorized"

    def __init__(self, source: PolicySource, require_policy: bool = True) -> None:
        self._source = source
        self._require = require_policy

    async def reconcile(self, ctx: Context) -> StepResult:
        decision = await decide(
            self._source,
            ctx.spec.identity,
            ctx.spec.sql,
            ctx.resource.namespace,
            self._require,
            retain=ctx.spec.retain_cloud_objects,
        )
        if not decision.allowed:
            raise NotAuthorizedError(decision.message)
        ctx.allow_ddl_triggers = decision.allow_ddl_triggers
        reason = "PolicyAllows" if decision.checked_identity else "PolicyNotRequired"
        return StepResult("True", reason, decision.message)

    async def finalize(self, ctx: Context) -> None:
        """Nothing to undo: the gate creates nothing. Deletion is never refused by policy."""
