"""The watch-fed caches (``watch_cache``, ``kube.WorkloadCaches``): what they keep of each object,
when they answer, and when they send the caller to the API server. Against the API server they
run in every operator test (the workloads step reads from them)."""

from __future__ import annotations

from typing import Any

from swi_operator.kube import WORKLOAD_KINDS, KubernetesClient, Pod, slim_pod, slim_workload
from swi_operator.watch_cache import WatchCache

DEPLOYMENT = WORKLOAD_KINDS[0]


def deployment(name: str, ns: str = "team", **labels: str) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": ns,
            "resourceVersion": "5",
            "labels": {"big": "x" * 50},
            "annotations": {"sqlidentity.io/labelled-by": "reader", "note": "y" * 5000},
        },
        "spec": {
            "template": {
                "metadata": {"labels": {"app": name, **labels}},
                "spec": {"serviceAccountName": "reader"},
            }
        },
    }


def following(cache: WatchCache[Any], *objects: dict[str, Any]) -> WatchCache[Any]:
    """The cache as after a list of ``objects``."""
    for obj in objects:
        cache._apply({"type": "ADDED", "object": obj}, "1")
    cache._fresh = True
    return cache


def test_a_workload_is_kept_with_what_the_step_reads_and_nothing_else() -> None:
    kept = slim_workload(DEPLOYMENT)(deployment("api"))
    assert kept is not None
    assert kept.template_labels == {"app": "api"} and kept.service_account == "reader"
    assert kept.annotations == {"sqlidentity.io/labelled-by": "reader"}
    assert kept.labels == {}


def test_answers_per_namespace_only_while_it_follows_the_api_server() -> None:
    cache = WatchCache(lambda **_: None, slim_workload(DEPLOYMENT), "Deployment")
    cache._apply({"type": "ADDED", "object": deployment("api")}, "1")
    assert cache.in_namespace("team") is None  # not listed yet: ask the API server
    following(cache, deployment("web"), deployment("other", ns="elsewhere"))
    assert sorted(w.name for w in cache.in_namespace("team") or []) == ["api", "web"]
    assert cache.in_namespace("empty") == []
    cache._apply({"type": "DELETED", "object": deployment("api")}, "2")
    assert [w.name for w in cache.in_namespace("team") or []] == ["web"]
    cache._fresh = False  # the watch broke
    assert cache.in_namespace("team") is None


def test_a_namespace_with_an_object_too_large_to_keep_is_read_live() -> None:
    cache = following(WatchCache(lambda **_: None, slim_workload(DEPLOYMENT), "Deployment"))
    stuffed = deployment("stuffed", **{f"l{i}": "v" for i in range(100)})
    cache._apply({"type": "ADDED", "object": stuffed}, "2")
    cache._apply({"type": "ADDED", "object": deployment("ok", ns="other")}, "3")
    assert cache.in_namespace("team") is None
    assert [w.name for w in cache.in_namespace("other") or []] == ["ok"]
    assert len(cache) == 1  # the stuffed one takes no memory
    small = deployment("stuffed")
    cache._apply({"type": "MODIFIED", "object": small}, "4")  # its labels trimmed again
    assert [w.name for w in cache.in_namespace("team") or []] == ["stuffed"]


def test_pods_keep_labels_and_the_skip_containers_annotation() -> None:
    pod = {
        "metadata": {
            "name": "p",
            "namespace": "team",
            "labels": {"app": "api"},
            "annotations": {"azure.workload.identity/skip-containers": "sidecar", "x": "y"},
        },
        "spec": {"serviceAccountName": "reader", "containers": [{"name": "c"}]},
        "status": {"phase": "Running"},
    }
    kept = slim_pod(pod)
    assert isinstance(kept, Pod)
    assert kept.labels == {"app": "api"} and kept.active and not kept.has_token
    assert kept.annotations == {"azure.workload.identity/skip-containers": "sidecar"}


class Caches:
    def __init__(self, workloads: list[Any] | None) -> None:
        self.answer = workloads

    def workloads_in(self, namespace: str) -> list[Any] | None:
        return self.answer


async def test_the_client_lists_live_when_asked_or_when_the_caches_cannot_answer() -> None:
    client = KubernetesClient.__new__(KubernetesClient)
    lists: list[str] = []

    async def call(doing: str, *args: Any, **kwargs: Any) -> Any:
        lists.append(doing)
        return {"items": []}

    client._call = call  # type: ignore[method-assign]
    cached = [slim_workload(DEPLOYMENT)(deployment("api"))]
    client.caches = Caches(cached)  # type: ignore[assignment]
    assert await client.list_workloads("team") == cached and lists == []
    assert await client.list_workloads("team", live=True) == [] and len(lists) == 5
    client.caches = Caches(None)  # type: ignore[assignment]
    assert await client.list_workloads("team") == [] and len(lists) == 10
