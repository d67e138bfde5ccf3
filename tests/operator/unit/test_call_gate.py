"""The call gate classifies failures and holds every caller back after a 429."""

from __future__ import annotations

import pytest
from msgraph.generated.models.o_data_errors.main_error import MainError
from msgraph.generated.models.o_data_errors.o_data_error import ODataError
from swi_operator.cloud import CallGate
from swi_operator.errors import Reason, TransientError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_throttle_pauses_everyone_until_retry_after():
    clock = Clock()
    gate = CallGate("Microsoft Graph", 4, clock)
    calls = 0

    async def throttled() -> None:
        nonlocal calls
        calls += 1
        raise ODataError(
            response_status_code=429,
            response_headers={"Retry-After": "5"},
            error=MainError(code="x"),
        )

    async def fine() -> str:
        nonlocal calls
        calls += 1
        return "ok"

    with pytest.raises(TransientError) as first:
        await gate.call("write", throttled)
    assert first.value.delay == 5
    clock.now += 2
    with pytest.raises(TransientError) as held:
        await gate.call("read", fine)
    assert held.value.reason is Reason.THROTTLED and held.value.delay == pytest.approx(3)
    assert calls == 1  # the held call never reached the service
    clock.now += 3.1
    assert await gate.call("read", fine) == "ok"
