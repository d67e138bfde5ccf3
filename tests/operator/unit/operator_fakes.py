"""In-memory stand-ins for the operator's two narrow interfaces, ``CredentialStore`` and
``KubeClient``, for unit tests of the steps and the pipeline (no cluster, no emulator).

They keep the contracts the real clients keep: upsert creates or updates by name, delete of a
missing credential succeeds, 20 credentials at most, ``fail_next`` injects a ``ReconcileError``
into the next call of a method. They count writes, so tests can assert "no write".
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from swi_operator.cloud import FederatedCredential, ResolvedIdentity
from swi_operator.errors import PermanentError, Reason, ReconcileError
from swi_operator.kube import WORKLOAD_KINDS, Pod, ServiceAccount, Workload, WorkloadKind
from swi_operator.spec import ApplicationRef, IdentityRef

TENANT = "8a1f3c2e-5b7d-4e90-a1c3-0f2e4d6b8a10"
APP = "5e0c1d9a-7b3f-4c2e-9a1d-000000000002"
OTHER_APP = "5e0c1d9a-7b3f-4c2e-9a1d-000000000003"
MI_ID = (
    "/subscriptions/3b9d2f10-6c1a-4e7b-8d5f-a2c4e6f8b0d1/resourceGroups/sandbox-rg/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/customer-api-identity"
)
ISSUER = "https://127.0.0.1:6443"


class Faults:
    def __init__(self) -> None:
        self._next: dict[str, list[ReconcileError]] = {}

    def fail_next(self, method: str, error: ReconcileError, times: int = 1) -> None:
        self._next.setdefault(method, []).extend([error] * times)

    def check(self, method: str) -> None:
        queued = self._next.get(method)
        if queued:
            raise queued.pop(0)


class FakeStore(Faults):
    def __init__(self) -> None:
        super().__init__()
        self.credentials: dict[
            str, dict[str, FederatedCredential]
        ] = {}  # identity key -> name -> c
        self.known: set[str] = set()
        self.writes: Counter[str] = Counter()
        self._ids = 0

    def add_identity(self, ref: IdentityRef) -> None:
        self.known.add(ref.key)
        self.credentials.setdefault(ref.key, {})

    def put(self, ref: IdentityRef, credential: FederatedCredential) -> None:
        """Arrange a credential out of band (another cluster, a person)."""
        self.add_identity(ref)
        self.credentials[ref.key][credential.name] = credential

    def of(self, ref: IdentityRef) -> list[FederatedCredential]:
        return list(self.credentials.get(ref.key, {}).values())

    async def resolve(self, ref: IdentityRef) -> ResolvedIdentity:
        self.check("resolve")
        if ref.key not in self.known:
            raise PermanentError(Reason.IDENTITY_NOT_FOUND, f"no {ref.display}")
        client = ref.client_id if isinstance(ref, ApplicationRef) else "mi-client-id"
        name = "app-name" if isinstance(ref, ApplicationRef) else ref.name
        return ResolvedIdentity(ref, client, TENANT, name, f"object-of-{ref.key}")

    async def list(self, identity: ResolvedIdentity) -> list[FederatedCredential]:
        self.check("list")
        return self.of(identity.ref)

    async def upsert(
        self, identity: ResolvedIdentity, credential: FederatedCredential
    ) -> FederatedCredential:
        self.check("upsert")
        self.writes["upsert"] += 1
        existing = self.credentials[identity.ref.key]
        if credential.name not in existing and len(existing) >= 20:
            raise PermanentError(Reason.CREDENTIAL_LIMIT_REACHED, "maximum of 20 reached")
        if any(
            c.name != credential.name
            and (c.issuer, c.subject) == (credential.issuer, credential.subject)
            for c in existing.values()
        ):  # as Entra refuses it
            raise PermanentError(
                Reason.CREDENTIAL_CONFLICT, "Issuer and subject combination already exists"
            )
        self._ids += 1
        stored = dataclasses.replace(
            credential,
            id=existing[credential.name].id if credential.name in existing else f"id-{self._ids}",
        )
        if not isinstance(identity.ref, ApplicationRef):
            stored = dataclasses.replace(stored, description=None)
        existing[credential.name] = stored
        return stored

    async def delete(self, identity: ResolvedIdentity, name: str) -> None:
        self.check("delete")
        self.writes["delete"] += 1
        self.credentials[identity.ref.key].pop(name, None)


class FakeKube(Faults):
    def __init__(self, issuer: str = ISSUER) -> None:
        super().__init__()
        self.issuer = issuer
        self.service_accounts: dict[tuple[str, str], dict[str, str]] = {}
        self.workloads: dict[tuple[str, str, str], dict[str, Any]] = {}  # (ns, kind, name)
        self.pods: dict[str, list[Pod]] = {}
        self.resources: dict[tuple[str, str], dict[str, Any]] = {}
        self.page_size = 500  # the operator's LIST limit
        self.writes: Counter[str] = Counter()
        self.status_patches: list[tuple[str, str, Mapping[str, Any]]] = []
        self.events: list[tuple[str, str, str]] = []  # (object name, type, reason)
        self.event_messages: list[str] = []
        self.workload_lists: list[str] = []  # "cached" or "live", in order
        # workloads the watch-fed cache has not seen yet: only a live list shows them
        self.not_cached_yet: set[tuple[str, str, str]] = set()
        self.peering: dict[str, Any] = {}

    # arrangement helpers
    def add_workload(
        self,
        namespace: str,
        kind: str,
        name: str,
        service_account: str,
        labels: Mapping[str, str] | None = None,
        template_labels: Mapping[str, str] | None = None,
        immutable: bool = False,
    ) -> None:
        self.workloads[(namespace, kind, name)] = {
            "labels": dict(labels or {}),
            "annotations": {},
            "sa": service_account,
            "template_labels": dict(template_labels or {}),
            "immutable": immutable,
        }

    def template_labels(self, namespace: str, kind: str, name: str) -> dict[str, str]:
        labels: dict[str, str] = self.workloads[(namespace, kind, name)]["template_labels"]
        return labels

    # KubeClient
    async def discover_issuer(self) -> str:
        self.check("discover_issuer")
        return self.issuer

    async def get_service_account(self, namespace: str, name: str) -> ServiceAccount | None:
        self.check("get_service_account")
        found = self.service_accounts.get((namespace, name))
        return None if found is None else ServiceAccount(name, dict(found))

    async def create_service_account(
        self, namespace: str, name: str, annotations: Mapping[str, str]
    ) -> None:
        self.check("create_service_account")
        self.writes["create_service_account"] += 1
        self.service_accounts[(namespace, name)] = dict(annotations)

    async def patch_service_account(
        self,
        namespace: str,
        name: str,
        annotations: Mapping[str, str | None],
        resource_version: str = "",
    ) -> None:
        self.check("patch_service_account")
        self.writes["patch_service_account"] += 1
        current = self.service_accounts[(namespace, name)]
        for key, value in annotations.items():
            if value is None:
                current.pop(key, None)
            else:
                current[key] = value

    async def delete_service_account(self, namespace: str, name: str) -> None:
        self.writes["delete_service_account"] += 1
        self.service_accounts.pop((namespace, name), None)

    async def list_workloads(self, namespace: str, live: bool = False) -> list[Workload]:
        self.check("list_workloads")
        self.workload_lists.append("live" if live else "cached")
        kinds: dict[str, WorkloadKind] = {k.kind: k for k in WORKLOAD_KINDS}
        return [
            Workload(
                kind=kinds[kind],
                name=name,
                labels=dict(w["labels"]),
                annotations=dict(w["annotations"]),
                service_account=w["sa"],
                template_labels=dict(w["template_labels"]),
            )
            for (ns, kind, name), w in self.workloads.items()
            if ns == namespace and (live or (ns, kind, name) not in self.not_cached_yet)
        ]

    async def patch_workload(
        self,
        namespace: str,
        workload: Workload,
        template_labels: Mapping[str, str | None],
        annotations: Mapping[str, str | None],
    ) -> None:
        self.writes["patch_workload"] += 1
        stored = self.workloads[(namespace, workload.kind.kind, workload.name)]
        if stored["immutable"]:
            raise PermanentError(Reason.KUBERNETES_REJECTED, "spec.template: field is immutable")
        for target, changes in (
            (stored["template_labels"], template_labels),
            (stored["annotations"], annotations),
        ):
            for key, value in changes.items():
                if value is None:
                    target.pop(key, None)
                else:
                    target[key] = value

    async def list_pods(self, namespace: str) -> list[Pod]:
        return list(self.pods.get(namespace, []))

    async def get_resource(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.resources.get((namespace, name))

    async def list_resources(self, namespaces: Sequence[str]) -> list[dict[str, Any]]:
        return [r for (ns, _), r in self.resources.items() if not namespaces or ns in namespaces]

    async def resource_pages(
        self, namespaces: Sequence[str]
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """``list_resources`` in pages of ``page_size``, in the order the resources were added."""
        listed = await self.list_resources(namespaces)
        for start in range(0, len(listed), self.page_size):
            yield listed[start : start + self.page_size]

    async def patch_resource_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None:
        self.status_patches.append((namespace, name, status))
        resource = self.resources.get((namespace, name))
        if resource is not None:
            resource.setdefault("status", {}).update(status)

    async def post_event(
        self,
        involved: Mapping[str, str],
        type_: str,
        reason: str,
        message: str,
        component: str,
        instance: str,
    ) -> None:
        self.events.append((involved["name"], type_, reason))
        self.event_messages.append(message)

    async def peering_status(self, name: str, namespace: str | None) -> dict[str, Any]:
        return dict(self.peering)


def resource(
    name: str = "customer-reader",
    namespace: str = "workload-demo",
    *,
    service_account: str = "workload-demo-service-account",
    identity: Mapping[str, str] | None = None,
    generation: int = 1,
    status: Mapping[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A SqlWorkloadIdentity body as the API server would return it."""
    return {
        "apiVersion": "sqlidentity.io/v1alpha1",
        "kind": "SqlWorkloadIdentity",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{namespace}-{name}",
            "generation": generation,
            "finalizers": ["sqlidentity.io/finalizer"],
        },
        "spec": {
            "serviceAccountName": service_account,
            "identity": dict(identity or {"applicationClientId": APP}),
            **spec,
        },
        "status": dict(status or {}),
    }
