"""Per-key locks serialise per key, run other keys in parallel, and leave nothing behind."""

from __future__ import annotations

import asyncio

from swi_operator.locks import KeyedLocks


async def test_same_key_is_serialised_other_keys_are_not():
    locks = KeyedLocks()
    running: list[str] = []
    peak = {"a": 0}

    async def work(key: str) -> None:
        async with locks.hold(key):
            running.append(key)
            peak["a"] = max(peak["a"], running.count("a"))
            await asyncio.sleep(0.01)
            running.remove(key)

    await asyncio.gather(work("a"), work("a"), work("a"), work("b"))
    assert peak["a"] == 1
    assert len(locks) == 0


async def test_locked_reports_holders():
    locks = KeyedLocks()
    async with locks.hold("x"):
        assert locks.locked("x")
        assert not locks.locked("y")
    assert not locks.locked("x")


async def test_one_namespace_holds_at_most_its_share_of_the_slots():
    """Issue 18: a tenant with many resources cannot queue everyone else behind it."""
    from swi_operator.locks import SharedSlots

    slots = SharedSlots(4)
    release = asyncio.Event()

    async def busy(key: str) -> None:
        async with slots.hold(key):
            await release.wait()

    noisy = [asyncio.create_task(busy("noisy-tenant")) for _ in range(10)]
    await asyncio.sleep(0)
    assert slots.in_use() == 2  # its share; eight of its handlers wait
    async with asyncio.timeout(5), slots.hold("quiet-tenant"):
        assert slots.in_use() == 3  # another namespace goes in at once
    release.set()
    await asyncio.gather(*noisy)
    assert slots.in_use() == 0 and len(slots) == 0  # nothing accumulates
