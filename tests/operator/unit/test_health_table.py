"""How GitOps tools read our status, over every reason: the status is built by the operator's own
code (``Pipeline`` over a one-step pipeline, ``policy_conditions`` for policies) and read by the
real kstatus (sigs.k8s.io/cli-utils, as Flux does) and by the Argo CD health check we ship
(deploy/argocd/, run with gopher-lua as Argo CD runs it), both through ``gitops-health``
(sandbox/tools/gitops-health, built once from its pinned Go module).

Transient reasons are InProgress / Progressing, permanent ones Failed / Degraded with the
operator's message, Ready is Current / Healthy. No cluster is needed.
"""

from __future__ import annotations

import ast
import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from operator_fakes import resource  # type: ignore[import-not-found]
from swi_operator import conditions
from swi_operator.errors import (
    TRANSIENT_REASONS,
    NotAuthorizedError,
    PermanentError,
    Reason,
    TransientError,
    is_transient,
)
from swi_operator.pipeline import Pipeline
from swi_operator.policy_review import policy_conditions
from swi_operator.steps import Context, StepResult

from sandbox.tools import argocd_health, kstatus

REPO = Path(__file__).resolve().parents[3]
OPERATOR = REPO / "operator" / "swi_operator"
TENANT = "00000000-0000-0000-0000-0000000000aa"


@dataclass
class OneStep:
    """A step whose outcome the test decides: a result, or an error to raise."""

    outcome: StepResult | Exception
    condition: str = "FederatedCredentialReady"

    async def reconcile(self, ctx: Context) -> StepResult:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    async def finalize(self, ctx: Context) -> None:
        return None


def message_for(reason: str) -> str:
    return f"what went wrong for {reason}, and what to do"


def error_for(reason: Reason) -> Exception:
    """The error a step raises for ``reason``, of the class the reason belongs to."""
    if reason == Reason.NOT_AUTHORIZED:
        return NotAuthorizedError(message_for(reason))
    if reason.transient:
        return TransientError(reason, message_for(reason))
    return PermanentError(reason, message_for(reason))


async def reconciled(outcome: StepResult | Exception, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with the status the pipeline writes for a step with ``outcome``."""
    result = await Pipeline([OneStep(outcome)], TENANT).reconcile(body)
    return {**body, "status": {**body.get("status", {}), **result.status}}


async def status_for(reason: str) -> dict[str, Any]:
    """A SqlWorkloadIdentity or SqlIdentityPolicy whose Ready condition carries ``reason``, as the
    operator writes it."""
    if reason == Reason.INVALID_SPEC:
        return await reconciled(
            StepResult("True", "Ok", "fine"),
            resource(identity={"applicationClientId": "not-a-guid"}),
        )
    if reason == Reason.INVALID_POLICY:
        policy: dict[str, Any] = {
            "apiVersion": "sqlidentity.io/v1alpha1",
            "kind": "SqlIdentityPolicy",
            "metadata": {"name": "broken", "generation": 3},
        }
        problem = message_for(reason)
        policy["status"] = {
            "observedGeneration": 3,
            "conditions": policy_conditions([], problem, 3),
        }
        return policy
    if isinstance(reason, Reason):
        return await reconciled(error_for(reason), resource())
    # A step's own reason, returned rather than raised (WorkloadsReady's, for one).
    return await reconciled(StepResult("False", reason, message_for(reason)), resource())


def both(obj: dict[str, Any]) -> tuple[tuple[str, str], tuple[str, str]]:
    return kstatus(obj), argocd_health(obj)


TRANSIENT = sorted(TRANSIENT_REASONS)
PERMANENT = sorted(r for r in Reason if not r.transient)


def test_every_reason_is_classified_once() -> None:
    assert TRANSIENT and PERMANENT
    assert set(TRANSIENT) | set(PERMANENT) == set(Reason)
    assert Reason.PROPAGATING in TRANSIENT
    assert {Reason.NOT_AUTHORIZED, Reason.PERMISSION_DENIED} <= set(PERMANENT)


@pytest.mark.parametrize("reason", TRANSIENT)
async def test_a_transient_reason_is_in_progress(reason: Reason) -> None:
    obj = await status_for(reason)
    ready = conditions.find(obj["status"]["conditions"], "Ready")
    assert ready is not None and ready.reason == reason
    (ks, ks_message), (argo, argo_message) = both(obj)
    assert ks == "InProgress", ks_message
    assert message_for(reason) in ks_message
    assert argo == "Progressing", argo_message
    assert reason in argo_message and message_for(reason) in argo_message


@pytest.mark.parametrize("reason", PERMANENT)
async def test_a_permanent_reason_fails_with_the_operators_message(reason: Reason) -> None:
    obj = await status_for(reason)
    ready = conditions.find(obj["status"]["conditions"], "Ready")
    assert ready is not None and ready.status == "False" and ready.reason == reason
    (ks, ks_message), (argo, argo_message) = both(obj)
    assert ks == "Failed", ks_message
    assert ks_message == ready.message
    expected = "spec.identity" if reason == Reason.INVALID_SPEC else message_for(reason)
    assert expected in ks_message
    assert argo == "Degraded", argo_message
    assert argo_message == f"{reason}: {ready.message}"


async def test_propagating_as_the_verification_step_returns_it() -> None:
    message = "Entra does not accept the federated credential yet"
    retry = TransientError(Reason.PROPAGATING, message)
    obj = await reconciled(
        StepResult("False", Reason.PROPAGATING, message, retry=retry), resource()
    )
    assert kstatus(obj) == ("InProgress", f"FederatedCredentialReady: {message}")
    assert argocd_health(obj)[0] == "Progressing"


async def test_a_steps_own_failure_reason_is_permanent() -> None:
    # WorkloadsReady's WorkloadNotLabelled is no errors.Reason: someone must re-create a workload.
    assert not is_transient("WorkloadNotLabelled")
    obj = await status_for("WorkloadNotLabelled")
    assert kstatus(obj)[0] == "Failed"
    assert argocd_health(obj)[0] == "Degraded"


async def test_ready_is_current_and_healthy() -> None:
    obj = await reconciled(StepResult("True", "CredentialReady", "in place"), resource())
    stalled = conditions.find(obj["status"]["conditions"], "Stalled")
    reconciling = conditions.find(obj["status"]["conditions"], "Reconciling")
    assert stalled is not None and stalled.status == "False"
    assert reconciling is not None and reconciling.status == "False"
    assert kstatus(obj) == ("Current", "Resource is Ready")
    assert argocd_health(obj) == ("Healthy", "the identity chain is in place")


async def test_a_valid_policy_is_current_and_healthy() -> None:
    policy = {
        "apiVersion": "sqlidentity.io/v1alpha1",
        "kind": "SqlIdentityPolicy",
        "metadata": {"name": "demo", "generation": 1},
        "status": {"observedGeneration": 1, "conditions": policy_conditions([], None, 1)},
    }
    assert kstatus(policy)[0] == "Current"
    assert argocd_health(policy)[0] == "Healthy"


async def test_stalled_then_ready_again_flips_both_conditions() -> None:
    body = await reconciled(StepResult("True", "CredentialReady", "in place"), resource())
    body = await reconciled(error_for(Reason.PERMISSION_DENIED), body)
    assert both(body)[0][0] == "Failed"
    stalled = conditions.find(body["status"]["conditions"], "Stalled")
    assert stalled is not None and stalled.status == "True"
    body = await reconciled(error_for(Reason.THROTTLED), body)
    assert both(body)[0][0] == "InProgress"
    body = await reconciled(StepResult("True", "CredentialReady", "in place"), body)
    assert both(body) == (
        ("Current", "Resource is Ready"),
        ("Healthy", "the identity chain is in place"),
    )
    assert [c["type"] for c in body["status"]["conditions"]].count("Stalled") == 1


async def test_a_spec_change_not_yet_reconciled_is_in_progress() -> None:
    stale = await reconciled(error_for(Reason.NOT_AUTHORIZED), resource())
    stale = copy.deepcopy(stale)
    stale["metadata"]["generation"] = 2  # the user changed the spec; the operator has not run
    (ks, ks_message), (argo, argo_message) = both(stale)
    assert ks == "InProgress" and "generation is 2" in ks_message
    assert argo == "Progressing" and "generation 2" in argo_message


def test_a_resource_the_operator_has_not_seen_is_progressing_for_argocd() -> None:
    # (kstatus calls an object without status Current: nothing in the object can tell it apart.)
    assert argocd_health(resource())[0] == "Progressing"


def _raises() -> list[tuple[str, str, str]]:
    """(class, Reason member, where) for each ``XError(Reason.MEMBER, ...)`` in the operator."""
    found = []
    for path in sorted(OPERATOR.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("TransientError", "PermanentError")
                and node.args
                and isinstance(node.args[0], ast.Attribute)
                and isinstance(node.args[0].value, ast.Name)
                and node.args[0].value.id == "Reason"
            ):
                where = f"{path.relative_to(OPERATOR)}:{node.lineno}"
                found.append((node.func.id, node.args[0].attr, where))
    return found


def test_every_raise_carries_a_reason_of_its_class() -> None:
    raises = _raises()
    assert len(raises) > 20, raises  # the scan finds the operator's raises
    wrong = [
        f"{cls}(Reason.{member}) at {where}"
        for cls, member, where in raises
        if Reason[member].transient != (cls == "TransientError")
    ]
    assert not wrong, (
        f"raised with a reason of the other class (see errors.TRANSIENT_REASONS): {wrong}"
    )


def _listed(doc: str, heading: str) -> set[str]:
    """The backticked names in the paragraph of ``doc`` that starts with ``heading``."""
    paragraph = doc[doc.index(heading) :].split("\n\n", 1)[0]
    return set(re.findall(r"`([A-Z][A-Za-z]+)`", paragraph))


def test_docs_list_each_reason_as_the_code_classifies_it() -> None:
    doc = (REPO / "docs" / "operator.md").read_text()
    assert _listed(doc, "Transient reasons") == {str(r) for r in TRANSIENT}
    assert _listed(doc, "Permanent reasons") - {"WorkloadNotLabelled"} == {
        str(r) for r in PERMANENT
    }
