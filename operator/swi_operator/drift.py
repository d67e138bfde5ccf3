"""The fleet-wide drift check: one loop for all resources instead of a kopf timer per object.

Every ``interval`` seconds the loop lists the SqlWorkloadIdentities it serves (one paged LIST) and
runs the same pipeline kopf's handlers run for each settled one: created by kopf (finalizer in
place), not being deleted, and with nothing newer than its status (a pending spec change belongs to
kopf's update handler). A resource whose handler is running right now is skipped: the per-resource
lock is shared with the handlers. The pipeline reads before it writes, so a check that finds
nothing to repair writes nothing, neither to the cloud nor to the status.

This is also what lifts permanent conditions once their cause is gone (a freed credential slot, a
granted permission), without a retry loop per resource.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from swi_operator.errors import ReconcileError
from swi_operator.kube import KubeClient
from swi_operator.locks import KeyedLocks
from swi_operator.pipeline import Pipeline
from swi_operator.steps import Event

log = logging.getLogger(__name__)


class EventSink(Protocol):
    def post(self, body: Mapping[str, Any], event: Event) -> None: ...


class DriftLoop:
    def __init__(
        self,
        pipeline: Pipeline,
        kube: KubeClient,
        locks: KeyedLocks,
        events: EventSink,
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
        self._namespaces = tuple(namespaces)
        self._interval = interval
        self._finalizer = finalizer
        self._slots = asyncio.Semaphore(concurrency)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.check_all()
            except ReconcileError as err:
                log.warning("drift check skipped: %s", err.message)

    async def check_all(self) -> None:
        resources = await self._kube.list_resources(self._namespaces)
        await asyncio.gather(*(self._check(body) for body in resources))

    def _settled(self, body: Mapping[str, Any]) -> bool:
        meta = body.get("metadata") or {}
        status = body.get("status") or {}
        return (
            not meta.get("deletionTimestamp")
            and self._finalizer in (meta.get("finalizers") or [])
            and status.get("observedGeneration") == meta.get("generation")
        )

    async def _check(self, listed: Mapping[str, Any]) -> None:
        meta = listed.get("metadata") or {}
        uid = str(meta.get("uid"))
        if not self._settled(listed) or self._locks.locked(uid):
            return
        async with self._slots, self._locks.hold(uid):
            try:
                # Read again under the lock: the list may predate a spec change a handler has
                # just reconciled, and reconciling the old spec would undo it.
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
        for event in outcome.events:
            self._events.post(body, event)
