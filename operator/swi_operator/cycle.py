"""Reads shared by one drift cycle, so that checking N resources costs one read per identity,
namespace and database instead of one per resource.

A drift cycle runs the pipeline for every resource; most share an identity (up to 20 resources
federate one app or managed identity), a namespace and a database. Inside ``drift_cycle()`` the
clients answer a repeated read (an identity's credentials, a namespace's workloads, pods or
labels, its service accounts, a database's roles or a user's memberships) with what the cycle
already read, and a write through them drops what it changes (``changed``), so the resource after
it reads afresh. Anything else that changes during the cycle, a person's edit say, is seen by the
next cycle: the same lag a drift check has anyway. Outside a cycle (kopf's handlers, a probe) every
read goes to the service. bench/fleet.py (docs/benchmarks.md): a cycle over N resources on 50
namespaces and N/14 identities made one credential list, six Kubernetes lists and a service
account read per resource; now one per identity and per namespace.

The cycle travels in a ``ContextVar``: tasks started inside ``drift_cycle()`` (the loop's gather)
see it, concurrent handlers do not.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")

_current: ContextVar[Cycle | None] = ContextVar("swi_drift_cycle", default=None)


class Cycle:
    def __init__(self) -> None:
        self._reads: dict[tuple[Hashable, ...], asyncio.Future[Any]] = {}

    async def read(self, key: tuple[Hashable, ...], fetch: Callable[[], Awaitable[T]]) -> T:
        known = self._reads.get(key)
        if known is None:
            known = self._reads[key] = asyncio.ensure_future(fetch())
            known.add_done_callback(lambda done: self._settle(key, done))
        # shielded: one caller's cancellation must not cancel what the others await
        result: T = await asyncio.shield(known)
        return result

    def _settle(self, key: tuple[Hashable, ...], done: asyncio.Future[Any]) -> None:
        failed = done.cancelled() or done.exception() is not None
        if failed and self._reads.get(key) is done:
            del self._reads[key]  # a failed read is not remembered

    def forget(self, prefix: tuple[Hashable, ...]) -> None:
        for key in [k for k in self._reads if k[: len(prefix)] == prefix]:
            del self._reads[key]


@contextlib.contextmanager
def drift_cycle() -> Iterator[Cycle]:
    cycle = Cycle()
    token = _current.set(cycle)
    try:
        yield cycle
    finally:
        _current.reset(token)


def namespace_key(namespace: str) -> tuple[str, str]:
    """The prefix of every read the cycle keeps for one namespace (its service accounts, workloads,
    pods, labels): ``forget(namespace_key(ns))`` drops them all once the cycle is past it."""
    return ("namespace", namespace)


def in_drift_cycle() -> bool:
    """Whether the caller runs inside ``drift_cycle()``: a read may then cover more than it needs
    (a namespace's list for one of its objects), since the cycle shares it with the others."""
    return _current.get() is not None


async def shared_read(key: tuple[Hashable, ...], fetch: Callable[[], Awaitable[T]]) -> T:
    """``fetch()``, or inside a drift cycle what the cycle already read under ``key``."""
    cycle = _current.get()
    return await fetch() if cycle is None else await cycle.read(key, fetch)


def changed(prefix: tuple[Hashable, ...]) -> None:
    """A write went through: forget what the cycle read under keys starting with ``prefix``."""
    cycle = _current.get()
    if cycle is not None:
        cycle.forget(prefix)
