"""Status conditions the Kubernetes way: lastTransitionTime moves only when status changes.

Like cert-manager's ``pkg/api/util/conditions.go``: a reconcile computes fresh conditions, and
``merge`` folds them into the previous list, keeping each condition's ``lastTransitionTime`` when
its ``status`` did not change (a new reason or message alone is not a transition). ``Ready`` is
derived, never set by a step: True only when every condition it summarises is True, otherwise it
carries the first failing condition's reason and message, which is what `kubectl get swi` shows.

``Reconciling`` and ``Stalled`` follow kstatus's conventions (what Flux and cli-utils waiters, and
our Argo CD health check in deploy/argocd/, read) and are derived from Ready alone, by
``progress``: while Ready is not True with a transient reason (``errors.is_transient``: the
operator gets further on its own), Reconciling is True; when it is False with any other reason
(the operator will not get further until someone changes something), Stalled is True with that
reason and message; when Ready is True, both are False.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from swi_operator.errors import is_transient

Status = Literal["True", "False", "Unknown"]

READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"


@dataclass(frozen=True)
class Condition:
    type: str
    status: Status
    reason: str
    message: str

    @property
    def is_true(self) -> bool:
        return self.status == "True"


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(raw: Mapping[str, Any]) -> Condition:
    status = raw.get("status")
    return Condition(
        type=str(raw.get("type", "")),
        status=status if status in ("True", "False") else "Unknown",
        reason=str(raw.get("reason", "")),
        message=str(raw.get("message", "")),
    )


def find(conditions: Sequence[Mapping[str, Any]], type_: str) -> Condition | None:
    for raw in conditions:
        if raw.get("type") == type_:
            return parse(raw)
    return None


def ready(conditions: Sequence[Condition]) -> Condition:
    """The Ready condition summarising ``conditions`` (in pipeline order)."""
    for cond in conditions:
        if not cond.is_true:
            status: Status = "Unknown" if cond.status == "Unknown" else "False"
            return Condition(READY, status, cond.reason, f"{cond.type}: {cond.message}")
    return Condition(READY, "True", "Reconciled", "the identity chain is in place")


def progress(ready: Condition) -> tuple[Condition, Condition]:
    """``Reconciling`` and ``Stalled`` for the ``ready`` condition (see the module's docstring)."""
    if ready.is_true:
        return (
            Condition(RECONCILING, "False", ready.reason, "reconciled"),
            Condition(STALLED, "False", ready.reason, "reconciled"),
        )
    if ready.status == "False" and not is_transient(ready.reason):
        return (
            Condition(RECONCILING, "False", ready.reason, "stopped until something is changed"),
            Condition(STALLED, "True", ready.reason, ready.message),
        )
    return (
        Condition(RECONCILING, "True", ready.reason, ready.message),
        Condition(STALLED, "False", ready.reason, "the operator is still working on it"),
    )


def merge(
    previous: Sequence[Mapping[str, Any]],
    updates: Sequence[Condition],
    generation: int,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """``previous`` with ``updates`` applied; conditions not updated are kept unchanged."""
    stamp = now or now_rfc3339()
    result: list[dict[str, Any]] = [dict(raw) for raw in previous]
    for cond in updates:
        index = next((i for i, raw in enumerate(result) if raw.get("type") == cond.type), None)
        old = result[index] if index is not None else None
        transition = (
            old["lastTransitionTime"]
            if old is not None
            and old.get("status") == cond.status
            and old.get("lastTransitionTime")
            else stamp
        )
        new = {
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message,
            "observedGeneration": generation,
            "lastTransitionTime": transition,
        }
        if index is None:
            result.append(new)
        else:
            result[index] = new
    return result
