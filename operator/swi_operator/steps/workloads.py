"""WorkloadsReady: workloads running as the service account get the workload identity label, and
their pods the injected token.

The identity webhook (the AKS add-on, or ours: ``webhooks``) injects the token into pods labelled
``azure.workload.identity/use: "true"`` when they are created, so the label goes on the pod
template of every Deployment, StatefulSet, DaemonSet, Job and CronJob in the namespace that runs
as the service account and whose *pod template's* labels match ``spec.workloads.selector`` (the
labels its pods get, where users put ``app``, as a Service or a PodDisruptionBudget selects pods;
the workload's own metadata labels play no part). Changing a template rolls the pods.

Two ways a workload gets the label:

* at admission, before its first pod exists: ``workload_webhook`` asks ``selected`` below whether
  a live resource of the namespace that the policies allow wants it, and adds the label to the
  workload it creates (or updates);
* at reconcile and every drift check, here: the safety net for workloads admitted while that
  webhook was unreachable, and for workloads that existed before their resource.

A workload the operator labelled here is marked ``sqlidentity.io/labelled-by``, so that only those
labels are removed later; a label somebody else set stays (so does one the webhook added: nothing
a tenant writes decides what the operator removes, and a label alone grants nothing once the
service account's annotation is gone). Jobs run by a CronJob follow its template; a running Job's
template is immutable, which the condition reports.

Workloads and pods are read from watch-fed caches (``kube.WorkloadCaches``), milliseconds
behind the API server; a resource whose service account no cached workload runs as, and a
deletion, read live.

The condition tells the truth about pods, from the namespace's one pod list per cycle: an active
pod of the service account that the selector covers and that has no injected token, older than
the rollout grace (``--pod-token-grace``, counted from the pod's creation or the last time this
step labelled a workload, whichever is later), turns it False (``PodsWithoutToken``), naming the
pods and the likely cause of each. Younger ones are named, and the step asks to be run again
when their grace ends.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence

from swi_operator.errors import PermanentError, Reason, TransientError
from swi_operator.kube import KubeClient, Pod, Workload
from swi_operator.spec import Spec
from swi_operator.steps import Context, StepResult

USE_LABEL = "azure.workload.identity/use"
SKIP_CONTAINERS_ANNOTATION = "azure.workload.identity/skip-containers"
LABELLED_BY = "sqlidentity.io/labelled-by"
MAX_NAMED = 10
DEFAULT_POD_TOKEN_GRACE_S = 120.0

# Why a pod has no token, most specific first: the message names the pods under each.
CAUSE_SELECTOR = (
    "its labels do not match spec.workloads.selector (the selector matches pod template labels)"
)
CAUSE_BEFORE_LABEL = (
    "created before its pod template had the azure.workload.identity/use label: the rollout "
    "replaces it; a bare pod or a Job's pod must be re-created"
)
CAUSE_SKIPPED = (
    "its azure.workload.identity/skip-containers annotation leaves out every container that "
    "needs the token"
)
CAUSE_NO_WEBHOOK = (
    "labelled, yet no workload identity webhook injected the token: on AKS enable the workload "
    "identity add-on (az aks update --enable-workload-identity); elsewhere install "
    "deploy/overlays/generic (the operator's injection webhook); or the service account had no "
    "client-id annotation when the pod was created (re-create the pod)"
)


def selected(spec: Spec, service_account: str, template_labels: Mapping[str, str]) -> bool:
    """Whether a workload (or a pod) running as ``service_account`` with these pod labels is one
    of the resource's: the same answer at admission (``workload_webhook``) and at reconcile."""
    selector = spec.workload_selector
    return service_account == spec.service_account_name and (
        selector is None or selector.matches(template_labels)
    )


def _runs_as(ctx: Context, workload: Workload) -> bool:
    if workload.kind.kind == "Job" and (workload.finished or workload.owned_by_cronjob):
        return False
    return workload.service_account == ctx.spec.service_account_name


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_NAMED])
    return shown + (f" and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else "")


def _cause(spec: Spec, pod: Pod) -> str:
    if spec.workload_selector is not None and not spec.workload_selector.matches(pod.labels):
        return CAUSE_SELECTOR
    if pod.labels.get(USE_LABEL) != "true":
        return CAUSE_BEFORE_LABEL
    if pod.annotations.get(SKIP_CONTAINERS_ANNOTATION):
        return CAUSE_SKIPPED
    return CAUSE_NO_WEBHOOK


def _parse_time(raw: object) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(str(raw))
    except ValueError:
        return None


class WorkloadsStep:
    condition = "WorkloadsReady"

    def __init__(
        self,
        kube: KubeClient,
        pod_token_grace: float = DEFAULT_POD_TOKEN_GRACE_S,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._kube = kube
        self._grace = dt.timedelta(seconds=pod_token_grace)
        self._clock = clock

    async def reconcile(self, ctx: Context) -> StepResult:
        ns, me, sa = ctx.resource.namespace, ctx.resource.name, ctx.spec.service_account_name
        now = self._clock()
        workloads = await self._kube.list_workloads(ns)
        if not any(_runs_as(ctx, w) for w in workloads):
            # The caches are milliseconds behind: a workload created just before its resource
            # may not be in them yet. Before saying "no workloads", ask the API server.
            workloads = await self._kube.list_workloads(ns, live=True)
        of_account = [w for w in workloads if _runs_as(ctx, w)]
        matched = [w for w in of_account if selected(ctx.spec, sa, w.template_labels)]
        refused: list[tuple[str, str]] = []  # (workload, why)
        labelled_now = False
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
            labelled_now = True
            ctx.record("WorkloadLabelled", f"labelled the pod template of {workload.ref}")
        for workload in workloads:
            if workload.annotations.get(LABELLED_BY) == me and workload not in matched:
                await self._unlabel(ctx, workload)

        previous = (ctx.status.get("workloads") or {}) if isinstance(ctx.status, Mapping) else {}
        last_labelled = now if labelled_now else _parse_time(previous.get("lastLabelled"))
        pods = [
            p
            for p in await self._kube.list_pods(ns)
            if p.active and p.service_account == sa and not p.has_token
        ]
        counted = [
            p
            for p in pods
            if ctx.spec.workload_selector is None or ctx.spec.workload_selector.matches(p.labels)
        ]
        overdue: dict[str, list[str]] = {}  # cause -> pod names
        rolling: list[str] = []
        next_check: dt.timedelta | None = None
        for pod in sorted(counted, key=lambda p: p.name):
            known = [t for t in (pod.created, last_labelled) if t is not None]
            left = max(known) + self._grace - now if known else dt.timedelta(0)
            if left > dt.timedelta(0):
                rolling.append(pod.name)
                next_check = left if next_check is None else min(next_check, left)
            else:
                overdue.setdefault(_cause(ctx.spec, pod), []).append(pod.name)
        without = sorted(p.name for p in counted)
        fields = {
            "workloads": {
                "matched": len(matched),
                "labelled": len(matched) - len(refused),
                "notLabelled": [ref for ref, _ in refused],
                "podsWithoutToken": len(without),
                "podsWithoutTokenNames": without[:MAX_NAMED],
                # when this step last labelled one: a rollout's grace starts there
                **({"lastLabelled": last_labelled.isoformat()} if last_labelled else {}),
            }
        }
        retry = (
            TransientError(
                Reason.PODS_ROLLING,
                f"pod(s) {_names(rolling)} have no injected token yet; checking again when the "
                "rollout grace ends",
                delay=next_check.total_seconds() + 1,
            )
            if next_check is not None
            else None
        )
        if refused:
            return StepResult(
                "False",
                "WorkloadNotLabelled",
                "; ".join(f"{ref}: {why}" for ref, why in refused)
                + " (re-create the workload to give its pods the token)",
                fields,
            )
        if overdue:
            count = sum(len(names) for names in overdue.values())
            return StepResult(
                "False",
                Reason.PODS_WITHOUT_TOKEN,
                f"{count} pod(s) of service account {sa} run without the injected token: "
                + "; ".join(f"{_names(names)}: {cause}" for cause, names in overdue.items()),
                fields,
                retry,
            )
        rolling_note = (
            f"; {len(rolling)} pod(s) have no injected token yet, within the rollout grace: "
            f"{_names(rolling)}"
            if rolling
            else ""
        )
        if not matched:
            left_out = [w.ref for w in of_account]
            if left_out:
                return StepResult(
                    "False",
                    Reason.SELECTOR_MATCHES_NOTHING,
                    f"spec.workloads.selector matches none of the workloads that run as service "
                    f"account {sa}: {_names(left_out)} (the selector matches their pod template "
                    "labels; fix the selector or the templates' labels, or remove it to select "
                    "them all)",
                    fields,
                    retry,
                )
            return StepResult(
                "True",
                "NoWorkloads",
                f"no workload runs as service account {sa} yet; new ones are labelled when they "
                f"are created{rolling_note}",
                fields,
                retry,
            )
        return StepResult(
            "True",
            "WorkloadsLabelled",
            f"{len(matched)} workload(s) run as {sa} with the workload identity label"
            f"{rolling_note}",
            fields,
            retry,
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
        # Live: a label this resource set a moment ago must not be missed on the way out.
        for workload in await self._kube.list_workloads(ctx.resource.namespace, live=True):
            if workload.annotations.get(LABELLED_BY) == ctx.resource.name:
                await self._unlabel(ctx, workload)
