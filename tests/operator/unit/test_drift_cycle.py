"""Reads shared within one drift cycle (swi_operator.cycle): one read per key, writes forget."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from swi_operator.cycle import changed, drift_cycle, shared_read
from swi_operator.kube import KubernetesClient


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


class RecordingKube(KubernetesClient):
    """The real client's read logic over recorded calls instead of an API server."""

    def __init__(self, accounts: dict[str, dict[str, str]]) -> None:  # no ApiClient needed
        self.accounts = accounts
        self.calls: list[tuple[str, str]] = []

    async def _call(self, doing: str, method: str, path: str, **kwargs: Any) -> Any:
        self.calls.append((method, path))
        if method == "GET" and path.endswith("/serviceaccounts"):
            items = [{"metadata": {"name": n, "annotations": a}} for n, a in self.accounts.items()]
            return {"metadata": {}, "items": items}
        if method == "GET":
            name = path.rsplit("/", 1)[1]
            if name not in self.accounts:
                return None
            return {"metadata": {"name": name, "annotations": self.accounts[name]}}
        return {}


async def test_a_cycle_lists_a_namespaces_service_accounts_once():
    kube = RecordingKube({"sa-a": {"x": "1"}, "sa-b": {}})
    with drift_cycle():
        found = await asyncio.gather(
            *(kube.get_service_account("ns", n) for n in ("sa-a", "sa-b", "sa-missing"))
        )
        assert [sa.annotations if sa else None for sa in found] == [{"x": "1"}, {}, None]
        assert kube.calls == [("GET", "/api/v1/namespaces/ns/serviceaccounts")]

        await kube.patch_service_account("ns", "sa-b", {"y": "2"})  # a write drops the list
        kube.accounts["sa-b"] = {"y": "2"}
        sa = await kube.get_service_account("ns", "sa-b")
        assert sa is not None and sa.annotations == {"y": "2"}
        assert [c for c in kube.calls if c[0] == "GET"] == [
            ("GET", "/api/v1/namespaces/ns/serviceaccounts")
        ] * 2

    kube.calls.clear()
    sa = await kube.get_service_account("ns", "sa-a")  # outside a cycle: one GET of that one
    assert sa is not None and kube.calls == [("GET", "/api/v1/namespaces/ns/serviceaccounts/sa-a")]
