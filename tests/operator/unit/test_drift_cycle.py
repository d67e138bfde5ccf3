"""Reads shared within one drift cycle (swi_operator.cycle): one read per key, writes forget."""

from __future__ import annotations

import asyncio

import pytest
from swi_operator.cycle import changed, drift_cycle, shared_read


class Source:
    def __init__(self) -> None:
        self.reads = 0
        self.fail = False

    async def fetch(self) -> list[str]:
        self.reads += 1
        await asyncio.sleep(0.001)
        if self.fail:
            raise RuntimeError("read failed")
        return [f"read {self.reads}"]


async def test_outside_a_cycle_every_read_goes_to_the_service():
    source = Source()
    for _ in range(3):
        await shared_read(("credentials", "app"), source.fetch)
    assert source.reads == 3


async def test_inside_a_cycle_tasks_share_one_read_per_key():
    source, other = Source(), Source()
    with drift_cycle():
        results = await asyncio.gather(
            *(shared_read(("credentials", "app"), source.fetch) for _ in range(5)),
            shared_read(("credentials", "other"), other.fetch),
        )
        assert await shared_read(("credentials", "app"), source.fetch) == ["read 1"]
    assert results[:5] == [["read 1"]] * 5
    assert (source.reads, other.reads) == (1, 1)
    await shared_read(("credentials", "app"), source.fetch)  # the cycle is over
    assert source.reads == 2


async def test_a_write_forgets_what_it_changes_and_only_that():
    source, other = Source(), Source()
    with drift_cycle():
        await shared_read(("principals", "db", "user-a"), source.fetch)
        await shared_read(("roles", "db"), other.fetch)
        changed(("principals", "db"))
        assert await shared_read(("principals", "db", "user-a"), source.fetch) == ["read 2"]
        assert await shared_read(("roles", "db"), other.fetch) == ["read 1"]


async def test_a_failed_read_is_not_remembered():
    source = Source()
    source.fail = True
    with drift_cycle():
        for _ in range(2):
            with pytest.raises(RuntimeError):
                await shared_read(("workloads", "ns"), source.fetch)
        source.fail = False
        assert await shared_read(("workloads", "ns"), source.fetch) == ["read 3"]


async def test_a_handler_running_beside_a_cycle_reads_for_itself():
    source = Source()
    handler_started = asyncio.Event()
    cycle_done = asyncio.Event()

    async def handler() -> None:  # started outside the cycle, like kopf's
        await handler_started.wait()
        await shared_read(("credentials", "app"), source.fetch)
        await cycle_done.wait()
        await shared_read(("credentials", "app"), source.fetch)

    task = asyncio.create_task(handler())
    with drift_cycle():
        await shared_read(("credentials", "app"), source.fetch)
        handler_started.set()
        await asyncio.sleep(0.01)
    cycle_done.set()
    await task
    assert source.reads == 3
