"""The operator's switch for the injection webhook (``--injection-webhook`` / env)."""

from __future__ import annotations

import pytest
from swi_operator.config import ConfigError, load

BASE = {
    "AZURE_TENANT_ID": "8a1f3c2e-5b7d-4e90-a1c3-0f2e4d6b8a10",
    "AZURE_CLIENT_ID": "5e0c1d9a-7b3f-4c2e-9a1d-000000000001",
    "AZURE_CLIENT_SECRET": "sandbox-operator-secret",
}


def test_off_by_default() -> None:
    assert load([], BASE)[0].injection_webhook is False


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("TRUE", True), ("false", False)])
def test_from_the_environment(value: str, expected: bool) -> None:
    assert load([], {**BASE, "SWI_INJECTION_WEBHOOK": value})[0].injection_webhook is expected


def test_flag_wins_over_the_environment() -> None:
    env = {**BASE, "SWI_INJECTION_WEBHOOK": "false"}
    assert load(["--injection-webhook", "true"], env)[0].injection_webhook is True


def test_anything_else_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="--injection-webhook / SWI_INJECTION_WEBHOOK"):
        load([], {**BASE, "SWI_INJECTION_WEBHOOK": "yes please"})
