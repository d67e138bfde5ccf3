"""Giving the C heap's free pages back (``heap.py``): after a cycle, and every 10 s so that a
burst's freed memory is not kept until the next drift cycle."""

from __future__ import annotations

import asyncio

import pytest
from swi_operator import heap


def test_free_pages_are_given_back_on_glibc() -> None:
    assert heap.release_free_memory() is True  # the operator image's C library (Debian) is glibc


async def test_trimming_repeats_until_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0

    def release() -> bool:
        nonlocal calls
        calls += 1
        return True

    async def three() -> None:
        while calls < 3:
            await asyncio.sleep(0.01)

    monkeypatch.setattr(heap, "release_free_memory", release)
    task = asyncio.create_task(heap.trim_periodically(0.01))
    await asyncio.wait_for(three(), 10)  # it repeats (no timing asserted)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_trimming_stops_where_the_c_library_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "release_free_memory", lambda: False)
    await asyncio.wait_for(heap.trim_periodically(0.01), 1)  # returns at once, no busy loop
