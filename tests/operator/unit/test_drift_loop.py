"""The fleet-wide drift check: repairs settled resources, leaves the rest to kopf, writes only
what changed, and posts its Events itself."""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from typing import Any

import pytest
from operator_fakes import APP, TENANT, FakeKube, FakeStore, resource  # type: ignore[import-not-found]
from swi_operator.drift import DriftLoop, PeeringGate
from swi_operator.events import EventRecorder, reasons
from swi_operator.locks import KeyedLocks
from swi_operator.runtime import FINALIZER, build_pipeline
from swi_operator.spec import ApplicationRef

NS = "workload-demo"


def drift_loop(
    store: FakeStore, kube: FakeKube, locks: KeyedLocks, peering: str | None = None
) -> DriftLoop:
    return DriftLoop(
        build_pipeline(store, kube, TENANT, None),
        kube,
        locks,
        EventRecorder(kube, logging.INFO),
        PeeringGate(kube, peering, "me"),
        namespaces=[NS],
        interval=1,
        finalizer=FINALIZER,
        concurrency=4,
    )


@pytest.fixture
def setup() -> tuple[DriftLoop, FakeStore, FakeKube, KeyedLocks]:
    store, kube, locks = FakeStore(), FakeKube(), KeyedLocks()
    store.add_identity(ApplicationRef(APP))
    return drift_loop(store, kube, locks), store, kube, locks


def settled(name: str, **kwargs: Any) -> dict[str, Any]:
    body: dict[str, Any] = resource(name, NS, service_account=f"sa-{name}", **kwargs)
    body["status"] = {"observedGeneration": body["metadata"]["generation"]}
    return body


async def test_repairs_and_then_writes_nothing(setup):
    loop, store, kube, _ = setup
    kube.resources[(NS, "a")] = settled("a")

    await loop.check_all()
    assert len(store.of(ApplicationRef(APP))) == 1
    assert len(kube.status_patches) == 1
    assert kube.events == [("a", "Normal", "Ready")]  # one Event for the pass
    assert "CredentialCreated" in reasons("Ready", kube.event_messages[0])

    store.writes.clear()
    kube.events.clear()
    await loop.check_all()
    assert not store.writes
    assert len(kube.status_patches) == 1, "unchanged status is not written again"
    assert kube.events == []


def count_reads(kube: FakeKube, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    original = kube.get_resource

    async def get_resource(namespace: str, name: str) -> dict[str, Any] | None:
        reads.append(name)
        return await original(namespace, name)

    monkeypatch.setattr(kube, "get_resource", get_resource)
    return reads


async def test_a_cycle_reconciles_what_it_listed_without_reading_each_resource(setup, monkeypatch):
    loop, store, kube, _ = setup
    for name in ("a", "b"):
        kube.resources[(NS, name)] = settled(name)
    loop.handling("uid-workload-demo-a")  # a handler ran on it before the cycle's list
    reads = count_reads(kube, monkeypatch)

    await loop.check_all()

    assert reads == []  # one LIST for the fleet, no GET per resource
    assert len(store.of(ApplicationRef(APP))) == 2


async def test_a_handler_after_the_list_makes_the_check_read_afresh(setup, monkeypatch):
    loop, store, kube, _ = setup
    kube.resources[(NS, "a")] = settled("a")
    stale = settled("a")  # what the list returned, before the user's change
    kube.resources[(NS, "a")]["spec"]["serviceAccountName"] = "sa-renamed"
    reads = count_reads(kube, monkeypatch)

    async def list_resources(namespaces: Any) -> list[dict[str, Any]]:
        loop.handling("uid-workload-demo-a")  # kopf's handler starts right after the list
        return [stale]

    monkeypatch.setattr(kube, "list_resources", list_resources)
    await loop.check_all()

    assert reads == ["a"]
    (credential,) = store.of(ApplicationRef(APP))
    assert credential.subject.endswith(":sa-renamed")  # the fresh spec, not the listed one

    reads.clear()
    await loop.check(stale)  # a re-check from outside a cycle always reads afresh
    assert reads == ["a"]


async def test_leaves_unsettled_and_busy_resources_to_kopf(setup):
    loop, store, kube, locks = setup
    pending = settled("pending")
    pending["metadata"]["generation"] = 2  # a spec change kopf has not handled yet
    deleting = settled("deleting")
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    unclaimed = settled("new")
    unclaimed["metadata"]["finalizers"] = []
    busy = settled("busy")
    for body in (pending, deleting, unclaimed, busy):
        kube.resources[(NS, body["metadata"]["name"])] = body

    async with locks.hold(busy["metadata"]["uid"]):
        await loop.check_all()

    assert store.of(ApplicationRef(APP)) == []
    assert kube.status_patches == []


async def test_posting_level_filters_events(setup):
    _, _, kube, _ = setup
    from swi_operator.steps import Event

    recorder = EventRecorder(kube, logging.WARNING)
    await recorder.post(
        resource(), [Event("Normal", "Ready", "x"), Event("Warning", "Throttled", "y")]
    )
    assert kube.events == [("customer-reader", "Warning", "Throttled")]


def peer(seconds_ago: float, priority: int = 0) -> dict[str, Any]:
    seen = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds_ago)
    return {"lastseen": seen.isoformat(), "lifetime": 60, "priority": priority}


@pytest.mark.parametrize(
    ("others", "active"),
    [
        ({}, True),
        ({"other": (1, 0)}, False),  # same priority: kopf freezes both
        ({"other": (1, 10)}, False),
        ({"other": (1, -1)}, True),
        ({"other": (600, 0)}, True),  # dead: last seen longer ago than its lifetime
    ],
)
async def test_peering_gate_follows_kopf(others, active):
    kube = FakeKube()
    kube.peering = {"me": peer(1)} | {
        name: peer(ago, priority) for name, (ago, priority) in others.items()
    }
    assert await PeeringGate(kube, "swi", "me").active(None) is active
    assert await PeeringGate(kube, None, "me").active(None) is True  # standalone


async def test_standby_replica_skips_the_cycle(setup):
    _, store, kube, locks = setup
    kube.resources[(NS, "a")] = settled("a")
    kube.peering = {"other": peer(1)}
    await drift_loop(store, kube, locks, peering="swi").check_all()
    assert store.of(ApplicationRef(APP)) == []


async def test_one_pass_posts_its_normal_events_as_one(setup):
    _, _, kube, _ = setup
    from swi_operator.steps import Event

    recorder = EventRecorder(kube, logging.INFO)
    await recorder.post(
        resource(),
        [
            Event("Normal", "CredentialCreated", "created credential c on app a"),
            Event("Warning", "Throttled", "Graph: 429; retrying"),
            Event("Normal", "ServiceAccountCreated", "created service account s"),
            Event("Normal", "Ready", "all conditions True"),
        ],
    )
    assert [(t, r) for _, t, r in kube.events] == [("Normal", "Ready"), ("Warning", "Throttled")]
    folded = kube.event_messages[0]
    assert folded == (
        "CredentialCreated: created credential c on app a; "
        "ServiceAccountCreated: created service account s; Ready: all conditions True"
    )
    assert reasons("Ready", folded) == ["CredentialCreated", "ServiceAccountCreated", "Ready"]
    assert reasons("Ready", "all conditions True") == ["Ready"]
    assert reasons("Throttled", "x; Y: z") == ["Throttled"]

    kube.events.clear()
    await recorder.post(resource(), [Event("Normal", "WorkloadLabelled", "labelled d")])
    assert [r for _, _, r in kube.events] == ["WorkloadLabelled"]  # one is posted as it is
    kube.events.clear()
    await recorder.post(
        resource(),
        [Event("Normal", "CredentialDeleted", "x"), Event("Normal", "ServiceAccountDeleted", "y")],
        folded="CleanedUp",
    )
    assert [r for _, _, r in kube.events] == ["CleanedUp"]


async def test_a_cycle_runs_its_checks_on_a_few_workers_and_one_failure_stops_none(
    setup, monkeypatch
):
    """A fleet's cycle checks its resources on as many workers as checks may run at once (4 here),
    never a task per resource holding its body; a check that fails is logged and the others run."""
    import asyncio

    loop, _, kube, _ = setup
    for i in range(40):
        kube.resources[(NS, f"r{i}")] = settled(f"r{i}")
    running = peak = most_tasks = 0
    checked: set[str] = set()
    reconcile = loop._pipeline.reconcile

    async def counted(body: Any) -> Any:
        nonlocal running, peak, most_tasks
        running += 1
        peak = max(peak, running)
        most_tasks = max(most_tasks, len(asyncio.all_tasks()))
        try:
            if body["metadata"]["name"] == "r3":
                raise RuntimeError("a bug in one check")
            await asyncio.sleep(0.001)
            checked.add(body["metadata"]["name"])
            return await reconcile(body)
        finally:
            running -= 1

    monkeypatch.setattr(loop._pipeline, "reconcile", counted)
    await loop.check_all()
    assert peak == 4
    assert most_tasks <= 4 + 1, most_tasks  # the workers and the test's own
    assert checked == {f"r{i}" for i in range(40)} - {"r3"}  # the others after the failure


def fleet_loop(kube: FakeKube, store: FakeStore) -> DriftLoop:
    """A loop serving every namespace (one list for the whole cluster)."""
    return DriftLoop(
        build_pipeline(store, kube, TENANT, None),
        kube,
        KeyedLocks(),
        EventRecorder(kube, logging.INFO),
        PeeringGate(kube, None, "me"),
        namespaces=(),
        interval=1,
        finalizer=FINALIZER,
        concurrency=4,
    )


async def test_a_cycle_checks_a_page_before_reading_the_next_and_forgets_namespaces_behind_it(
    setup, monkeypatch
):
    """A cycle holds one page of the fleet at a time, and what it read of a namespace only until
    the list is past it: a namespace that goes on into the next page is still shared, one the
    list comes back to is read again."""
    from swi_operator.cycle import namespace_key, shared_read

    _, store, kube, _ = setup
    kube.page_size = 2
    listed = [("ns1", "a"), ("ns1", "b"), ("ns1", "c"), ("ns2", "a"), ("ns1", "d")]
    for ns, name in listed:
        body = settled(name)
        body["metadata"].update(namespace=ns, uid=f"uid-{ns}-{name}")
        kube.resources[(ns, name)] = body
    loop = fleet_loop(kube, store)
    reads: Counter[str] = Counter()
    checked: list[tuple[str, str]] = []
    checked_when_read: list[int] = []  # how many were checked as each page was read

    async def check(body: dict[str, Any], listed_at: int | None) -> None:
        ns = body["metadata"]["namespace"]

        async def fetch() -> str:
            reads[ns] += 1
            return ns

        await shared_read((*namespace_key(ns), "serviceaccount"), fetch)
        checked.append((ns, body["metadata"]["name"]))

    pages = kube.resource_pages

    async def read_pages(namespaces: Any) -> Any:
        async for page in pages(namespaces):
            checked_when_read.append(len(checked))
            yield page

    monkeypatch.setattr(loop, "_check", check)
    monkeypatch.setattr(kube, "resource_pages", read_pages)
    await loop.check_all()

    assert sorted(checked) == sorted(listed)
    assert checked_when_read == [0, 2, 4]
    assert reads == {"ns1": 2, "ns2": 1}


async def test_an_expired_list_is_listed_again_and_checks_each_resource_once(setup, monkeypatch):
    """The continue token of a long cycle's list can expire (410, etcd compacted past the list's
    snapshot): the cycle lists again and checks only what it had not reached."""
    from swi_operator.errors import kubernetes_error

    loop, _, kube, _ = setup
    kube.page_size = 2
    for i in range(5):
        kube.resources[(NS, f"r{i}")] = settled(f"r{i}")
    listings = 0
    pages = kube.resource_pages

    async def expiring(namespaces: Any) -> Any:
        nonlocal listings
        listings += 1
        served = 0
        async for page in pages(namespaces):
            if listings == 1 and served == 2:
                raise kubernetes_error(
                    410, "The provided continue parameter is too old", "list SqlWorkloadIdentities"
                )
            served += 1
            yield page

    monkeypatch.setattr(kube, "resource_pages", expiring)
    await loop.check_all()

    assert listings == 2
    assert Counter(name for _, name, _ in kube.status_patches) == {f"r{i}": 1 for i in range(5)}


@pytest.mark.parametrize(("status", "listings"), [(410, 3), (503, 1)])
async def test_a_list_that_keeps_failing_ends_the_cycle(setup, monkeypatch, status, listings):
    """A list that keeps expiring is given up after three listings until the next cycle; any other
    failure at once (run() logs it and waits for the next cycle)."""
    from swi_operator.drift import LISTINGS
    from swi_operator.errors import ReconcileError, kubernetes_error

    loop, _, kube, _ = setup
    kube.resources[(NS, "a")] = settled("a")
    tried = 0

    async def failing(namespaces: Any) -> Any:
        nonlocal tried
        tried += 1
        raise kubernetes_error(status, "no", "list SqlWorkloadIdentities")
        yield []

    monkeypatch.setattr(kube, "resource_pages", failing)
    with pytest.raises(ReconcileError) as raised:
        await loop.check_all()
    assert raised.value.status == status
    assert tried == listings
    assert LISTINGS == 3
    assert kube.status_patches == []
