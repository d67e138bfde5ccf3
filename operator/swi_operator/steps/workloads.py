"""WorkloadsReady: workloads running as the service account get the workload identity label.

The identity webhook injects the token into pods labelled ``azure.workload.identity/use: "true"``
when they are created, so the label goes on the pod template of every Deployment, StatefulSet,
DaemonSet, Job and CronJob in the namespace that runs as the service account (and matches
``spec.workloads.selector``); changing the template rolls the pods. A workload the operator
labelled is marked ``sqlidentity.io/labelled-by``, so that only those labels are removed later; a
label somebody else set stays. Jobs run by a CronJob follow its template; a running Job's template
is immutable, which the condition reports. Running pods of the service account without the
injected token are counted and named (still rolling, or no webhook in the cluster).

Workloads created after the resource are labelled by the next drift check.
"""

from __future__ import annotations

from swi_operator.errors import PermanentError
from swi_operator.kube import KubeClient, Workload
from swi_operator.steps import Context, StepResult

USE_LABEL = "azure.workload.identity/use"
LABELLED_BY = "sqlidentity.io/labelled-by"
MAX_NAMED_PODS = 10


def _in_scope(ctx: Context, workload: Workload) -> bool:
    if workload.kind.kind == "Job" and (workload.finished or workload.owned_by_cronjob):
        return False
    selector = ctx.spec.workload_selector
    return workload.service_account == ctx.spec.service_account_name and (
        selector is None or selector.matches(workload.labels)
    )


class WorkloadsStep:
    condition = "WorkloadsReady"

    def __init__(self, kube: KubeClient) -> None:
        self._kube = kube

    async def reconcile(self, ctx: Context) -> StepResult:
        ns, me = ctx.resource.namespace, ctx.resource.name
        workloads = await self._kube.list_workloads(ns)
        matched = [w for w in workloads if _in_scope(ctx, w)]
        refused: list[tuple[str, str]] = []  # (workload, why)
        for workload in matched:
            if workload.template_labels.get(USE_LABEL) == "true":
                continue
            try:
                await self._kube.patch_workload(
                    ns, workload, {USE_LABEL: "true"}, {LABELLED_BY: me}
                )
            except PermanentError as err:
                refused.append((workload.ref, err.message))
                continue
            ctx.record("WorkloadLabelled", f"labelled the pod template of {workload.ref}")
        for workload in workloads:
            if workload.annotations.get(LABELLED_BY) == me and workload not in matched:
                await self._unlabel(ctx, workload)

        pods = await self._kube.list_pods(ns)
        without = sorted(
            p.name
            for p in pods
            if p.active and p.service_account == ctx.spec.service_account_name and not p.has_token
        )
        fields = {
            "workloads": {
                "matched": len(matched),
                "labelled": len(matched) - len(refused),
                "notLabelled": [ref for ref, _ in refused],
                "podsWithoutToken": len(without),
                "podsWithoutTokenNames": without[:MAX_NAMED_PODS],
            }
        }
        if refused:
            return StepResult(
                "False",
                "WorkloadNotLabelled",
                "; ".join(f"{ref}: {why}" for ref, why in refused)
                + " (re-create the workload to give its pods the token)",
                fields,
            )
        pods_note = (
            f"; {len(without)} running pod(s) of the service account have no injected token yet "
            f"(rolling, or no workload identity webhook): {', '.join(without[:MAX_NAMED_PODS])}"
            if without
            else ""
        )
        if not matched:
            return StepResult(
                "True",
                "NoWorkloads",
                f"no workload runs as service account {ctx.spec.service_account_name} yet; "
                f"new ones are labelled by the next drift check{pods_note}",
                fields,
            )
        return StepResult(
            "True",
            "WorkloadsLabelled",
            f"{len(matched)} workload(s) run as {ctx.spec.service_account_name} with the "
            f"workload identity label{pods_note}",
            fields,
        )

    async def _unlabel(self, ctx: Context, workload: Workload) -> None:
        try:
            await self._kube.patch_workload(
                ctx.resource.namespace, workload, {USE_LABEL: None}, {LABELLED_BY: None}
            )
        except PermanentError as err:
            ctx.record("WorkloadNotUnlabelled", f"{workload.ref}: {err.message}", "Warning")
            return
        ctx.record("WorkloadUnlabelled", f"removed the workload identity label from {workload.ref}")

    async def finalize(self, ctx: Context) -> None:
        for workload in await self._kube.list_workloads(ctx.resource.namespace):
            if workload.annotations.get(LABELLED_BY) == ctx.resource.name:
                await self._unlabel(ctx, workload)
