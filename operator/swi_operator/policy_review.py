"""The fleet seen through the policies: each SqlIdentityPolicy's status, and prompt revocation.

Policies change after admission. The pipeline's gate re-checks every resource at each reconcile
and drift check, but the drift interval can be minutes; so whenever kopf reports a policy change
(``changed``: created, deleted, a new spec generation, as ``PolicySpecs`` tells; a namespace's
labels), when resources were admitted or left (``recount``, at most every
``periodic.RECOUNT_MIN_S``), and once per drift interval regardless, ``review``:

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
from swi_operator.policy import PolicyMemo, authorize, needs_namespace_labels, parse_policies
from swi_operator.spec import SpecError, parse_spec
from swi_operator.steps.authorization import AuthorizationStep

log = logging.getLogger(__name__)


class NamespaceLabelReader(Protocol):
    async def namespace_labels(self, namespace: str) -> Mapping[str, str]: ...


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
    """``changed()`` runs it soon (a policy's spec, a namespace's labels: revocation must be
    prompt); ``recount()`` (a resource admitted or gone) after a burst of them, as
    ``periodic.DebouncedTask.recount`` says, since each run lists the fleet and only the
    policies' counts wait for it."""

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
        labels: NamespaceLabelReader | None = None,
    ) -> None:
        super().__init__(gate, namespaces=namespaces, interval=interval)
        self._kube = kube
        # Where namespace labels come from: the gate's source (the namespace watch, then live).
        self._labels: NamespaceLabelReader = labels or kube
        self._drift = drift
        self._require = require_policy
        self._memo = PolicyMemo()

    async def once(self) -> None:
        await self.review()

    async def review(self) -> None:
        served = await self._served()
        if served is None:
            return
        listed = await self._kube.list_policies()
        if listed is None:
            return  # no CRD: nothing to report; the gate says so on each resource
        parsed = parse_policies(listed, self._memo)
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
                labels[namespace] = await self._labels.namespace_labels(namespace)
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


def admission_changed(before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    """Whether a reconcile's status (``after``) changed the resource's ``Authorized`` condition
    (what the policies' counts are made of) from ``before``."""
    new = conditions.find(after.get("conditions") or [], AuthorizationStep.condition)
    if new is None:
        return False
    old = conditions.find(before.get("conditions") or [], AuthorizationStep.condition)
    return old is None or old.is_true != new.is_true


class PolicySpecs:
    """Which SqlIdentityPolicy events change what the policies decide: a policy seen for the
    first time, one deleted, or a new ``metadata.generation`` (the API server raises it on every
    spec change). The review's own status writes come back as events too; following those made
    every write start another review, listing the whole fleet again, in a loop for as long as the
    counts moved (22 full lists of 1000 resources while onboarding them)."""

    def __init__(self) -> None:
        self._seen: dict[str, object] = {}

    def changed(self, event: Mapping[str, Any]) -> bool:
        obj = event.get("object")
        meta = obj.get("metadata") if isinstance(obj, Mapping) else None
        if not isinstance(meta, Mapping):
            return True
        uid = str(meta.get("uid") or meta.get("name") or "")
        if event.get("type") == "DELETED":
            self._seen.pop(uid, None)
            return True
        generation = (meta.get("generation"), meta.get("deletionTimestamp"))
        before = self._seen.get(uid)
        self._seen[uid] = generation
        return before != generation


class NamespaceLabels:
    """Which Namespace events change labels (policies select namespaces by them): the watch's
    first listing of a namespace is not a change; a later event with other labels is.

    What it saw answers ``labels``: the gate and the review read a namespace's labels from here
    rather than with a GET per resource (1,000 reads while onboarding 1,000 resources, a tenth of
    the operator's API requests). A namespace not seen yet (created a moment before its first
    resource, or outside what kopf watches) is None: read it live. The event that changes a label
    updates this before it wakes the review, so the review decides on the new labels."""

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

    def labels(self, name: str) -> dict[str, str] | None:
        """The namespace's labels as the watch last saw them; None if it has not seen it."""
        seen = self._seen.get(name)
        return None if seen is None else dict(seen)
