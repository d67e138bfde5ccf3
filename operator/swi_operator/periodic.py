"""A background task that runs after each change (a burst debounced into one run) and every
interval, on the active replica only: the policy review and the credential sweep share it."""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence

from swi_operator.drift import PeeringGate
from swi_operator.errors import ReconcileError

log = logging.getLogger(__name__)

DEBOUNCE_S = 0.5  # a burst of events (an apply of several policies) becomes one run
# ``recount()``: each run lists the fleet, and only counts wait for it. A run comes once no
# recount was asked for RECOUNT_QUIET_S (the end of a burst), but no sooner than RECOUNT_MIN_S
# after the last run and no later than RECOUNT_MAX_S after the first request it answers.
RECOUNT_QUIET_S = 2.0
RECOUNT_MIN_S = 10.0
RECOUNT_MAX_S = 30.0


class DebouncedTask(ABC):
    """Subclasses say what they do in ``once()`` and name it in ``what`` for the log."""

    what = "task"

    def __init__(self, gate: PeeringGate, *, namespaces: Sequence[str], interval: float) -> None:
        self._gate = gate
        self._namespaces = tuple(namespaces)
        self._interval = interval
        self._wake = asyncio.Event()
        self._last_run = -RECOUNT_MIN_S
        self._recount: asyncio.TimerHandle | None = None
        self._recount_asked = 0.0  # when the first recount the pending one answers was asked

    def changed(self) -> None:
        """Something this task depends on changed: run soon."""
        self._wake.set()

    def recount(self) -> None:
        """Something only counted changed (a resource admitted or gone): run once such changes
        pause for ``RECOUNT_QUIET_S``, at least ``RECOUNT_MIN_S`` after the last run, and at
        most ``RECOUNT_MAX_S`` after the first change it counts. Onboarding a thousand resources
        over a minute asked for a recount with each, and a run at the 10 s limit listed the
        growing fleet six times over; now twice, and a single change is counted within 10 s."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._recount is None:
            self._recount_asked = now
        else:
            self._recount.cancel()
        at = max(now + RECOUNT_QUIET_S, self._last_run + RECOUNT_MIN_S)
        at = min(at, max(self._recount_asked + RECOUNT_MAX_S, self._last_run + RECOUNT_MIN_S))
        self._recount = loop.call_at(at, self._recount_due)

    def _recount_due(self) -> None:
        self._recount = None
        self.changed()

    @abstractmethod
    async def once(self) -> None:
        """One run of the task."""

    async def run(self) -> None:
        """Run after each change (debounced) and every interval, until cancelled."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval)
                await asyncio.sleep(DEBOUNCE_S)
            except TimeoutError:
                pass
            self._wake.clear()
            self._last_run = asyncio.get_running_loop().time()
            try:
                async with self._gate.drain.work():
                    await self.once()
            except ReconcileError as err:
                log.warning("%s skipped: %s", self.what, err.message)
            except Exception:
                log.exception("%s failed", self.what)

    async def _served(self) -> list[str] | None:
        """The namespaces this replica serves now ([] = all), or None if it is on standby."""
        if self._namespaces:
            served = [ns for ns in self._namespaces if await self._gate.active(ns)]
            return served or None
        return [] if await self._gate.active(None) else None
