"""The injection webhook's watch-fed cache of service accounts that carry a client id.

The webhook needs the pod's service account for every admission. A live GET costs the API server
round trip on the admission's critical path (~16 ms p50 in the sandbox); this cache answers from
memory instead, fed by one list and then a watch of service accounts in all namespaces (the
webhook serves every namespace, whatever ``--namespace`` the operator reconciles), run in a
daemon thread with the operator's Kubernetes client.

What it keeps: only accounts with the ``azure.workload.identity/client-id`` annotation, and of
each only its name, namespace and the ``azure.workload.identity/*`` annotations ``injection.plan``
reads (client-id, tenant-id, service-account-token-expiration), none longer than 256 characters
(a namespace tenant writes its own accounts: an account it stuffs is read live instead, so the
operator's memory stays bounded by the number of accounts). An account without
the client id is never answered from here: ``lookup`` says "ask the API server" (None) for it, as
for any account it does not hold, and before the first list or while the watch is broken. The
operator annotates an account just before it labels the workloads, so a cache that has not yet
seen that annotation must not let a pod go without its client id: the live read settles it.
A client id that changes is seen by the watch within its delivery time (milliseconds here), as
with azure-workload-identity's own (controller-runtime) cache.

The list-and-watch machinery is ``watch_cache.WatchCache``'s (why not kopf: there).

``synced`` (the first list is in) is part of readiness (``readiness.py``): a replica that has not
listed yet would send every admission to the API server. A watch that breaks later does not make
the replica unready (every replica would leave the Service at once on an API server blip, and
``failurePolicy: Fail`` would refuse the pods): admissions read live until the next list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubernetes import client as k8s
from kubernetes.client import ApiClient

from swi_operator.injection import (
    CLIENT_ID_ANNOTATION,
    TENANT_ID_ANNOTATION,
    TOKEN_EXPIRATION_ANNOTATION,
)
from swi_operator.watch_cache import WATCH_TIMEOUT_S, WatchCache

# The service account annotations injection.plan reads; a GUID is 36 characters, an expiration 5.
CACHED_ANNOTATIONS = frozenset(
    {CLIENT_ID_ANNOTATION, TENANT_ID_ANNOTATION, TOKEN_EXPIRATION_ANNOTATION}
)
MAX_VALUE_LENGTH = 256


def slim(service_account: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the cache keeps of a service account (its JSON), or None if it keeps nothing: no
    client id, or a value longer than any real one (a tenant's own accounts must not fill the
    operator's memory: those are read live, and plan() sees them whole)."""
    metadata = service_account.get("metadata") or {}
    annotations = {
        key: str(value)
        for key, value in (metadata.get("annotations") or {}).items()
        if key in CACHED_ANNOTATIONS
    }
    if not annotations.get(CLIENT_ID_ANNOTATION):
        return None
    if any(len(value) > MAX_VALUE_LENGTH for value in annotations.values()):
        return None
    return {
        "metadata": {
            "name": metadata.get("name"),
            "namespace": metadata.get("namespace"),
            "annotations": annotations,
        }
    }


class ServiceAccountCache(WatchCache[dict[str, Any]]):
    def __init__(self, api: ApiClient, watch_timeout_s: int = WATCH_TIMEOUT_S) -> None:
        core = k8s.CoreV1Api(api)
        super().__init__(
            core.list_service_account_for_all_namespaces, slim, "service account", watch_timeout_s
        )

    def lookup(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The account as ``injection.plan`` reads it, if the cache can answer for it; None: ask
        the API server (not listed yet, watch broken, or no client id cached for it)."""
        return self.get(namespace, name)
