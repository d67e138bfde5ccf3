"""The Kubernetes side of the operator behind one narrow interface, ``KubeClient``.

``KubernetesClient`` implements it with plain JSON over aiohttp on the event loop
(``kube_http.ApiServerSession``), configured from the official client's ``ApiClient`` (the
kubeconfig or the in-cluster service account): the steps need a handful of fields, not the typed
models. Each call is one short request. Failures leave as ``errors.ReconcileError``
(``errors.kubernetes_error``), except "not found", which each method turns into the answer it
means (None, or nothing to do).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from kubernetes import client as k8s
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from swi_operator.cycle import changed, in_drift_cycle, namespace_key, shared_read
from swi_operator.errors import ReconcileError, kubernetes_error
from swi_operator.kube_http import ApiServerSession
from swi_operator.watch_cache import TOO_LARGE, WatchCache

GROUP = "sqlidentity.io"
VERSION = "v1alpha1"
PLURAL = "sqlworkloadidentities"
POLICY_PLURAL = "sqlidentitypolicies"  # cluster-scoped: swi_operator.policy
POOL_PLURAL = "sqlidentitypools"  # cluster-scoped: swi_operator.pool
REQUEST_TIMEOUT_S = 30.0
KUBE_CONNECTIONS = 16  # API requests in flight at most
MERGE_PATCH = "application/merge-patch+json"
CRD_ESTABLISH_TIMEOUT_S = 30.0


def in_cluster_server(env: Mapping[str, str]) -> str | None:
    """The API server as a pod reaches it: the address the kubelet puts in every container's
    environment (what client-go's in-cluster configuration uses), not a name that needs cluster
    DNS. None outside a pod."""
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        return None
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


@dataclass(frozen=True)
class ServiceAccount:
    name: str
    annotations: Mapping[str, str] = field(default_factory=dict)
    resource_version: str = ""  # as read: a patch made from this view may require it


@dataclass(frozen=True)
class WorkloadKind:
    kind: str
    api: str  # path prefix, e.g. /apis/apps/v1
    plural: str
    template_path: tuple[str, ...]  # where the pod template lives in the object


WORKLOAD_KINDS: tuple[WorkloadKind, ...] = (
    WorkloadKind("Deployment", "/apis/apps/v1", "deployments", ("spec", "template")),
    WorkloadKind("StatefulSet", "/apis/apps/v1", "statefulsets", ("spec", "template")),
    WorkloadKind("DaemonSet", "/apis/apps/v1", "daemonsets", ("spec", "template")),
    WorkloadKind("Job", "/apis/batch/v1", "jobs", ("spec", "template")),
    WorkloadKind(
        "CronJob", "/apis/batch/v1", "cronjobs", ("spec", "jobTemplate", "spec", "template")
    ),
)


@dataclass(frozen=True)
class Workload:
    kind: WorkloadKind
    name: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    service_account: str
    template_labels: Mapping[str, str]
    finished: bool = False  # a Job that completed or failed
    owned_by_cronjob: bool = False  # a Job its CronJob's template speaks for

    @property
    def ref(self) -> str:
        return f"{self.kind.kind}/{self.name}"


@dataclass(frozen=True)
class Pod:
    name: str
    service_account: str
    active: bool
    has_token: bool  # AZURE_FEDERATED_TOKEN_FILE and AZURE_CLIENT_ID injected into a container
    created: dt.datetime | None = None  # metadata.creationTimestamp, set by the API server
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)


class KubeClient(Protocol):
    async def discover_issuer(self) -> str: ...

    async def get_service_account(self, namespace: str, name: str) -> ServiceAccount | None: ...

    async def create_service_account(
        self, namespace: str, name: str, annotations: Mapping[str, str]
    ) -> None: ...

    async def patch_service_account(
        self,
        namespace: str,
        name: str,
        annotations: Mapping[str, str | None],
        resource_version: str = "",
    ) -> None: ...

    async def delete_service_account(self, namespace: str, name: str) -> None: ...

    async def list_workloads(self, namespace: str, live: bool = False) -> list[Workload]: ...

    async def patch_workload(
        self,
        namespace: str,
        workload: Workload,
        template_labels: Mapping[str, str | None],
        annotations: Mapping[str, str | None],
    ) -> None: ...

    async def list_pods(self, namespace: str) -> list[Pod]: ...

    async def get_resource(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def list_resources(self, namespaces: Sequence[str]) -> list[dict[str, Any]]: ...

    def resource_pages(self, namespaces: Sequence[str]) -> AsyncIterator[list[dict[str, Any]]]: ...

    async def patch_resource_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None: ...

    async def post_event(
        self,
        involved: Mapping[str, str],
        type_: str,
        reason: str,
        message: str,
        component: str,
        instance: str,
    ) -> None: ...

    async def peering_status(self, name: str, namespace: str | None) -> dict[str, Any]: ...


def _dig(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def _nest(path: Sequence[str], leaf: Any) -> dict[str, Any]:
    result: Any = leaf
    for key in reversed(path):
        result = {key: result}
    return dict(result)


def _workload(kind: WorkloadKind, obj: Mapping[str, Any]) -> Workload:
    meta = obj.get("metadata") or {}
    template = _dig(obj, *kind.template_path) or {}
    conditions = _dig(obj, "status", "conditions") or []
    finished = kind.kind == "Job" and any(
        c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions
    )
    owners = meta.get("ownerReferences") or []
    return Workload(
        kind=kind,
        name=meta.get("name", ""),
        labels=meta.get("labels") or {},
        annotations=meta.get("annotations") or {},
        service_account=_dig(template, "spec", "serviceAccountName") or "default",
        template_labels=_dig(template, "metadata", "labels") or {},
        finished=finished,
        owned_by_cronjob=any(o.get("kind") == "CronJob" for o in owners),
    )


def _pod(obj: Mapping[str, Any]) -> Pod:
    spec = obj.get("spec") or {}
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    # The injection with its client id: since the webhooks (the add-on's and ours) inject the
    # token even for a service account without the client-id annotation, a pod created before
    # the operator annotated the account has the token file but no AZURE_CLIENT_ID, and cannot
    # sign in as the resource's identity: it counts as without the token.
    has_token = any(
        {"AZURE_FEDERATED_TOKEN_FILE", "AZURE_CLIENT_ID"}
        <= {env.get("name") for env in container.get("env") or []}
        for container in containers
    )
    phase = _dig(obj, "status", "phase")
    deleting = _dig(obj, "metadata", "deletionTimestamp") is not None
    created = None
    with contextlib.suppress(TypeError, ValueError):
        created = dt.datetime.fromisoformat(str(_dig(obj, "metadata", "creationTimestamp")))
    return Pod(
        name=_dig(obj, "metadata", "name") or "",
        service_account=spec.get("serviceAccountName") or "default",
        active=phase not in ("Succeeded", "Failed") and not deleting,
        has_token=has_token,
        created=created,
        labels=dict(_dig(obj, "metadata", "labels") or {}),
        annotations=dict(_dig(obj, "metadata", "annotations") or {}),
    )


# What the caches keep of a workload or pod: the labels selectors match (at most this many,
# this long in all: a tenant's objects beyond it are listed live) and these annotations only.
CACHED_LABELS_MAX = 64
CACHED_LABELS_CHARS_MAX = 8192
CACHED_ANNOTATIONS = ("sqlidentity.io/labelled-by", "azure.workload.identity/skip-containers")


def _small(labels: Mapping[str, Any]) -> bool:
    chars = sum(len(str(k)) + len(str(v)) for k, v in labels.items())
    return len(labels) <= CACHED_LABELS_MAX and chars <= CACHED_LABELS_CHARS_MAX


def _kept_annotations(annotations: Mapping[str, str]) -> dict[str, str]:
    return {k: v[:256] for k in CACHED_ANNOTATIONS if isinstance(v := annotations.get(k), str)}


def slim_workload(kind: WorkloadKind) -> Callable[[Mapping[str, Any]], Workload | None]:
    def slim(obj: Mapping[str, Any]) -> Workload | None:
        full = _workload(kind, obj)
        if not _small(full.template_labels):
            return cast(Workload, TOO_LARGE)
        return dataclasses.replace(full, labels={}, annotations=_kept_annotations(full.annotations))

    return slim


def slim_pod(obj: Mapping[str, Any]) -> Pod | None:
    full = _pod(obj)
    if not _small(full.labels):
        return cast(Pod, TOO_LARGE)
    return dataclasses.replace(full, annotations=_kept_annotations(full.annotations))


class WorkloadCaches:
    """Watch-fed caches of the five workload kinds and of pods in all namespaces
    (``watch_cache``), from which ``list_workloads`` and ``list_pods`` answer when they can."""

    def __init__(self, api: ApiClient) -> None:
        apps, batch, core = k8s.AppsV1Api(api), k8s.BatchV1Api(api), k8s.CoreV1Api(api)
        listers = {
            "deployments": apps.list_deployment_for_all_namespaces,
            "statefulsets": apps.list_stateful_set_for_all_namespaces,
            "daemonsets": apps.list_daemon_set_for_all_namespaces,
            "jobs": batch.list_job_for_all_namespaces,
            "cronjobs": batch.list_cron_job_for_all_namespaces,
        }
        self.workloads = [
            WatchCache(listers[kind.plural], slim_workload(kind), kind.kind)
            for kind in WORKLOAD_KINDS
        ]
        self.pods: WatchCache[Pod] = WatchCache(core.list_pod_for_all_namespaces, slim_pod, "pod")

    @property
    def all(self) -> list[WatchCache[Any]]:
        return [*self.workloads, self.pods]

    def start(self) -> None:
        for cache in self.all:
            cache.start()

    def stop(self) -> None:
        for cache in self.all:
            cache.stop()

    def workloads_in(self, namespace: str) -> list[Workload] | None:
        found: list[Workload] = []
        for cache in self.workloads:
            items = cache.in_namespace(namespace)
            if items is None:
                return None
            found.extend(items)
        return found


def _service_account(obj: Mapping[str, Any]) -> ServiceAccount:
    return ServiceAccount(
        str(_dig(obj, "metadata", "name") or ""),
        dict(_dig(obj, "metadata", "annotations") or {}),
        str(_dig(obj, "metadata", "resourceVersion") or ""),
    )


class KubernetesClient:
    def __init__(
        self,
        api: ApiClient,
        connections: int = KUBE_CONNECTIONS,
        caches: WorkloadCaches | None = None,
    ) -> None:
        self.caches = caches
        # On the event loop (kube_http.py), at most this many requests in flight: a thousand
        # reconciles at once queue for a connection instead of each opening one.
        self._http = ApiServerSession(api.configuration, connections, REQUEST_TIMEOUT_S)

    async def close(self) -> None:
        await self._http.close()

    async def _call(
        self,
        doing: str,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: Any = None,
        content_type: str | None = None,
        missing_ok: bool = False,
        decode: bool = True,
    ) -> Any:
        """The decoded answer; with ``decode=False`` just True (or None: missing and
        ``missing_ok``)."""
        try:
            return await self._http.send(method, path, query, body, content_type, decode)
        except ApiException as exc:
            if missing_ok and exc.status == 404:
                return None
            raise _api_error(exc, doing) from exc
        except ReconcileError:
            raise
        except Exception as exc:  # connection refused, TLS, timeouts: all worth retrying
            raise kubernetes_error(None, f"{type(exc).__name__}: {exc}", doing) from exc

    async def discover_issuer(self) -> str:
        doc = await self._call(
            "read the service-account issuer discovery document",
            "GET",
            "/.well-known/openid-configuration",
        )
        issuer = doc.get("issuer") if isinstance(doc, Mapping) else None
        if not isinstance(issuer, str) or not issuer:
            raise kubernetes_error(
                None, "the discovery document has no issuer", "discover the issuer"
            )
        return issuer

    async def get_service_account(self, namespace: str, name: str) -> ServiceAccount | None:
        if in_drift_cycle():
            # One list per namespace and cycle instead of a read per resource (bench/fleet.py)
            accounts = await shared_read(
                (*namespace_key(namespace), "serviceaccount"),
                lambda: self._service_accounts(namespace),
            )
            return accounts.get(name)
        obj = await self._call(
            f"read service account {namespace}/{name}",
            "GET",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}",
            missing_ok=True,
        )
        if obj is None:
            return None
        return _service_account(obj)

    async def _service_accounts(self, namespace: str) -> dict[str, ServiceAccount]:
        found: dict[str, ServiceAccount] = {}
        path = f"/api/v1/namespaces/{namespace}/serviceaccounts"
        for item in await self._list_pages(f"list service accounts in {namespace}", path):
            account = _service_account(item)
            found[account.name] = account
        return found

    async def _list_pages(
        self, doing: str, path: str, drop: Sequence[tuple[str, str]] = ()
    ) -> list[dict[str, Any]]:
        """Every item of a LIST (``_pages``) at once."""
        items: list[dict[str, Any]] = []
        async for listed in self._pages(doing, path, drop):
            items.extend(listed)
        return items

    async def _pages(
        self, doing: str, path: str, drop: Sequence[tuple[str, str]] = ()
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """A LIST, 500 items a page, one page at a time; every item without its
        ``metadata.managedFields`` (nothing here reads them, and on a status-heavy kind they are
        the largest part of an object) and the ``drop`` fields (``(parent, key)``). The pages
        are one snapshot, the first page's; an expired continue token (a caller slower than
        etcd's compaction) raises the API server's 410."""
        token = ""
        while True:
            query = [("limit", "500")] + ([("continue", token)] if token else [])
            page = await self._call(doing, "GET", path, query=query)
            listed = (page or {}).get("items") or []
            for item in listed:
                for parent, key in (("metadata", "managedFields"), *drop):
                    within = item.get(parent)
                    if isinstance(within, dict):
                        within.pop(key, None)
            token = _dig(page or {}, "metadata", "continue") or ""
            del page
            yield listed
            if not token:
                return

    async def create_service_account(
        self, namespace: str, name: str, annotations: Mapping[str, str]
    ) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace, "annotations": dict(annotations)},
        }
        try:
            await self._call(
                f"create service account {namespace}/{name}",
                "POST",
                f"/api/v1/namespaces/{namespace}/serviceaccounts",
                body=body,
                content_type="application/json",
                decode=False,
            )
        finally:
            # the cycle's list of the namespace
            changed((*namespace_key(namespace), "serviceaccount"))

    async def patch_service_account(
        self,
        namespace: str,
        name: str,
        annotations: Mapping[str, str | None],
        resource_version: str = "",
    ) -> None:
        """Set (None: remove) annotations; with ``resource_version``, only on that version of
        the account (else a 409 Conflict, retried: the patch was made from a stale view)."""
        metadata: dict[str, Any] = {"annotations": dict(annotations)}
        if resource_version:
            metadata["resourceVersion"] = resource_version
        try:
            await self._call(
                f"annotate service account {namespace}/{name}",
                "PATCH",
                f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}",
                body={"metadata": metadata},
                content_type=MERGE_PATCH,
                decode=False,
            )
        finally:
            # the cycle's list of the namespace
            changed((*namespace_key(namespace), "serviceaccount"))

    async def delete_service_account(self, namespace: str, name: str) -> None:
        try:
            await self._call(
                f"delete service account {namespace}/{name}",
                "DELETE",
                f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}",
                missing_ok=True,
                decode=False,
            )
        finally:
            # the cycle's list of the namespace
            changed((*namespace_key(namespace), "serviceaccount"))

    async def list_workloads(self, namespace: str, live: bool = False) -> list[Workload]:
        """The namespace's workloads: from the caches (milliseconds behind the API server) when
        they can answer and ``live`` is not asked for, else five LISTs."""
        cached = self.caches.workloads_in(namespace) if self.caches and not live else None
        if cached is not None:
            return cached

        async def of_kind(kind: WorkloadKind) -> list[Workload]:
            found = await self._call(
                f"list {kind.plural} in {namespace}",
                "GET",
                f"{kind.api}/namespaces/{namespace}/{kind.plural}",
            )
            return [_workload(kind, item) for item in (found or {}).get("items") or []]

        async def every_kind() -> list[Workload]:
            lists = await asyncio.gather(*(of_kind(kind) for kind in WORKLOAD_KINDS))
            return [w for items in lists for w in items]

        return list(await shared_read((*namespace_key(namespace), "workloads"), every_kind))

    async def patch_workload(
        self,
        namespace: str,
        workload: Workload,
        template_labels: Mapping[str, str | None],
        annotations: Mapping[str, str | None],
    ) -> None:
        body = _nest(workload.kind.template_path, {"metadata": {"labels": dict(template_labels)}})
        body["metadata"] = {"annotations": dict(annotations)}
        kind = workload.kind
        try:
            await self._call(
                f"label the pod template of {workload.ref} in {namespace}",
                "PATCH",
                f"{kind.api}/namespaces/{namespace}/{kind.plural}/{workload.name}",
                body=body,
                content_type=MERGE_PATCH,
                missing_ok=True,
                decode=False,
            )
        finally:
            changed((*namespace_key(namespace), "workloads"))  # what a drift cycle read is stale

    async def list_pods(self, namespace: str) -> list[Pod]:
        cached = self.caches.pods.in_namespace(namespace) if self.caches else None
        if cached is not None:
            return cached

        async def fetch() -> list[Pod]:
            found = await self._call(
                f"list pods in {namespace}", "GET", f"/api/v1/namespaces/{namespace}/pods"
            )
            return [_pod(item) for item in (found or {}).get("items") or []]

        return list(await shared_read((*namespace_key(namespace), "pods"), fetch))

    async def request_token(
        self, namespace: str, service_account: str, audience: str, expiration_seconds: int
    ) -> str:
        """A TokenRequest token for the service account, as the kubelet projects it into pods."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"audiences": [audience], "expirationSeconds": expiration_seconds},
        }
        made = await self._call(
            f"request a token for service account {namespace}/{service_account}",
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            body=body,
            content_type="application/json",
        )
        token = _dig(made, "status", "token")
        if not isinstance(token, str) or not token:
            raise kubernetes_error(None, "the TokenRequest returned no token", "request a token")
        return token

    async def get_resource(self, namespace: str, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = await self._call(
            f"read SqlWorkloadIdentity {namespace}/{name}",
            "GET",
            f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}",
            missing_ok=True,
        )
        return found

    async def list_resources(self, namespaces: Sequence[str]) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        async for page in self.resource_pages(namespaces):
            items.extend(page)
        return items

    async def resource_pages(
        self, namespaces: Sequence[str]
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """The SqlWorkloadIdentities of ``namespaces`` (empty: all), a page at a time
        (``_pages``), for a caller that need not hold them all at once (the drift cycle)."""
        paths = [f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}" for ns in namespaces] or [
            f"/apis/{GROUP}/{VERSION}/{PLURAL}"
        ]
        for path in paths:
            # status.kopf: kopf's own progress and diff-base, which only kopf reads (from its
            # watch); a fleet's list is thousands of these.
            async for page in self._pages(
                "list SqlWorkloadIdentities", path, (("status", "kopf"),)
            ):
                yield page

    async def patch_resource_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None:
        await self._call(
            f"update the status of SqlWorkloadIdentity {namespace}/{name}",
            "PATCH",
            f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}/status",
            body={"status": dict(status)},
            content_type=MERGE_PATCH,
            missing_ok=True,
            decode=False,
        )

    async def post_event(
        self,
        involved: Mapping[str, str],
        type_: str,
        reason: str,
        message: str,
        component: str,
        instance: str,
    ) -> None:
        namespace = involved["namespace"]
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{involved['name']}.", "namespace": namespace},
            "involvedObject": dict(involved),
            "type": type_,
            "reason": reason,
            "message": message,
            "source": {"component": component},
            "reportingComponent": component,
            "reportingInstance": instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self._call(
            f"post event {reason}",
            "POST",
            f"/api/v1/namespaces/{namespace}/events",
            body=body,
            decode=False,
        )

    async def peering_status(self, name: str, namespace: str | None) -> dict[str, Any]:
        """The peers kopf lists in its (Cluster)KopfPeering object; empty if there is none."""
        path = (
            f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings/{name}"
            if namespace
            else f"/apis/kopf.dev/v1/clusterkopfpeerings/{name}"
        )
        found = await self._call(f"read peering {name}", "GET", path, missing_ok=True)
        status = _dig(found, "status")
        return dict(status) if isinstance(status, Mapping) else {}

    async def _list_cluster_scoped(self, kinds: str, plural: str) -> list[dict[str, Any]] | None:
        """Every object of one of our cluster-scoped kinds (``kinds``: its name in the plural,
        for messages); None if its CRD is not installed."""
        found = await self._call(
            f"list {kinds}", "GET", f"/apis/{GROUP}/{VERSION}/{plural}", missing_ok=True
        )
        return None if found is None else list(found.get("items") or [])

    async def _patch_cluster_scoped_status(
        self, kind: str, plural: str, name: str, status: Mapping[str, Any]
    ) -> None:
        await self._call(
            f"update the status of {kind} {name}",
            "PATCH",
            f"/apis/{GROUP}/{VERSION}/{plural}/{name}/status",
            body={"status": dict(status)},
            content_type=MERGE_PATCH,
            missing_ok=True,
            decode=False,
        )

    async def list_policies(self) -> list[dict[str, Any]] | None:
        """Every SqlIdentityPolicy; None if their CRD is not installed."""
        return await self._list_cluster_scoped("SqlIdentityPolicies", POLICY_PLURAL)

    async def list_pools(self) -> list[dict[str, Any]] | None:
        """Every SqlIdentityPool; None if their CRD is not installed."""
        return await self._list_cluster_scoped("SqlIdentityPools", POOL_PLURAL)

    async def patch_pool_status(self, name: str, status: Mapping[str, Any]) -> None:
        await self._patch_cluster_scoped_status("SqlIdentityPool", POOL_PLURAL, name, status)

    async def namespace_labels(self, namespace: str) -> dict[str, str]:
        """The labels of a Namespace (policies select namespaces by them); {} if it is gone.
        A LIST of that one namespace (``fieldSelector``), not a GET: the operator's role lists
        and watches namespaces and needs nothing more (the watch answers all but the first)."""

        async def fetch() -> dict[str, str]:
            found = await self._call(
                f"read namespace {namespace}",
                "GET",
                "/api/v1/namespaces",
                query=[("fieldSelector", f"metadata.name={namespace}")],
            )
            items = (found or {}).get("items") or []
            return dict(_dig(items[0], "metadata", "labels") or {}) if items else {}

        return dict(await shared_read((*namespace_key(namespace), "labels"), fetch))

    async def read_config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        """A ConfigMap's data; None if it does not exist."""
        found = await self._call(
            f"read ConfigMap {namespace}/{name}",
            "GET",
            f"/api/v1/namespaces/{namespace}/configmaps/{name}",
            missing_ok=True,
        )
        if found is None:
            return None
        return {str(k): str(v) for k, v in (_dig(found, "data") or {}).items()}

    async def patch_config_map(
        self, namespace: str, name: str, changes: Mapping[str, str | None]
    ) -> None:
        """Set (or, with None, remove) keys of a ConfigMap's data; created if it is missing."""
        path = f"/api/v1/namespaces/{namespace}/configmaps"
        doing = f"update ConfigMap {namespace}/{name}"
        patched = await self._call(
            doing,
            "PATCH",
            f"{path}/{name}",
            body={"data": dict(changes)},
            content_type=MERGE_PATCH,
            missing_ok=True,
            decode=False,
        )
        if patched is not None:
            return
        data = {k: v for k, v in changes.items() if v is not None}
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}
        try:
            await self._call(
                f"create ConfigMap {namespace}/{name}", "POST", path, body=body, decode=False
            )
        except ReconcileError:
            # Created meanwhile (another replica, 409): patch that one; else the create's error.
            again = await self._call(
                doing,
                "PATCH",
                f"{path}/{name}",
                body={"data": dict(changes)},
                content_type=MERGE_PATCH,
                missing_ok=True,
                decode=False,
            )
            if again is None:
                raise

    async def patch_policy_status(self, name: str, status: Mapping[str, Any]) -> None:
        await self._patch_cluster_scoped_status("SqlIdentityPolicy", POLICY_PLURAL, name, status)

    async def apply_crd(self, manifest: Mapping[str, Any]) -> None:
        """Create or replace a CRD and wait until it is established."""
        name = manifest["metadata"]["name"]
        path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
        current = await self._call(f"read CRD {name}", "GET", f"{path}/{name}", missing_ok=True)
        if current is None:
            await self._call(f"create CRD {name}", "POST", path, body=dict(manifest))
        else:
            body = {
                **manifest,
                "metadata": {
                    **manifest["metadata"],
                    "resourceVersion": current["metadata"]["resourceVersion"],
                },
            }
            await self._call(f"replace CRD {name}", "PUT", f"{path}/{name}", body=body)
        deadline = asyncio.get_running_loop().time() + CRD_ESTABLISH_TIMEOUT_S
        while asyncio.get_running_loop().time() < deadline:
            crd = await self._call(f"read CRD {name}", "GET", f"{path}/{name}")
            if any(
                c.get("type") == "Established" and c.get("status") == "True"
                for c in _dig(crd, "status", "conditions") or []
            ):
                return
            await asyncio.sleep(0.2)
        raise kubernetes_error(None, "not established in time", f"install CRD {name}")


def _api_error(exc: ApiException, doing: str) -> ReconcileError:
    """The API server's own message (``Status.message``) is the useful part of its answer."""
    text = exc.reason or ""
    with contextlib.suppress(ValueError, AttributeError):
        text = json.loads(exc.body or "").get("message") or text
    return kubernetes_error(exc.status, text, doing)
