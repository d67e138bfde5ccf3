"""ServiceAccountReady: the service account exists and carries the workload identity annotations.

The webhook (AKS's, or any azure-workload-identity install) reads ``azure.workload.identity/
client-id`` and ``/tenant-id`` from the service account of a pod. The operator sets exactly those,
never touching other annotations, and records on the service account what it did:

* ``sqlidentity.io/owner``: the SqlWorkloadIdentity that federates this service account. A
  service account has one client id, so it is claimed by one resource at a time; a second resource
  naming it gets ``ServiceAccountConflict`` and touches nothing.
* ``sqlidentity.io/managed-annotations``: the annotation keys the operator set, so that deletion
  removes those and only those (an annotation a person had already set to the same value stays).
* ``sqlidentity.io/created-by``: present when the operator created the service account; deletion
  then deletes it.
"""

from __future__ import annotations

from collections.abc import Mapping

from swi_operator.errors import PermanentError, Reason
from swi_operator.kube import KubeClient, ServiceAccount
from swi_operator.steps import Context, ResourceRef, StepResult

CLIENT_ID = "azure.workload.identity/client-id"
TENANT_ID = "azure.workload.identity/tenant-id"
OWNER = "sqlidentity.io/owner"
MANAGED = "sqlidentity.io/managed-annotations"
CREATED_BY = "sqlidentity.io/created-by"


def _managed(sa: ServiceAccount) -> set[str]:
    return {key for key in sa.annotations.get(MANAGED, "").split(",") if key}


async def ensure_not_claimed(kube: KubeClient, sa: ServiceAccount | None, me: ResourceRef) -> None:
    """Raise ``ServiceAccountConflict`` if another live resource federates ``sa``."""
    owner = sa.annotations.get(OWNER) if sa else None
    if sa is None or not owner or owner == me.name:
        return
    if await kube.get_resource(me.namespace, owner) is not None:
        raise PermanentError(
            Reason.SERVICE_ACCOUNT_CONFLICT,
            f"service account {sa.name} is already federated by SqlWorkloadIdentity "
            f"{me.namespace}/{owner}; a service account has one identity: use another one",
        )


class ServiceAccountStep:
    condition = "ServiceAccountReady"

    def __init__(self, kube: KubeClient) -> None:
        self._kube = kube

    async def reconcile(self, ctx: Context) -> StepResult:
        identity = ctx.require_identity()
        ns, name, me = ctx.resource.namespace, ctx.spec.service_account_name, ctx.resource
        desired = {CLIENT_ID: identity.client_id, TENANT_ID: identity.tenant_id}
        # Read a moment ago by the federated credential step of this pass; a write in between
        # makes the create or patch below fail or miss, and the next pass sees it.
        read = ctx.service_account_read
        sa = ctx.service_account if read else await self._kube.get_service_account(ns, name)
        if sa is None:
            await self._kube.create_service_account(
                ns,
                name,
                {
                    **desired,
                    OWNER: me.name,
                    MANAGED: ",".join(sorted(desired)),
                    CREATED_BY: me.name,
                },
            )
            ctx.record(
                "ServiceAccountCreated", f"created service account {name} for {identity.name}"
            )
            created = True
        else:
            await ensure_not_claimed(self._kube, sa, me)
            self._refuse_foreign_values(sa, desired)
            patch = self._annotations_patch(sa, desired, me)
            if patch:
                # Only on the version this patch was made from: another resource may have claimed
                # the account since (a 409, retried, then ensure_not_claimed refuses).
                await self._kube.patch_service_account(ns, name, patch, sa.resource_version)
                changed = sorted(k for k in patch if k in desired) or ["its ownership record"]
                ctx.record(
                    "ServiceAccountAnnotated", f"set {', '.join(changed)} on service account {name}"
                )
            created = sa.annotations.get(CREATED_BY) == me.name
        previous = (ctx.status.get("serviceAccount") or {}).get("name")
        if previous and previous != name:
            await self.release(ctx, previous)
        return StepResult(
            "True",
            "Annotated",
            f"service account {name} carries client id {identity.client_id}",
            {"serviceAccount": {"name": name, "created": created}},
        )

    @staticmethod
    def _refuse_foreign_values(sa: ServiceAccount, desired: Mapping[str, str]) -> None:
        """Refuse to overwrite a value someone else set (they may rely on it)."""
        managed = _managed(sa)
        for key, value in desired.items():
            current = sa.annotations.get(key)
            if current is not None and current != value and key not in managed:
                raise PermanentError(
                    Reason.SERVICE_ACCOUNT_CONFLICT,
                    f"service account {sa.name} has {key}={current}, set outside the operator; "
                    f"remove that annotation or point spec.identity at {current}",
                )

    @staticmethod
    def _annotations_patch(
        sa: ServiceAccount, desired: Mapping[str, str], me: ResourceRef
    ) -> dict[str, str]:
        managed = _managed(sa)
        patch: dict[str, str] = {}
        for key, value in desired.items():
            if sa.annotations.get(key) != value:
                patch[key] = value
                managed.add(key)
        if sa.annotations.get(OWNER) != me.name:
            patch[OWNER] = me.name
        joined = ",".join(sorted(managed))
        if sa.annotations.get(MANAGED, "") != joined:
            patch[MANAGED] = joined
        return patch

    async def release(self, ctx: Context, name: str) -> None:
        """Undo on ``name`` what this resource did: delete it if created, else unannotate."""
        ns, me = ctx.resource.namespace, ctx.resource
        sa = await self._kube.get_service_account(ns, name)
        if sa is None or sa.annotations.get(OWNER) != me.name:
            return
        if sa.annotations.get(CREATED_BY) == me.name:
            await self._kube.delete_service_account(ns, name)
            ctx.record("ServiceAccountDeleted", f"deleted service account {name}, which it created")
            return
        removals: dict[str, str | None] = dict.fromkeys(_managed(sa) | {OWNER, MANAGED})
        await self._kube.patch_service_account(ns, name, removals)
        ctx.record("ServiceAccountReleased", f"removed its annotations from service account {name}")

    async def finalize(self, ctx: Context) -> None:
        await self.release(ctx, ctx.spec.service_account_name)
        previous = (ctx.status.get("serviceAccount") or {}).get("name")
        if previous and previous != ctx.spec.service_account_name:
            await self.release(ctx, previous)
