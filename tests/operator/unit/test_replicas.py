"""Replicas: which one reconciles (peers.py), and when one is ready (readiness.py).

The peering rule is kopf's (engines/peering.py: paused while a live peer has a higher priority,
and every replica paused while two share one); these tests hold our priorities to it: distinct,
the oldest highest, so a replica that starts never pre-empts the one at work."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from operator_fakes import FakeKube  # type: ignore[import-not-found]
from swi_operator import peers
from swi_operator.drift import PeeringGate
from swi_operator.readiness import Readiness, serve, tls_answers
from swi_operator.webhooks import issue_bundle, write_tls_files

NOW = dt.datetime(2026, 12, 3, 23, 0, tzinfo=dt.UTC)


def record(priority: int, seconds_ago: float = 1, lifetime: int = peers.PEERING_LIFETIME_S):
    seen = NOW - dt.timedelta(seconds=seconds_ago)
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}


def test_a_later_start_ranks_lower_whatever_its_tiebreak() -> None:
    first = peers.replica_priority(1_780_000_000.000, tiebreak=999)
    second = peers.replica_priority(1_780_000_000.001, tiebreak=0)  # one millisecond later
    assert first > second
    # kopf's dev-mode operator (priority 0) outranks every deployed replica.
    assert first < 0


def test_replicas_started_in_the_same_millisecond_get_distinct_priorities() -> None:
    same = {peers.replica_priority(1_780_000_000.5, tiebreak=t) for t in range(1000)}
    assert len(same) == 1000


def test_exactly_one_of_many_live_replicas_is_active() -> None:
    started = [1_780_000_000.0 + i * 0.2 for i in range(4)]
    priorities = {f"pod-{i}": peers.replica_priority(t, i * 7) for i, t in enumerate(started)}
    status = {name: record(p) for name, p in priorities.items()}
    active = [n for n, p in priorities.items() if peers.active(status, n, p, NOW)]
    assert active == ["pod-0"]  # the oldest


def test_the_next_oldest_takes_over_once_the_active_record_expires() -> None:
    old, young = peers.replica_priority(100.0, 1), peers.replica_priority(200.0, 2)
    alive = {"old": record(old, seconds_ago=peers.PEERING_LIFETIME_S - 1), "young": record(young)}
    assert not peers.active(alive, "young", young, NOW)
    expired = {"old": record(old, seconds_ago=peers.PEERING_LIFETIME_S + 1), "young": record(young)}
    assert peers.active(expired, "young", young, NOW)
    assert peers.active({"young": record(young)}, "young", young, NOW)  # the old one left


@pytest.mark.parametrize(
    ("others", "active"),
    [
        ({}, True),
        ({"other": record(-5)}, False),  # the same priority: kopf pauses both
        ({"other": record(-4)}, False),
        ({"other": record(-6)}, True),
        ({"other": record(-4, seconds_ago=60)}, True),  # dead
        ({"other": {"priority": -4}}, True),  # no lastseen: kopf could not parse it either
        ({"other": "garbage"}, True),
    ],
)
def test_active_is_kopfs_rule(others: dict[str, Any], active: bool) -> None:
    status = {"me": record(-5), **others}
    assert peers.active(status, "me", -5, NOW) is active


# --- readiness ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def tls_server(tmp_path: Path) -> asyncio.Server:
    certfile, keyfile, _ = write_tls_files(issue_bundle(["localhost"], ["127.0.0.1"]), tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)

    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)


async def test_ready_only_once_started_and_the_webhook_answers_tls(tmp_path: Path) -> None:
    readiness = Readiness(webhooks=True)
    assert await readiness.problems() == [
        "the operator is starting",
        "the webhook server has not started",
    ]
    readiness.started = True
    server = await tls_server(tmp_path)
    port = server.sockets[0].getsockname()[1]
    readiness.listening("0.0.0.0", f"https://sandbox-host:{port}/")
    assert readiness.webhook_address == ("127.0.0.1", port)
    assert await readiness.problems() == []
    server.close()
    await server.wait_closed()
    assert await readiness.problems() == [f"the webhook port 127.0.0.1:{port} does not answer"]


async def test_a_plain_tcp_listener_is_not_a_webhook_server() -> None:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        assert not await tls_answers("127.0.0.1", server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


async def test_without_webhooks_ready_once_started() -> None:
    readiness = Readiness(webhooks=False)
    assert await readiness.problems() == ["the operator is starting"]
    readiness.started = True
    assert await readiness.problems() == []


async def test_not_ready_until_a_registered_cache_has_synced() -> None:
    """The injection webhook's service account cache: its first list gates readiness."""
    readiness = Readiness(webhooks=False, started=True)
    synced = False
    readiness.wait_for("the service account cache has not listed yet", lambda: synced)
    assert await readiness.problems() == ["the service account cache has not listed yet"]
    synced = True
    assert await readiness.problems() == []


def test_a_webhook_url_without_port_is_refused() -> None:
    with pytest.raises(ValueError, match="names no port"):
        Readiness(webhooks=True).listening(None, "https://host/")


async def test_the_endpoint_answers_503_with_the_reasons_then_200() -> None:
    readiness = Readiness(webhooks=False)
    port = free_port()
    task = asyncio.create_task(serve(f"http://127.0.0.1:{port}/readyz", readiness))
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):  # until it listens
                try:
                    async with session.get(f"http://127.0.0.1:{port}/readyz") as rsp:
                        status, text = rsp.status, await rsp.text()
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            else:
                pytest.fail("the readiness endpoint never listened")
            assert (status, text) == (503, "not ready: the operator is starting\n")
            readiness.started = True
            async with session.get(f"http://127.0.0.1:{port}/readyz") as rsp:
                assert (rsp.status, await rsp.text()) == (200, "ready\n")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --- leaving -----------------------------------------------------------------------------------


async def test_a_draining_replica_lets_running_work_finish_and_starts_none() -> None:
    drain = peers.Drain()
    release = asyncio.Event()
    done: list[str] = []

    async def job(name: str) -> None:
        async with drain.work():
            await release.wait()
            done.append(name)

    running = asyncio.create_task(job("running"))
    await asyncio.sleep(0)
    leaving = asyncio.create_task(drain.drained(limit=5))
    await asyncio.sleep(0)
    late = asyncio.create_task(job("late"))  # started after the stop: never runs
    await asyncio.sleep(0.05)
    assert not leaving.done()  # the running job holds the replica in the peering
    release.set()
    assert await leaving is True
    await running
    assert done == ["running"]
    assert not late.done()
    late.cancel()  # as kopf cancels what is left at exit
    with pytest.raises(asyncio.CancelledError):
        await late


async def test_draining_gives_up_at_its_limit() -> None:
    drain = peers.Drain()
    stuck = asyncio.Event()

    async def job() -> None:
        async with drain.work():
            await stuck.wait()

    task = asyncio.create_task(job())
    await asyncio.sleep(0)
    assert await drain.drained(limit=0.05) is False
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_gate_says_standby_once_draining() -> None:
    drain = peers.Drain()
    gate = PeeringGate(FakeKube(), None, "me", drain=drain)  # standalone: active
    assert await gate.active(None)
    await drain.drained(limit=0.01)
    assert not await gate.active(None)


@pytest.mark.parametrize("webhook_handler_first", [True, False])
def test_both_start_up_handlers_share_one_readiness_in_either_order(
    webhook_handler_first: bool,
) -> None:
    """kopf runs start-up handlers in the order their modules were imported: the webhook server's
    (which says when it listens) and the operator's (which serves /readyz) must reach the same
    object whichever comes first, or the endpoint waits forever for a server that started."""
    from swi_operator.readiness import of

    memo: dict[str, Any] = {}
    if webhook_handler_first:
        by_webhooks = of(memo)
        by_operator = of(memo, True)
    else:
        by_operator = of(memo, True)
        by_webhooks = of(memo)
    assert by_webhooks is by_operator and by_operator.webhooks is True
    by_webhooks.listening("0.0.0.0", "https://127.0.0.1:9443")
    assert by_operator.webhook_address == ("127.0.0.1", 9443)
