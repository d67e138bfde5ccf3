"""The fleet seen through the policies: each SqlIdentityPolicy's status, and prompt revocation.

Policies change after admission. The pipeline's gate re-checks every resource at each reconcile
and drift check, but the drift interval can be minutes; so whenever kopf reports a policy change
(``changed``), and once per drift interval regardless, ``review``:

1. lists the policies and the served SqlWorkloadIdentities, and decides each resource with the same
   ``policy.authorize`` the gate uses (reading each Namespace at most once, and only if a policy
   selects namespaces by label);
2. re-checks at once, through the drift loop (same lock, same pipeline), every resource whose
   ``Authorized`` condition no longer matches the decision: one that lost its policy is revoked
   within seconds, one that gained it is reconciled without waiting;
3. writes each policy's ``status.admitted`` (resources it governs and allows) when it changed, and
   an invalid policy's reason for granting nothing; its conditions say the same for programs
   (Ready, and kstatus's Reconciling and Stalled: an invalid policy is Stalled, InvalidPolicy).

Decisions are pure and cheap; only the resources whose decision flipped cost a reconcile.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from swi_operator import conditions
from swi_operator.drift import DriftLoop, PeeringGate
from swi_operator.errors import Reason
from swi_operator.periodic import DebouncedTask
from swi_operator.policy import authorize, needs_namespace_labels, parse_policies
from swi_operator.spec import SpecError, parse_spec
from swi_operator.steps.authorization import AuthorizationStep

log = logging.getLogger(__name__)


class PolicyKube(Protocol):
    async def list_policies(self) -> list[dict[str, Any]] | None: ...

    async def namespace_labels(self, namespace: str) -> dict[str, str]: ...

    async def list_resources(self, namespaces: Sequence[str]) -> list[dict[str, Any]]: ...

    async def patch_policy_status(self, name: str, status: Mapping[str, Any]) -> None: ...


def _dig(obj: Mapping[str, Any], *path: str) -> Any:
    for key in path:
        obj = obj.get(key) or {}
    return obj


def policy_conditions(
    previous: Sequence[Mapping[str, Any]], problem: str | None, generation: int | None
) -> list[dict[str, Any]]:
    """A policy's conditions: Ready, True once the operator applies it, False with
    ``InvalidPolicy`` (so Stalled, see ``conditions.progress``) when it grants nothing."""
    ready = (
        conditions.Condition(
            conditions.READY, "False", Reason.INVALID_POLICY, f"invalid, grants nothing: {problem}"
        )
        if problem
        else conditions.Condition(
            conditions.READY, "True", "Accepted", "the operator applies this policy"
        )
    )
    return conditions.merge(previous, [ready, *conditions.progress(ready)], generation or 0)


class PolicyReview(DebouncedTask):
    what = "policy review"

    def __init__(
        self,
        kube: PolicyKube,
        drift: DriftLoop,
        gate: PeeringGate,
        *,
        namespaces: Sequence[str],
        require_policy: bool,
        interval: float,
    ) -> None:
        super().__init__(gate, namespaces=namespaces, interval=interval)
        self._kube = kube
        self._drift = drift
        self._require = require_policy

    async def once(self) -> None:
        await self.review()

    async def review(self) -> None:
        served = await self._served()
        if served is None:
            return
        listed = await self._kube.list_policies()
        if listed is None:
            return  # no CRD: nothing to report; the gate says so on each resource
        parsed = parse_policies(listed)
        admitted: Counter[str] = Counter()
        flipped: list[Mapping[str, Any]] = []
        labels: dict[str, Mapping[str, str]] = {}
        for body in await self._kube.list_resources(served):
            try:
                spec = parse_spec(body.get("spec") or {})
            except SpecError:
                continue
            namespace = str(_dig(body, "metadata", "namespace"))
            if namespace not in labels and needs_namespace_labels(parsed.valid, namespace):
                labels[namespace] = await self._kube.namespace_labels(namespace)
            decision = authorize(
                spec.identity,
                spec.sql,
                namespace,
                labels.get(namespace, {}),
                parsed.valid,
                self._require,
                retain=spec.retain_cloud_objects,
            )
            if decision.allowed:
                admitted.update(decision.governing)
            recorded = conditions.find(
                _dig(body, "status").get("conditions") or [], AuthorizationStep.condition
            )
            if recorded is not None and recorded.is_true != decision.allowed:
                flipped.append(body)
        if flipped:
            log.info("policy change: re-checking %d resource(s) now", len(flipped))
            await asyncio.gather(*(self._drift.check(body) for body in flipped))
        for body in listed:
            name = str(_dig(body, "metadata", "name"))
            problem = parsed.invalid.get(name)
            count = 0 if problem else admitted[name]
            generation = _dig(body, "metadata").get("generation")
            current = _dig(body, "status")
            status = {
                "observedGeneration": generation,
                "admitted": count,
                "message": f"invalid, grants nothing: {problem}"
                if problem
                else f"admits {count} SqlWorkloadIdentit{'y' if count == 1 else 'ies'}",
                "conditions": policy_conditions(
                    current.get("conditions") or [], str(problem) if problem else None, generation
                ),
            }
            if any(current.get(key) != value for key, value in status.items()):
                await self._kube.patch_policy_status(name, status)


class NamespaceLabels:
    """Which Namespace events change labels (policies select namespaces by them): the watch's
    first listing of a namespace is not a change; a later event with other labels is."""

    def __init__(self) -> None:
        self._seen: dict[str, dict[str, str]] = {}

    def changed(self, event: Mapping[str, Any]) -> bool:
        obj = event.get("object")
        meta = obj.get("metadata") if isinstance(obj, Mapping) else None
        if not isinstance(meta, Mapping) or not meta.get("name"):
            return False
        name, labels = str(meta["name"]), dict(meta.get("labels") or {})
        if event.get("type") == "DELETED":
            self._seen.pop(name, None)
            return False
        before = self._seen.get(name)
        self._seen[name] = labels
        return before is not None and before != labels
