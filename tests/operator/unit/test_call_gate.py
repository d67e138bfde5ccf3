"""The call gate classifies failures, paces writes, and holds every caller back after a 429."""

from __future__ import annotations

import asyncio

import pytest
from msgraph.generated.models.o_data_errors.main_error import MainError
from msgraph.generated.models.o_data_errors.o_data_error import ODataError
from swi_operator.cloud import THROTTLE_ATTEMPTS, CallGate, Lookups, Pacer
from swi_operator.errors import PermanentError, Reason, TransientError


class Clock:
    """Time that passes only when someone sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def throttle(retry_after: str) -> ODataError:
    return ODataError(
        response_status_code=429,
        response_headers={"Retry-After": retry_after},
        error=MainError(code="TooManyRequests"),
    )


async def test_a_short_throttle_is_waited_out_and_the_call_repeated():
    clock = Clock()
    gate = CallGate("Microsoft Graph", 4, clock, sleep=clock.sleep)
    answers: list[BaseException | str] = [throttle("5"), "ok"]

    async def request() -> str:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    assert await gate.call("write", request) == "ok"
    assert clock.slept == [5.0]


async def test_everyone_waits_for_the_pause_instead_of_collecting_429s():
    clock = Clock()
    gate = CallGate("Microsoft Graph", 4, clock, sleep=clock.sleep)
    calls = 0

    async def throttled() -> None:
        nonlocal calls
        calls += 1
        raise throttle("5")

    with pytest.raises(TransientError) as gave_up:
        await gate.call("write", throttled)
    assert gave_up.value.reason is Reason.THROTTLED and gave_up.value.delay == 5
    assert calls == THROTTLE_ATTEMPTS
    paused_at = clock.now

    async def fine() -> str:
        nonlocal calls
        calls += 1
        return "ok"

    assert await gate.call("read", fine) == "ok"  # held until the last Retry-After passed
    assert clock.now == pytest.approx(paused_at + 5)


async def test_a_long_retry_after_goes_back_to_kopf_at_once():
    clock = Clock()
    gate = CallGate("Azure Resource Manager", 4, clock, sleep=clock.sleep)

    async def throttled() -> None:
        raise throttle("120")

    with pytest.raises(TransientError) as first:
        await gate.call("write", throttled)
    assert first.value.delay == 120 and clock.slept == []

    async def never() -> None:
        raise AssertionError("held calls must not reach the service")

    clock.now += 30
    with pytest.raises(TransientError) as held:
        await gate.call("read", never)
    assert held.value.reason is Reason.THROTTLED and held.value.delay == pytest.approx(90)


async def test_other_failures_are_not_repeated():
    clock = Clock()
    gate = CallGate("Microsoft Graph", 4, clock, sleep=clock.sleep)
    calls = 0

    async def denied() -> None:
        nonlocal calls
        calls += 1
        raise ODataError(
            response_status_code=403, error=MainError(code="Authorization_RequestDenied")
        )

    with pytest.raises(PermanentError):
        await gate.call("write", denied)
    assert calls == 1 and clock.slept == []


async def test_writes_are_paced_reads_are_not():
    clock = Clock()
    gate = CallGate(
        "Microsoft Graph",
        8,
        clock,
        writes=Pacer(2, burst=2, clock=clock, sleep=clock.sleep),
        sleep=clock.sleep,
    )

    async def ok() -> None:
        return None

    for _ in range(5):
        await gate.call("read", ok)
    assert clock.now == 100
    for _ in range(6):
        await gate.call("write", ok, write=True)
    # two at once (the burst), then one every half second
    assert clock.now == pytest.approx(102)


async def test_pacer_serves_callers_in_order_at_its_rate():
    clock = Clock()
    pacer = Pacer(4, burst=1, clock=clock, sleep=clock.sleep)
    done: list[tuple[int, float]] = []

    async def take(i: int) -> None:
        await pacer.acquire()
        done.append((i, clock.now))

    await asyncio.gather(*(take(i) for i in range(5)))
    assert [i for i, _ in done] == [0, 1, 2, 3, 4]
    assert Pacer(0).rate == 0  # rate 0: no pacing at all
    await Pacer(0, clock=clock, sleep=clock.sleep).acquire()


async def test_lookups_share_one_request_and_remember_only_answers():
    lookups: Lookups[str] = Lookups()
    calls = 0

    async def fetch() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return "object-id"

    assert await asyncio.gather(*(lookups.get("app", fetch) for _ in range(5))) == ["object-id"] * 5
    assert await lookups.get("app", fetch) == "object-id"
    assert calls == 1
    lookups.forget("app")
    await lookups.get("app", fetch)
    assert calls == 2

    async def fails() -> str:
        raise PermanentError(Reason.IDENTITY_NOT_FOUND, "gone")

    for _ in range(2):
        with pytest.raises(PermanentError):
            await lookups.get("missing", fails)


async def test_a_429_on_one_identitys_paced_write_holds_back_that_identity_only():
    clock = Clock()
    gate = CallGate("Azure Resource Manager", 4, clock, sleep=clock.sleep)
    subscription = Pacer(2.0, burst=2.0, clock=clock, sleep=clock.sleep)
    busy = Pacer(0.25, clock=clock, sleep=clock.sleep)
    other = Pacer(0.25, clock=clock, sleep=clock.sleep)

    async def throttled() -> None:
        raise throttle("3")

    async def fine() -> str:
        return "ok"

    with pytest.raises(TransientError):  # each try waits for the identity's next slot
        await gate.call("write", throttled, write=True, pace=(subscription, busy))
    assert clock.slept == [4.0, 4.0]  # its 4 s slots, each at least the Retry-After away
    gave_up = clock.now

    # nothing else is held: a read and another identity's write go at once
    assert await gate.call("read", fine) == "ok"
    assert await gate.call("write", fine, write=True, pace=(subscription, other)) == "ok"
    assert clock.now == gave_up
    # the throttled identity's next write waits for its deferred slot
    assert await gate.call("write", fine, write=True, pace=(subscription, busy)) == "ok"
    assert clock.now == pytest.approx(gave_up + 4.0)


async def test_a_pacer_deferred_by_a_retry_after_waits_longer_than_its_interval():
    clock = Clock()
    pacer = Pacer(2.0, burst=2.0, clock=clock, sleep=clock.sleep)
    await pacer.acquire()
    pacer.defer(3)  # Retry-After 3 s: longer than the 0.5 s interval and the burst allowance
    await pacer.acquire()
    assert clock.now == pytest.approx(103.0)


async def test_headroom_leaves_a_share_of_the_rate_unused():
    clock = Clock()
    pacer = Pacer(0.25, clock=clock, sleep=clock.sleep, headroom=0.05)
    for _ in range(3):
        await pacer.acquire()
    assert clock.slept == [pytest.approx(4 / 0.95)] * 2  # 4.21 s apart, not exactly 4
