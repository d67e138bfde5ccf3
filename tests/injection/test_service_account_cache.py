"""The injection webhook's service account cache (``service_account_cache``).

Against the sandbox's real API server, in this process: the cache lists and watches with the real
Kubernetes client, and follows what an admin does to service accounts. The webhook's use of it
(a miss falls back to a live read) is in test_webhook_sandbox.py; the parts without a cluster
(what is kept of an account, an expired watch) come first.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from deploy_harness import wait_for  # type: ignore[import-not-found]
from swi_operator.service_account_cache import ServiceAccountCache, slim
from swi_operator.watch_cache import ResourceVersionExpired

CLIENT_ID = "5e0c1d9a-7b3f-4c2e-9a1d-000000000002"
OTHER_ID = "5e0c1d9a-7b3f-4c2e-9a1d-000000000003"


def account(name: str, **annotations: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "annotations": annotations, "uid": "u"}}


def test_only_accounts_with_a_client_id_are_kept_and_only_their_azure_annotations() -> None:
    kept = slim(
        account(
            "app",
            **{
                "azure.workload.identity/client-id": CLIENT_ID,
                "azure.workload.identity/tenant-id": "t",
                "azure.workload.identity/padding": "x" * 1000,  # not one plan() reads
                "kubectl.kubernetes.io/last-applied-configuration": "{...}",
            },
        )
    )
    assert kept == {
        "metadata": {
            "name": "app",
            "namespace": "ns",
            "annotations": {
                "azure.workload.identity/client-id": CLIENT_ID,
                "azure.workload.identity/tenant-id": "t",
            },
        }
    }
    assert slim(account("default")) is None
    # A tenant's stuffed account is not held (read live instead): memory stays bounded.
    stuffed = {
        "azure.workload.identity/client-id": CLIENT_ID,
        "azure.workload.identity/tenant-id": "t" * 257,
    }
    assert slim(account("stuffed", **stuffed)) is None
    assert slim(account("empty", **{"azure.workload.identity/client-id": ""})) is None


def test_an_expired_watch_lists_again_and_an_error_event_raises() -> None:
    cache = ServiceAccountCache(None)  # type: ignore[arg-type]
    with pytest.raises(ResourceVersionExpired):
        cache._apply({"type": "ERROR", "object": {"code": 410, "message": "too old"}}, "1")
    with pytest.raises(RuntimeError, match="watch error 500"):
        cache._apply({"type": "ERROR", "object": {"code": 500, "message": "boom"}}, "1")
    added = account("app", **{"azure.workload.identity/client-id": CLIENT_ID})
    added["metadata"]["resourceVersion"] = "7"
    assert cache._apply({"type": "ADDED", "object": added}, "1") == "7"
    assert cache._apply({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}}, "7")
    assert ("ns", "app") in cache._entries
    assert cache._apply({"type": "DELETED", "object": added}, "9") == "7"
    assert cache._entries == {}


def test_a_refused_watch_backs_off_although_the_list_works() -> None:
    """RBAC with list but not watch: the cache must not relist every half second."""
    from kubernetes.client.exceptions import ApiException

    class Answer:
        data = b'{"items": [], "metadata": {"resourceVersion": "1"}}'

    class Core:
        def list_service_account_for_all_namespaces(self, watch: bool = False, **_: Any) -> Any:
            if watch:
                raise ApiException(status=403, reason="Forbidden")
            return Answer()

    cache = ServiceAccountCache(None)  # type: ignore[arg-type]
    cache._lister = Core().list_service_account_for_all_namespaces
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        if len(waits) == 5:
            cache._stop.set()
        return cache._stop.is_set()

    cache._stop.wait = wait  # type: ignore[method-assign]
    cache._run()
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert cache.synced  # the list worked: ready, and every admission reads live
    assert cache.lookup("ns", "app") is None


# --- against the API server ---------------------------------------------------------------------


@pytest.fixture
def cache(kube: Any) -> Iterator[ServiceAccountCache]:
    started = ServiceAccountCache(kube, watch_timeout_s=5)  # resumes the watch every 5 s too
    started.start()
    try:
        wait_for("the cache to list", lambda: started.synced, timeout=30)
        yield started
    finally:
        started.stop()


@pytest.mark.controlplane
def test_the_cache_follows_service_accounts(
    kube: Any, namespace: str, cache: ServiceAccountCache
) -> None:
    from kubernetes import client

    core: Any = client.CoreV1Api(kube)
    name = f"sa-{uuid.uuid4().hex[:6]}"
    plain = client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="plain"))
    core.create_namespaced_service_account(namespace, plain)
    core.create_namespaced_service_account(
        namespace,
        client.V1ServiceAccount(
            metadata=client.V1ObjectMeta(
                name=name,
                annotations={"azure.workload.identity/client-id": CLIENT_ID, "team": "a"},
            )
        ),
    )

    def client_id() -> str | None:
        found = cache.lookup(namespace, name)
        return (
            found["metadata"]["annotations"]["azure.workload.identity/client-id"] if found else None
        )

    wait_for("the cache to see the account", lambda: client_id() == CLIENT_ID, timeout=10)
    assert cache.lookup(namespace, name)["metadata"]["annotations"] == {  # type: ignore[index]
        "azure.workload.identity/client-id": CLIENT_ID
    }
    # An account without a client id, created before (watch events come in order), is not held:
    # the webhook reads it live.
    assert cache.lookup(namespace, "plain") is None

    annotation = {"metadata": {"annotations": {"azure.workload.identity/client-id": OTHER_ID}}}
    core.patch_namespaced_service_account(name, namespace, annotation)
    wait_for("the cache to see the new client id", lambda: client_id() == OTHER_ID, timeout=10)

    removed = {"metadata": {"annotations": {"azure.workload.identity/client-id": None}}}
    core.patch_namespaced_service_account(name, namespace, removed)
    wait_for("the cache to drop the account", lambda: client_id() is None, timeout=10)

    core.patch_namespaced_service_account(name, namespace, annotation)
    wait_for("the cache to hold it again", lambda: client_id() == OTHER_ID, timeout=10)
    core.delete_namespaced_service_account(name, namespace)
    wait_for("the cache to forget it", lambda: cache.lookup(namespace, name) is None, timeout=10)


@pytest.mark.controlplane
def test_the_cache_outlives_the_servers_watch_timeout(
    kube: Any, namespace: str, cache: ServiceAccountCache
) -> None:
    """The API server ends each watch after timeout_seconds (5 here): the next one resumes."""
    import time

    from kubernetes import client

    time.sleep(7)
    core: Any = client.CoreV1Api(kube)
    core.create_namespaced_service_account(
        namespace,
        client.V1ServiceAccount(
            metadata=client.V1ObjectMeta(
                name="late", annotations={"azure.workload.identity/client-id": CLIENT_ID}
            )
        ),
    )
    wait_for("a resumed watch", lambda: cache.lookup(namespace, "late") is not None, timeout=10)


@pytest.mark.controlplane
def test_stop_wakes_the_open_watch_at_once(kube: Any) -> None:
    """The operator's clean-up must not wait for the next watch event (a bookmark, a minute)."""
    import time

    cache = ServiceAccountCache(kube)  # the deployed watch timeout: minutes
    cache.start()
    wait_for("the watch to open", lambda: cache.synced and cache._response is not None, timeout=30)
    time.sleep(0.5)  # the thread is blocked reading it
    started = time.monotonic()
    cache.stop(timeout=10)
    assert time.monotonic() - started < 1.5
    assert not cache._thread.is_alive()


async def test_the_webhook_reads_the_cache_first_and_counts_where_it_read() -> None:
    from prometheus_client import REGISTRY
    from swi_operator.webhooks import WebhookSettings, WebhookState

    def reads(source: str) -> float:
        value = REGISTRY.get_sample_value(
            "swi_webhook_service_account_reads_total", {"source": source}
        )
        return value or 0.0

    held = slim(account("app", **{"azure.workload.identity/client-id": CLIENT_ID}))

    class Cache:
        def lookup(self, namespace: str, name: str) -> dict[str, Any] | None:
            return held if (namespace, name) == ("ns", "app") else None

    live: list[tuple[str, str]] = []
    state = WebhookState(WebhookSettings(), api=None)  # type: ignore[arg-type]
    state.service_accounts = Cache()  # type: ignore[assignment]
    state.read_service_account = lambda ns, name: live.append((ns, name)) or None  # type: ignore[method-assign]
    cache_before, api_before = reads("cache"), reads("api")
    assert await state.find_service_account("ns", "app") is held
    assert await state.find_service_account("ns", "other") is None
    assert live == [("ns", "other")]
    assert (reads("cache") - cache_before, reads("api") - api_before) == (1, 1)


async def test_a_refused_own_token_falls_back_to_the_following_cache_only() -> None:
    """A replica whose pod was force-deleted still serves admissions for a moment, and the API
    server refuses its token: the cache's view answers (no client id held), not a refusal."""
    from kubernetes.client.exceptions import ApiException
    from swi_operator.webhooks import WebhookSettings, WebhookState

    class Cache:
        fresh = True

        def lookup(self, namespace: str, name: str) -> dict[str, Any] | None:
            return None

    status = [401]

    def refused(namespace: str, name: str) -> dict[str, Any] | None:
        raise ApiException(status=status[0], reason="refused")

    state = WebhookState(WebhookSettings(), api=None)  # type: ignore[arg-type]
    state.service_accounts = Cache()  # type: ignore[assignment]
    state.read_service_account = refused  # type: ignore[method-assign]
    assert await state.find_service_account("ns", "probe") == {
        "metadata": {"name": "probe", "namespace": "ns", "annotations": {}}
    }
    status[0] = 403  # any other refusal is the API server's answer, not a void token
    with pytest.raises(ApiException):
        await state.find_service_account("ns", "probe")
    status[0] = 401
    Cache.fresh = False  # a cache not following has no view to offer
    with pytest.raises(ApiException):
        await state.find_service_account("ns", "probe")
