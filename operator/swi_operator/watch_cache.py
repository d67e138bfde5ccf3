"""A watch-fed cache of one kind of object in all namespaces, kept slim: what informers do in
client-go, for the few fields the operator reads.

One list (paged), then a watch from its resourceVersion, in a daemon thread with the operator's
Kubernetes client; a watch that ends resumes from the last version it saw, one that expired (410)
or failed lists again after a capped backoff. ``slim`` turns each object into what the cache
keeps (None: nothing, ``TOO_LARGE``: the cache cannot answer for the object's namespace, which is
then read live: a namespace tenant writes its own objects and must not fill the operator's
memory). Until the first list, and whenever the watch is broken, the cache answers nothing
(``fresh`` is False) and callers read from the API server, so a cache never answers from a view
it knows to be stale; a view milliseconds behind (the watch's delivery time) is what it serves.

Used by the injection webhook (service accounts, ``service_account_cache``) and by the workloads
step (the five workload kinds and pods, ``kube.WorkloadCaches``): onboarding listed six kinds in
the resource's namespace for every resource, the largest share of its API requests
(docs/benchmarks.md).

Why not kopf: with peering, kopf pauses every watch of a standby replica, and kopf would keep
per-object state for every object of the cluster.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from kubernetes import client as k8s

log = logging.getLogger(__name__)

PAGE_SIZE = 500
WATCH_TIMEOUT_S = 240  # the API server ends each watch after this; the next resumes from there
REQUEST_TIMEOUT_S = 10.0  # a list page, and connecting
MIN_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0

T = TypeVar("T")
Key = tuple[str, str]  # (namespace, name)
# ``lister(**kwargs)``: a kubernetes client ``list_*_for_all_namespaces`` method
Lister = Callable[..., Any]


class _TooLarge:
    def __repr__(self) -> str:
        return "TOO_LARGE"


TOO_LARGE: Any = _TooLarge()


class ResourceVersionExpired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


class WatchCache(Generic[T]):
    def __init__(
        self,
        lister: Lister,
        slim: Callable[[Mapping[str, Any]], T | None],
        what: str,
        watch_timeout_s: int = WATCH_TIMEOUT_S,
    ) -> None:
        self._lister = lister
        self._slim = slim
        self.what = what  # for the log: "service account", "deployment", ...
        self._watch_timeout_s = watch_timeout_s
        self._entries: dict[Key, T] = {}
        self._by_namespace: dict[str, dict[str, T]] = {}
        self._too_large: dict[str, set[str]] = {}  # namespace -> names read live
        self._lock = threading.Lock()
        self._fresh = False  # the watch is following the API server
        self._synced = threading.Event()  # the first list is in
        self._stop = threading.Event()
        self._response: Any = None  # the open watch, closed by stop()
        self._backoff = MIN_BACKOFF_S  # before the next list after a failure
        self._thread = threading.Thread(
            target=self._run, name=f"swi-cache-{what.replace(' ', '-')}", daemon=True
        )

    # --- what callers ask -----------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    @property
    def fresh(self) -> bool:
        return self._fresh

    def get(self, namespace: str, name: str) -> T | None:
        """The object as kept, if the cache follows the API server and keeps it; None: ask the
        API server."""
        if not self._fresh:
            return None
        return self._entries.get((namespace, name))

    def in_namespace(self, namespace: str) -> list[T] | None:
        """Every object of the namespace as kept; None: list it live (not following the API
        server, or an object there too large to keep)."""
        with self._lock:
            if not self._fresh or self._too_large.get(namespace):
                return None
            return list(self._by_namespace.get(namespace, {}).values())

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
                log.debug("shutting the %s watch down failed", self.what, exc_info=True)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                version = self._list()
                self._follow(version)
            except ResourceVersionExpired:
                log.debug("%s watch expired; listing again", self.what)
            except Exception as exc:  # the thread must outlive any failure
                if self._stop.is_set():
                    break
                self._fresh = False
                log.warning(
                    "%s cache: %s; reading them from the API server until it lists again in %.1f s",
                    self.what,
                    _describe(exc),
                    self._backoff,
                )
                self._stop.wait(self._backoff)
                # Only a watch that started resets it: a list that works and a watch that is
                # refused (RBAC without watch) must not relist every half second.
                self._backoff = min(self._backoff * 2, MAX_BACKOFF_S)

    def _list(self) -> str:
        listed: list[tuple[Key, T | None]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": PAGE_SIZE}
            if token:
                kwargs["_continue"] = token
            response: Any = self._lister(
                _preload_content=False, _request_timeout=REQUEST_TIMEOUT_S, **kwargs
            )
            page = json.loads(response.data)
            for item in page.get("items") or ():
                listed.append((_key(item), self._slim(item)))
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                break
        with self._lock:
            self._entries, self._by_namespace, self._too_large = {}, {}, {}
            for key, kept in listed:
                self._put(key, kept)
            self._fresh = True
        if not self._synced.is_set():
            log.info("%s cache synced: %d kept", self.what, len(self._entries))
            self._synced.set()
        return str(page["metadata"]["resourceVersion"])

    def _follow(self, version: str) -> None:
        """Apply watch events until the stop, an expired version or an error."""
        while not self._stop.is_set():
            response: Any = self._lister(
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
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            kept = self._slim(obj) if kind != "DELETED" else None
            with self._lock:
                self._put(_key(obj), kept)
        return str((obj.get("metadata") or {}).get("resourceVersion") or version)

    def _put(self, key: Key, kept: T | None) -> None:
        """Keep ``kept`` under ``key`` (None: forget it); the caller holds the lock."""
        namespace, name = key
        self._entries.pop(key, None)
        self._by_namespace.get(namespace, {}).pop(name, None)
        large = self._too_large.get(namespace)
        if large is not None:
            large.discard(name)
        if kept is TOO_LARGE:
            self._too_large.setdefault(namespace, set()).add(name)
        elif kept is not None:
            self._entries[key] = kept
            self._by_namespace.setdefault(namespace, {})[name] = kept


def _key(obj: Mapping[str, Any]) -> Key:
    metadata = obj.get("metadata") or {}
    return str(metadata.get("namespace")), str(metadata.get("name"))


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
