"""The reconcile pipeline: steps in order, their outcomes folded into status and Events.

``Pipeline.reconcile`` takes a SqlWorkloadIdentity as the API server returned it and gives back an
``Outcome``: the status to merge (conditions with Ready summarised and Reconciling/Stalled
derived from it by ``conditions.progress``, plus the fields each step owns), the Events to post,
and the transient error to retry after, if any. It is called by kopf's handlers and by the
fleet-wide drift check alike; neither it nor the steps know kopf.

When a step fails, the steps after it do not run and keep their previous condition (a condition's
observedGeneration then shows it was not re-checked); those never set get ``Unknown/Waiting``. A
transient failure of a step whose condition was True leaves it True: a throttled read is not
evidence that the credential broke. Events: every change a step makes (Normal), every condition
that turns or stays False with a new reason (Warning; Normal for Propagating, which is Entra's
usual delay after a new credential rather than trouble), transient failures (Warning), and Ready
turning True.

``Pipeline.finalize`` runs every step's clean-up, last step first; permanent failures become
Warning events (the finalizer must not block forever), transient ones are returned for retry.

Revocation: when a step raises ``NotAuthorizedError`` (the policy gate, which runs first), each
later ``Revocable`` step whose status shows a grant takes it back; its condition turns False with
the gate's reason, and the status fields that recorded the grant are cleared. A resource that
never had access is refused without any call beyond the gate's own.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from swi_operator import conditions, metrics
from swi_operator.conditions import Condition
from swi_operator.errors import (
    NotAuthorizedError,
    PermanentError,
    Reason,
    ReconcileError,
    TransientError,
)
from swi_operator.spec import Spec, SpecError, parse_spec
from swi_operator.steps import Context, Event, ResourceRef, Revocable, Step, StepResult


@dataclass
class Outcome:
    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    retry: TransientError | None = None
    changed: bool = False  # whether ``status`` differs from the resource's current status


def resource_ref(body: Mapping[str, Any]) -> ResourceRef:
    meta = body.get("metadata") or {}
    return ResourceRef(
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        uid=str(meta.get("uid", "")),
        generation=int(meta.get("generation") or 0),
    )


class Pipeline:
    def __init__(self, steps: Sequence[Step], operator_tenant: str) -> None:
        self.steps = tuple(steps)
        self._tenant = operator_tenant

    def _context(self, body: Mapping[str, Any], spec: Spec) -> Context:
        return Context(resource_ref(body), spec, body.get("status") or {}, self._tenant)

    async def reconcile(self, body: Mapping[str, Any]) -> Outcome:
        outcome = await self._reconcile(body)
        ready = conditions.find(outcome.status.get("conditions") or [], conditions.READY)
        if outcome.retry is not None:
            result, reason = "retry", str(outcome.retry.reason)
        elif ready is not None and ready.is_true:
            result, reason = "ready", ready.reason
        else:
            result, reason = "not_ready", ready.reason if ready is not None else ""
        metrics.RECONCILES.labels("reconcile", result, reason).inc()
        return outcome

    async def _step(self, step: Step, ctx: Context) -> StepResult:
        """One step's reconcile, timed (metrics.STEP_DURATION)."""
        started = time.perf_counter()
        result = "ok"
        try:
            return await step.reconcile(ctx)
        except ReconcileError as err:
            result = "transient" if err.transient else "permanent"
            raise
        finally:
            elapsed = time.perf_counter() - started
            metrics.STEP_DURATION.labels(step.condition, result).observe(elapsed)

    async def _reconcile(self, body: Mapping[str, Any]) -> Outcome:
        ref = resource_ref(body)
        previous: Mapping[str, Any] = body.get("status") or {}
        old_conditions: list[Mapping[str, Any]] = list(previous.get("conditions") or [])
        try:
            spec = parse_spec(body.get("spec") or {})
        except SpecError as err:
            invalid = Condition(conditions.READY, "False", Reason.INVALID_SPEC, str(err))
            before = conditions.find(old_conditions, conditions.READY)
            events = (
                [] if before == invalid else [Event("Warning", invalid.reason, invalid.message)]
            )
            return self._outcome(ref, previous, [invalid], {}, events, None)

        ctx = self._context(body, spec)
        updates: list[Condition] = []
        fields: dict[str, Any] = {}
        retry: TransientError | None = None
        for index, step in enumerate(self.steps):
            try:
                result = await self._step(step, ctx)
            except ReconcileError as err:
                before = conditions.find(old_conditions, step.condition)
                if isinstance(err, TransientError):
                    retry = err
                    ctx.record(err.reason, f"{step.condition}: {err.message}; retrying", "Warning")
                if not (err.transient and before is not None and before.is_true):
                    updates.append(Condition(step.condition, "False", err.reason, err.message))
                if isinstance(err, NotAuthorizedError):
                    retry = await self._revoke(ctx, self.steps[index + 1 :], err, updates, fields)
                updates.extend(
                    Condition(
                        later.condition, "Unknown", "Waiting", f"waiting for {step.condition}"
                    )
                    for later in self.steps[index + 1 :]
                    if conditions.find(old_conditions, later.condition) is None
                )
                break
            updates.append(result.condition(step.condition))
            fields.update(result.fields)
            retry = retry or result.retry
        merged = conditions.merge(old_conditions, updates, ref.generation)
        summary = conditions.ready(
            [c for s in self.steps if (c := conditions.find(merged, s.condition)) is not None]
        )
        return self._outcome(ref, previous, [*updates, summary], fields, ctx.events, retry)

    @staticmethod
    async def _revoke(
        ctx: Context,
        later: Sequence[Step],
        err: NotAuthorizedError,
        updates: list[Condition],
        fields: dict[str, Any],
    ) -> TransientError | None:
        """Take back what ``later`` steps granted; a transient failure is returned for retry."""
        retry: TransientError | None = None
        for step in reversed(later):
            if not isinstance(step, Revocable) or not step.holds_grant(ctx.status):
                continue
            try:
                result = await step.revoke(ctx)
            except TransientError as failed:
                retry = retry or failed
                ctx.record(failed.reason, f"revoking {step.condition}: {failed.message}", "Warning")
                continue
            except PermanentError as failed:
                ctx.record(
                    failed.reason,
                    f"could not revoke {step.condition}: {failed.message}; remove it by hand",
                    "Warning",
                )
                continue
            ctx.record("AccessRevoked", f"{result.message}: {err.message}", "Warning")
            updates.append(
                Condition(step.condition, "False", err.reason, f"{result.message}: {err.message}")
            )
            fields.update(result.fields)
        return retry

    @staticmethod
    def _outcome(
        ref: ResourceRef,
        previous: Mapping[str, Any],
        updates: Sequence[Condition],
        fields: Mapping[str, Any],
        events: Sequence[Event],
        retry: TransientError | None,
    ) -> Outcome:
        old_conditions = list(previous.get("conditions") or [])
        ready = next(c for c in updates if c.type == conditions.READY)
        merged = conditions.merge(
            old_conditions, [*updates, *conditions.progress(ready)], ref.generation
        )
        status = {**fields, "observedGeneration": ref.generation, "conditions": merged}
        all_events = list(events)
        for cond in updates:
            before = conditions.find(old_conditions, cond.type)
            if before is not None and (before.status, before.reason) == (cond.status, cond.reason):
                continue
            if cond.type == conditions.READY:
                if cond.is_true:
                    all_events.append(Event("Normal", "Ready", cond.message))
            elif cond.status == "False":
                if any(e.type == "Warning" and e.reason == cond.reason for e in events):
                    continue  # a step's failure already said it, with "retrying" where it is
                # Propagating is Entra taking its usual seconds after a new credential, not trouble
                expected = cond.reason == Reason.PROPAGATING
                message = f"{cond.type}: {cond.message}"
                all_events.append(Event("Normal" if expected else "Warning", cond.reason, message))
        changed = any(previous.get(key) != value for key, value in status.items())
        return Outcome(status, all_events, retry, changed)

    async def finalize(self, body: Mapping[str, Any]) -> Outcome:
        """Undo what the steps made; the Outcome's ``retry`` is set if something must be retried."""
        try:
            spec = parse_spec(body.get("spec") or {})
        except SpecError as err:
            event = Event("Warning", Reason.INVALID_SPEC, f"nothing to clean up: {err}")
            return Outcome({}, [event])
        ctx = self._context(body, spec)
        retry: TransientError | None = None
        for step in reversed(self.steps):
            try:
                await step.finalize(ctx)
            except TransientError as err:
                retry = retry or err
                ctx.record(
                    err.reason, f"clean-up of {step.condition}: {err.message}; retrying", "Warning"
                )
            except PermanentError as err:
                ctx.record(
                    err.reason,
                    f"clean-up of {step.condition} failed and will not be retried: {err.message}",
                    "Warning",
                )
        if retry is None:
            metrics.RECONCILES.labels("finalize", "done", "").inc()
        else:
            metrics.RECONCILES.labels("finalize", "retry", str(retry.reason)).inc()
        return Outcome({}, ctx.events, retry)
