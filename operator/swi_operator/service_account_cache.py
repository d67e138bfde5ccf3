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

Why not a kopf ``@kopf.on.event`` handler on service accounts: with peering, kopf pauses every
watch of a standby replica, and standby replicas serve the webhooks too (``peers.py``); kopf
would also keep per-object state for every service account of the cluster.

``synced`` (the first list is in) is part of readiness (``readiness.py``): a replica that has not
listed yet would send every admission to the API server. A watch that breaks later does not make
the replica unready (every replica would leave the Service at once on an API server blip, and
``failurePolicy: Fail`` would refuse the pods): admissions read live until the next list.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from kubernetes import client as k8s
from kubernetes.client import ApiClient

from swi_operator.injection import (
    CLIENT_ID_ANNOTATION,
    TENANT_ID_ANNOTATION,
    TOKEN_EXPIRATION_ANNOTATION,
)

log = logging.getLogger(__name__)

PAGE_SIZE = 500
WATCH_TIMEOUT_S = 240  # the API server ends each watch after this; the next resumes from there
REQUEST_TIMEOUT_S = 10.0  # a list page, and connecting
MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0

Key = tuple[str, str]  # (namespace, name)
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


class ResourceVersionExpired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


class ServiceAccountCache:
    def __init__(self, api: ApiClient, watch_timeout_s: int = WATCH_TIMEOUT_S) -> None:
        self._core = k8s.CoreV1Api(api)
        self._watch_timeout_s = watch_timeout_s
        self._entries: dict[Key, dict[str, Any]] = {}
        self._fresh = False  # the watch is following the API server
        self._synced = threading.Event()  # the first list is in
        self._stop = threading.Event()
        self._response: Any = None  # the open watch, closed by stop()
        self._backoff = MIN_BACKOFF_S  # before the next list after a failure
        self._thread = threading.Thread(
            target=self._run, name="swi-service-account-cache", daemon=True
        )

    # --- what the webhook asks ------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def lookup(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The account as ``injection.plan`` reads it, if the cache can answer for it; None: ask
        the API server (not listed yet, watch broken, or no client id cached for it)."""
        if not self._fresh:
            return None
        return self._entries.get((namespace, name))

    def __len__(self) -> int:
        return len(self._entries)

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop following: the open watch's socket is shut down, which wakes the thread's
        blocked read (closing the response instead would wait for the read's lock, that is for
        the next event, a minute away)."""
        self._stop.set()
        response = self._response
        if response is not None:
            try:
                response.shutdown()
            except Exception:  # the watch ended meanwhile: nothing to wake
                log.debug("shutting the service account watch down failed", exc_info=True)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                version = self._list()
                self._follow(version)
            except ResourceVersionExpired:
                log.debug("service account watch expired; listing again")
            except Exception as exc:  # the thread must outlive any failure
                if self._stop.is_set():
                    break
                self._fresh = False
                log.warning(
                    "service account cache: %s; the injection webhook reads service accounts "
                    "from the API server until it lists again in %.1f s",
                    _describe(exc),
                    self._backoff,
                )
                self._stop.wait(self._backoff)
                # Only a watch that started resets it: a list that works and a watch that is
                # refused (RBAC without watch) must not relist every half second.
                self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)

    def _list(self) -> str:
        entries: dict[Key, dict[str, Any]] = {}
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": PAGE_SIZE}
            if token:
                kwargs["_continue"] = token
            response: Any = self._core.list_service_account_for_all_namespaces(
                _preload_content=False, _request_timeout=REQUEST_TIMEOUT_S, **kwargs
            )
            page = json.loads(response.data)
            for item in page.get("items") or ():
                kept = slim(item)
                if kept is not None:
                    entries[(kept["metadata"]["namespace"], kept["metadata"]["name"])] = kept
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                break
        self._entries = entries
        self._fresh = True
        if not self._synced.is_set():
            log.info("service account cache synced: %d with a client id", len(entries))
            self._synced.set()
        return str(page["metadata"]["resourceVersion"])

    def _follow(self, version: str) -> None:
        """Apply watch events until the stop, an expired version or an error."""
        while not self._stop.is_set():
            response: Any = self._core.list_service_account_for_all_namespaces(
                watch=True,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=self._watch_timeout_s,
                _preload_content=False,
                _request_timeout=(REQUEST_TIMEOUT_S, self._watch_timeout_s + 30),
            )
            self._response = response
            self._backoff = MIN_BACKOFF_S  # the API server accepted the watch
            try:
                for line in _lines(response):
                    version = self._apply(json.loads(line), version)
            finally:
                self._response = None
                response.release_conn()

    def _apply(self, event: Mapping[str, Any], version: str) -> str:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise ResourceVersionExpired
            raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('message')}")
        metadata = obj.get("metadata") or {}
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            key = (str(metadata.get("namespace")), str(metadata.get("name")))
            kept = slim(obj) if kind != "DELETED" else None
            if kept is None:
                self._entries.pop(key, None)
            else:
                self._entries[key] = kept
        return str(metadata.get("resourceVersion") or version)


def _lines(response: Any) -> Iterator[str]:
    """The newline-separated JSON events of a watch response, as they arrive."""
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=False):
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield line.decode("utf-8")


def _describe(exc: Exception) -> str:
    """A short reason for the log: the API status for an ApiException, never a response body."""
    if isinstance(exc, k8s.ApiException):
        return f"API server answered {exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"
