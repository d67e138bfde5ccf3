"""The fleet-wide drift check: one loop for all resources instead of a kopf timer per object.

Every ``interval`` seconds the loop lists the SqlWorkloadIdentities it serves (one paged LIST, a
page of 500 checked before the next is read, so a cycle never holds the whole fleet) and runs the
same pipeline kopf's handlers run for each settled one: created by kopf (finalizer in
place), not being deleted, and with nothing newer than its status (a pending spec change belongs to
kopf's update handler). A resource whose handler is running right now is skipped: the per-resource
lock is shared with the handlers. The pipeline reads before it writes, so a check that finds
nothing to repair writes nothing, neither to the cloud nor to the status.

The listed body is what the check reconciles, unless a handler started on that resource after the
list was taken (handlers say so through ``handling``): then the list may predate a spec the handler
reconciled, and the check reads the resource afresh under the lock. So a fleet at rest costs one
paged LIST per cycle, not a read per resource (bench/fleet.py, docs/benchmarks.md).

This is also what lifts permanent conditions once their cause is gone (a freed credential slot, a
granted permission), without a retry loop per resource.

With ``--peering``, kopf pauses the handlers of standby replicas but knows nothing of this loop, so
``PeeringGate`` applies kopf's own rule (``peers.active``) to the same peering object before each
cycle: this replica is active unless another live peer has the same or a higher priority.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from swi_operator import heap, metrics, peers
from swi_operator.cycle import drift_cycle, namespace_key
from swi_operator.errors import ReconcileError
from swi_operator.events import EventRecorder
from swi_operator.kube import KubeClient
from swi_operator.locks import KeyedLocks
from swi_operator.pipeline import Pipeline

log = logging.getLogger(__name__)

# How many times a cycle lists the fleet when the list's continue token expires under it (410)
# before it gives up until the next cycle; each listing checks only what the others did not reach.
LISTINGS = 3


class PeeringGate:
    """Whether this replica is the active one, by kopf's rule on its peering objects."""

    def __init__(
        self,
        kube: KubeClient,
        name: str | None,
        identity: str | None,
        priority: int = 0,
        drain: peers.Drain | None = None,
    ) -> None:
        self._kube = kube
        self._name = name
        self._identity = identity
        self._priority = priority
        self.drain = drain or peers.Drain()

    async def active(self, namespace: str | None) -> bool:
        if self.drain.draining:
            return False  # this replica is leaving (peers.Drain)
        if self._name is None:
            return True  # standalone
        listed = await self._kube.peering_status(self._name, namespace)
        return peers.active(listed, self._identity, self._priority, dt.datetime.now(dt.UTC))


class DriftLoop:
    def __init__(
        self,
        pipeline: Pipeline,
        kube: KubeClient,
        locks: KeyedLocks,
        events: EventRecorder,
        gate: PeeringGate,
        *,
        namespaces: Sequence[str],
        interval: float,
        finalizer: str,
        concurrency: int,
    ) -> None:
        self._pipeline = pipeline
        self._kube = kube
        self._locks = locks
        self._events = events
        self._gate = gate
        self._namespaces = tuple(namespaces)
        self._interval = interval
        self._finalizer = finalizer
        self._slots = asyncio.Semaphore(concurrency)
        self._workers = max(1, concurrency)
        self._ticks = itertools.count()
        self._handled: dict[str, int] = {}  # uid -> tick at which a handler last started on it

    def handling(self, uid: str) -> None:
        """A kopf handler starts on this resource: a list taken before now may be stale for it."""
        self._handled[uid] = next(self._ticks)

    def forget(self, uid: str) -> None:
        """The resource is gone (its finalizer released)."""
        self._handled.pop(uid, None)

    async def run(self) -> None:
        """Check every interval until cancelled; one bad cycle never ends the loop."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                async with self._gate.drain.work():
                    await self.check_all()
            except ReconcileError as err:
                log.warning("drift check skipped: %s", err.message)
            except Exception:
                log.exception("drift check failed")

    async def check_all(self) -> None:
        if self._namespaces:
            served = [ns for ns in self._namespaces if await self._gate.active(ns)]
            if not served:
                return
        else:
            if not await self._gate.active(None):
                return
            served = []  # every namespace
        started = time.monotonic()
        checked: set[str] = set()  # the uids this cycle has reached, kept across a relist
        with metrics.timed(metrics.DRIFT_CYCLE_DURATION), drift_cycle() as cycle:
            # one read per identity, namespace and database (cycle.py)
            for listing in range(1, LISTINGS + 1):
                listed_at = next(self._ticks)  # the pages are one snapshot, taken from here on
                held: list[str] = []  # the namespace the next page may go on with
                try:
                    async for page in self._kube.resource_pages(served):
                        namespaces = await self._check_page(page, listed_at, checked)
                        # The list comes by namespace, so the cycle is past all it met but the
                        # page's last: what it read of them can go. (Were the order another, a
                        # namespace met again would only be read again.)
                        ahead = namespaces[-1:]
                        for namespace in {*held, *namespaces}.difference(ahead):
                            cycle.forget(namespace_key(namespace))
                        held = ahead
                    break
                except ReconcileError as err:
                    if err.status != 410 or listing == LISTINGS:
                        raise
                    # The continue token expired under a long cycle (etcd compacted past the
                    # list's snapshot): list again, checking only what the cycle has not reached.
                    log.info(
                        "drift check: the list expired after %d resources; listing again",
                        len(checked),
                    )
            metrics.DRIFT_RESOURCES.set(len(checked))
        heap.release_free_memory()  # the cycle's bodies are gone: keep the RSS of a fleet at rest
        log.info(
            "drift check of %d resources done in %.1f s", len(checked), time.monotonic() - started
        )

    async def _check_page(
        self, page: list[dict[str, Any]], listed_at: int, checked: set[str]
    ) -> list[str]:
        """Check one page of the list (500 resources) before the next is read, so a cycle holds
        a page of bodies at a time rather than the fleet's; its namespaces, in order."""
        # As many workers as checks may run at once, not a task per resource: a body is dropped
        # once checked, and a page holds no waiting task per resource.
        pending: collections.deque[dict[str, Any]] = collections.deque()
        namespaces: dict[str, None] = {}  # in the list's order
        for body in page:
            meta = body.get("metadata") or {}
            uid = str(meta.get("uid"))
            if uid not in checked:
                checked.add(uid)
                pending.append(body)
            namespaces[str(meta.get("namespace"))] = None
        page.clear()

        async def drain() -> None:
            while pending:
                body = pending.popleft()
                try:
                    await self._check(body, listed_at)
                except Exception:  # never one resource's failure ends the others' checks
                    meta = body.get("metadata") or {}
                    log.exception(
                        "drift check of %s/%s failed", meta.get("namespace"), meta.get("name")
                    )

        await asyncio.gather(*(drain() for _ in range(min(self._workers, len(pending)))))
        return list(namespaces)

    def _settled(self, body: Mapping[str, Any]) -> bool:
        meta = body.get("metadata") or {}
        status = body.get("status") or {}
        return (
            not meta.get("deletionTimestamp")
            and self._finalizer in (meta.get("finalizers") or [])
            and status.get("observedGeneration") == meta.get("generation")
        )

    async def check(self, listed: Mapping[str, Any]) -> None:
        """Re-check one listed resource now, as a cycle would (e.g. after a policy change); it is
        read afresh first, since nothing says when it was listed."""
        await self._check(listed, None)

    async def _check(self, listed: Mapping[str, Any], listed_at: int | None) -> None:
        meta = listed.get("metadata") or {}
        uid = str(meta.get("uid"))
        if not self._settled(listed) or self._locks.locked(uid):
            return
        async with self._slots, self._locks.hold(uid):
            try:
                body: Mapping[str, Any] | None = listed
                if listed_at is None or self._handled.get(uid, -1) > listed_at:
                    # Read again under the lock: the list may predate a spec change a handler
                    # has just reconciled, and reconciling the old spec would undo it.
                    body = await self._kube.get_resource(
                        str(meta.get("namespace")), str(meta.get("name"))
                    )
                if body is None or not self._settled(body) or body["metadata"].get("uid") != uid:
                    return
                outcome = await self._pipeline.reconcile(body)
                if outcome.changed:
                    await self._kube.patch_resource_status(
                        str(meta.get("namespace")), str(meta.get("name")), outcome.status
                    )
            except ReconcileError as err:
                log.warning(
                    "drift check of %s/%s: %s", meta.get("namespace"), meta.get("name"), err.message
                )
                return
            except Exception:
                log.exception(
                    "drift check of %s/%s failed", meta.get("namespace"), meta.get("name")
                )
                return
        await self._events.post(body, outcome.events)
