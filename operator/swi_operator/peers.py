"""Which replica reconciles: kopf peering, one distinct priority per replica, the oldest first.

Every replica serves the admission webhooks (kopf's webhook server does not pause with peering);
only one reconciles. kopf pauses a replica's watches while a live peer in the same peering object
has a higher priority, and pauses *every* replica that shares its priority with another: so each
replica takes a priority of its own, from the moment it started (``replica_priority``): a replica
that starts later ranks lower. A new pod (a rollout, a rescheduled standby) therefore never
pre-empts the replica at work; it waits on standby until that one is gone. The active replica
leaves the peering object when it stops (kopf's keep-alive removes its record on exit), and a
replica killed without notice stops being counted ``PEERING_LIFETIME_S`` after its last keep-alive:
the next oldest then resumes. A developer's ``kopf run`` with kopf's default priority (0) outranks
every deployed replica (their priorities are negative), which is kopf's intended debugging use.

Leaving: kopf removes a stopping replica's record as soon as it is asked to stop, while handlers
it started may still be writing; the next replica would resume at once and write too. So on
SIGTERM the operator drains first (``Drain``: no new work starts, what runs finishes, at most
``DRAIN_TIMEOUT_S``), and only then lets kopf stop and leave the peering object.

``active`` is kopf's rule, applied by ``drift.PeeringGate`` to the loops kopf does not pause (the
drift check, the sweep, the policy review), so they follow the same replica as kopf's handlers.
docs/operator.md ("Replicas") says why peering rather than a Lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Mapping
from typing import Any

# Seconds a replica's record counts without a keep-alive. kopf renews it every 1-5 s at this
# lifetime (lifetime minus 5-10 s, at least 1 s), so a killed active replica is replaced within
# about this long; shorter would cost more PATCHes of the peering object.
PEERING_LIFETIME_S = 10
_TIEBREAK = 1000  # replicas started in the same millisecond still get distinct priorities
# How long a stopping replica waits for its running handlers and cycles (within the pod's 30 s
# termination grace, after its 5 s preStop); past it, kopf cancels what still runs.
DRAIN_TIMEOUT_S = 15.0


def replica_priority(started: float, tiebreak: int) -> int:
    """This replica's kopf priority: lower for a later start (``started``, Unix seconds);
    ``tiebreak`` (any int, e.g. random) separates replicas started in the same millisecond."""
    return -(int(started * 1000) * _TIEBREAK + tiebreak % _TIEBREAK)


def active(peers: Mapping[str, Any], identity: str | None, priority: int, now: dt.datetime) -> bool:
    """kopf's rule: this replica reconciles unless another live peer (``lastseen`` plus its
    ``lifetime`` is after ``now``) has the same or a higher priority. Records that do not parse
    are not peers (kopf cannot parse them either)."""
    for peer, info in peers.items():
        if peer == identity or not isinstance(info, Mapping):
            continue
        try:
            seen = dt.datetime.fromisoformat(str(info["lastseen"]))
            alive = seen + dt.timedelta(seconds=float(info.get("lifetime", 60))) > now
            other = int(info.get("priority", 0))
        except (KeyError, TypeError, ValueError):
            continue
        if alive and other >= priority:
            return False
    return True


class Drain:
    """Work that writes (a handler, a drift cycle, a sweep) runs inside ``work()``; once
    ``drained()`` is called no new work starts (it waits until kopf cancels it at exit, and the
    next replica does it), and ``drained()`` returns when what was running has finished."""

    def __init__(self) -> None:
        self.draining = False
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.asynccontextmanager
    async def work(self) -> AsyncIterator[None]:
        if self.draining:
            await asyncio.Event().wait()  # until cancelled: this replica is leaving
        self._running += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._running -= 1
            if not self._running:
                self._idle.set()

    async def drained(self, limit: float = DRAIN_TIMEOUT_S) -> bool:
        """Stop new work and wait for the running work; False if some still ran at the timeout."""
        self.draining = True
        try:
            async with asyncio.timeout(limit):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True
