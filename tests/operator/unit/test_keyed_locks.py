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
