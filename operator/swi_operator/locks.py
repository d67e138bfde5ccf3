"""Per-key asyncio locks that do not accumulate: an entry lives only while someone holds or
awaits it.

Two uses: one lock per identity (ARM refuses concurrent credential writes on one managed identity
with 409, and counting an identity's 20-credential budget needs a stable view), and one lock per
resource, so that kopf's handlers and the fleet-wide drift check never reconcile the same object
at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class KeyedLocks:
    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    def locked(self, key: str) -> bool:
        entry = self._locks.get(key)
        return entry is not None and entry[0].locked()

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


class SharedSlots:
    """``total`` slots, of which one key (a namespace, a database) holds at most ``share``: a
    tenant with a thousand resources, or a database whose statements wait on a tenant's locks,
    leaves the others the rest instead of queueing them behind it (issue 18). Per-key entries
    live only while someone holds or awaits them. ``slots`` is the semaphore of the ``total``
    (a ``metrics.TrackedSlots`` counts its holders), a plain one if not given."""

    def __init__(
        self, total: int, share: int | None = None, slots: asyncio.Semaphore | None = None
    ) -> None:
        self.total = total
        self.share = share if share is not None else max(1, total // 2)
        self._all = slots if slots is not None else asyncio.Semaphore(total)
        self._keys: dict[str, tuple[asyncio.Semaphore, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        slots, users = self._keys.get(key, (asyncio.Semaphore(self.share), 0))
        self._keys[key] = (slots, users + 1)
        try:
            async with slots, self._all:
                yield
        finally:
            slots, users = self._keys[key]
            if users <= 1:
                del self._keys[key]
            else:
                self._keys[key] = (slots, users - 1)

    def in_use(self) -> int:
        """Slots held now (of ``total``)."""
        return self.total - self._all._value

    def __len__(self) -> int:
        return len(self._keys)
