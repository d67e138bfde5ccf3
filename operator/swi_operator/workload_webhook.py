"""The workload labelling webhook: a workload gets the workload identity label on its pod template
when it is created, before its first pod exists.

Without it a Deployment created after its SqlWorkloadIdentity ran pods without the token until
the next drift check labelled it (up to ``--drift-interval``, 600 s as deployed) and rolled it.
The API server now sends every Deployment, StatefulSet, DaemonSet, Job and CronJob it creates (or
whose spec changes) outside the control plane's namespaces to this mutating webhook (deploy/base:
MutatingWebhookConfiguration ``sql-workload-identity-operator-workloads``), which adds
``azure.workload.identity/use: "true"`` (and ``sqlidentity.io/labelled-by``, as the reconcile does)
to the pod template when a resource of the namespace wants it. The first ReplicaSet, and so the
first pod, already carries the label; the injecting webhook (the AKS add-on, or ours) then injects
the token into that pod. Order does not matter: a resource applied after its workloads labels them
at reconcile, as before.

The decision is the reconcile's own (``steps.workloads.selected``) over what the operator trusts:
the namespace's SqlWorkloadIdentities read from the API server at the request (one LIST; not
being deleted, a valid spec naming the workload's service account, a selector matching its pod
template's labels) and the SqlIdentityPolicies' decision for each (``steps.authorization.decide``,
the reconcile gate's function and cache). Nothing the workload itself says beyond its service
account and pod labels (the same facts the reconcile uses) takes part: no annotation of it, of its
service account or of its namespace decides.

It never refuses a workload: a failure to decide lets it through unlabelled and logs why, and the
configuration's ``failurePolicy: Ignore`` does the same when the operator is unreachable (a
cluster-wide webhook on every Deployment must not block deployments when one operator is down).
The drift check is the safety net either way, and ``WorkloadsReady`` names the pods that ran
without the token meanwhile.

Enabled by ``--workload-webhook true`` / ``SWI_WORKLOAD_WEBHOOK=true`` (deploy/ sets it); served by
the operator's webhook server (``webhooks``: same port, certificate and configuration handling).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import Any

import kopf

from swi_operator import metrics, webhooks
from swi_operator.errors import ReconcileError
from swi_operator.kube import WORKLOAD_KINDS, WorkloadKind
from swi_operator.runtime import Runtime
from swi_operator.spec import Spec, SpecError, parse_spec
from swi_operator.steps.authorization import decide
from swi_operator.steps.workloads import LABELLED_BY, USE_LABEL, selected

log = logging.getLogger(__name__)


def _dig(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def pod_template(kind: WorkloadKind, workload: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    """The service account and the labels of the workload's pod template."""
    template = _dig(workload, kind.template_path) or {}
    account = _dig(template, ("spec", "serviceAccountName")) or "default"
    labels = _dig(template, ("metadata", "labels")) or {}
    return str(account), {str(k): str(v) for k, v in dict(labels).items()}


def candidates(
    resources: list[dict[str, Any]], service_account: str, labels: Mapping[str, str]
) -> list[tuple[str, Spec]]:
    """The live resources (name, spec) whose selection covers such a pod template, by name."""
    found = []
    for body in resources:
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            continue
        try:
            spec = parse_spec(body.get("spec") or {})
        except SpecError:
            continue
        if selected(spec, service_account, labels):
            found.append((str(meta.get("name")), spec))
    return sorted(found, key=lambda item: item[0])


def add_label(kind: WorkloadKind, resource: str) -> Any:
    """A function kopf applies to the raw workload: the label on its template, our mark on it."""

    def apply(raw: MutableMapping[str, Any]) -> None:
        template: MutableMapping[str, Any] = raw
        for key in kind.template_path:
            template = template.setdefault(key, {})
        template.setdefault("metadata", {}).setdefault("labels", {})[USE_LABEL] = "true"
        raw.setdefault("metadata", {}).setdefault("annotations", {})[LABELLED_BY] = resource

    return apply


async def labelling_resource(
    runtime: Runtime, namespace: str, kind: WorkloadKind, workload: Mapping[str, Any]
) -> str | None:
    """The name of the resource that has this workload labelled, or None."""
    if runtime.config.namespaces and namespace not in runtime.config.namespaces:
        return None  # not a namespace this operator serves
    account, labels = pod_template(kind, workload)
    if labels.get(USE_LABEL) == "true":
        return None
    wanting = candidates(await runtime.kube.list_resources([namespace]), account, labels)
    for name, spec in wanting:
        decision = await decide(
            runtime.policies, spec.identity, spec.sql, namespace, runtime.config.require_policy
        )
        if decision.allowed:
            return name
    return None


def _handler(kind: WorkloadKind) -> Any:
    group, _, version = kind.api.removeprefix("/apis/").partition("/")

    @kopf.on.mutate(
        group,
        version,
        kind.plural,
        id=webhooks.WORKLOAD_WEBHOOK_ID,
        operations=["CREATE", "UPDATE"],
    )
    @metrics.observed_webhook(webhooks.WORKLOAD_WEBHOOK_ID, kopf.AdmissionError)
    async def label(
        body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, namespace: str | None, **_: Any
    ) -> None:
        if not namespace:
            return
        runtime: Runtime = memo["runtime"]
        name = body.metadata.name or f"{body.metadata.get('generateName') or ''}(generated)"
        try:
            resource = await labelling_resource(runtime, namespace, kind, dict(body))
        except ReconcileError as err:  # never refuse a workload: the drift check catches up
            log.warning(
                "not labelling %s %s/%s at admission (%s: %s); the drift check will",
                kind.kind,
                namespace,
                name,
                err.reason,
                err.message,
            )
            return
        if resource is not None:
            patch.fns.append(add_label(kind, resource))
            log.info(
                "labelled the pod template of %s %s/%s for SqlWorkloadIdentity %s at admission",
                kind.kind,
                namespace,
                name,
                resource,
            )

    return label


HANDLERS = [_handler(kind) for kind in WORKLOAD_KINDS]
