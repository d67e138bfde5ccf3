"""The validating admission webhook: SqlWorkloadIdentities no SqlIdentityPolicy allows are refused
at `kubectl apply`, with the message the operator would write into their status.

Enabled by ``--policy-webhook true`` / ``SWI_POLICY_WEBHOOK=true`` (deploy/ sets it), which
imports this module. It runs inside the operator: the same HTTPS server, certificate and
configuration handling as the pod injection webhook (``webhooks``), and the operator's own policy
source and Kubernetes client (kopf's memo), so admission and reconcile decide alike.

The flow of one request: the API server sends a CREATE, or an UPDATE that changes ``spec`` (the
ValidatingWebhookConfiguration's ``matchConditions``; kopf's own finalizer and annotation patches
never come here, and neither does a deletion), and ``validate``:

1. refuses an invalid spec with the field-specific problems (``spec.parse_spec``), in case the CRD
   was installed without its schema;
2. refuses, with ``NotAuthorized: <what is missing>``, a spec no policy allows
   (``steps.authorization.decide``, the reconcile gate's own function);
3. refuses a second resource for a service account another live resource of the namespace
   already federates (one subject, one claimant: subjects are built from the namespace, so two
   namespaces can never claim the same one).

A failure to read policies refuses the request (``failurePolicy`` decides only when the webhook
cannot be reached). The operator re-checks at every reconcile: policies change after admission,
and a resource created while the webhook was off is caught there.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from swi_operator import metrics, webhooks
from swi_operator.errors import ReconcileError
from swi_operator.kube import GROUP, PLURAL, VERSION
from swi_operator.runtime import Runtime
from swi_operator.spec import SpecError, parse_spec
from swi_operator.steps.authorization import decide

log = logging.getLogger(__name__)


def _same_service_account_claimed(
    others: list[dict[str, Any]], name: str, service_account: str
) -> str | None:
    for other in others:
        meta = other.get("metadata") or {}
        if meta.get("name") == name or meta.get("deletionTimestamp"):
            continue
        if (other.get("spec") or {}).get("serviceAccountName") == service_account:
            return str(meta.get("name"))
    return None


async def _claims(runtime: Runtime, namespace: str) -> list[dict[str, Any]]:
    """The namespace's resources, for the claim check; none when the API server refuses this
    replica's own token (401: its pod was deleted, with ``--force`` its token is void at once,
    while the Service still routes admissions to it for a moment). The claim check only spares
    the tenant a resource that cannot work: the reconcile refuses a second claimant of a
    service account (``ServiceAccountConflict``) whatever was admitted, and the policy decision,
    the part that grants, was made before from the policies this replica follows."""
    try:
        return await runtime.kube.list_resources([namespace])
    except ReconcileError as err:
        if err.status != 401:
            raise
        log.warning("claim check skipped, this replica's token was refused: %s", err.message)
        return []


@kopf.on.validate(
    GROUP, VERSION, PLURAL, id=webhooks.POLICY_WEBHOOK_ID, operations=["CREATE", "UPDATE"]
)
@metrics.observed_webhook(webhooks.POLICY_WEBHOOK_ID, kopf.AdmissionError)
async def validate(body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    old, new = kwargs.get("old"), kwargs.get("new")
    same_spec = old is not None and new is not None and old.get("spec") == new.get("spec")
    deleting = bool(body.metadata.get("deletionTimestamp"))
    if kwargs.get("operation") == "UPDATE" and (same_spec or deleting):
        return  # not a new request for access (the configuration filters these out anyway)
    runtime: Runtime = memo["runtime"]
    namespace, name = str(body.metadata.namespace), str(body.metadata.name)
    try:
        spec = parse_spec(body.get("spec") or {})
    except SpecError as err:
        raise kopf.AdmissionError(f"InvalidSpec: {err}", code=422) from err
    try:
        decision = await decide(
            runtime.policies,
            spec.identity,
            spec.sql,
            namespace,
            runtime.config.require_policy,
            retain=spec.retain_cloud_objects,
        )
        if not decision.allowed:
            raise kopf.AdmissionError(f"NotAuthorized: {decision.message}", code=403)
        claimant = _same_service_account_claimed(
            await _claims(runtime, namespace), name, spec.service_account_name
        )
    except ReconcileError as err:
        raise kopf.AdmissionError(f"{err.reason}: {err.message}", code=500) from err
    if claimant is not None:
        raise kopf.AdmissionError(
            f"ServiceAccountConflict: service account {spec.service_account_name} is already "
            f"federated by SqlWorkloadIdentity {namespace}/{claimant}; a service account has one "
            "identity: use another one",
            code=409,
        )
