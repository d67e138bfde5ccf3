"""Graph's read-after-write lag (``graphReadLagSeconds``): reads trail writes, writes do not.

Real Graph serves reads from replicas that may not have seen a write yet: a credential just
created is missing from the list and from a GET, a create of its name is still refused as
existing (the primary has it), a deleted one is still listed. The emulator's lag mode behaves so
for a configured time and then converges.
"""

from __future__ import annotations

import time
import uuid

from entra_harness import EntraService

APP = "customer-api"
ISSUER = "https://issuer.example/lag"
AUDIENCE = "api://AzureADTokenExchange"


def _names(entra: EntraService, base: str) -> set[str]:
    response = entra.graph("GET", base)
    assert response.status_code == 200, response.text
    return {c["name"] for c in response.json()["value"]}


def _wait_until(condition: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "the lagging reads never converged"
        time.sleep(0.2)


def test_reads_miss_a_create_and_still_see_a_delete_until_the_lag_passes(
    entra: EntraService,
) -> None:
    entra.admin.controls(graphReadLagSeconds=3)
    base = f"/applications/{entra.principal(APP).app_object_id}/federatedIdentityCredentials"
    name = f"lag-{uuid.uuid4().hex[:8]}"
    body = {"name": name, "issuer": ISSUER, "subject": f"sa:{name}", "audiences": [AUDIENCE]}

    created = entra.graph("POST", base, body)
    assert created.status_code == 201, created.text
    assert name not in _names(entra, base)
    assert entra.graph("GET", f"{base}(name='{name}')").status_code == 404
    again = entra.graph("POST", base, body)
    assert again.status_code == 409, again.text
    error = again.json()["error"]
    assert error["code"] == "Request_MultipleObjectsWithSameKeyValue"
    assert error["message"] == f"FederatedIdentityCredential with name {name} already exists."
    _wait_until(lambda: name in _names(entra, base))

    assert entra.graph("DELETE", f"{base}(name='{name}')").status_code == 204
    assert name in _names(entra, base)
    # The primary has no such credential any more: a second delete is a 404, not a success.
    assert entra.graph("DELETE", f"{base}(name='{name}')").status_code == 404
    _wait_until(lambda: name not in _names(entra, base))


def test_without_the_lag_reads_see_every_write_at_once(entra: EntraService) -> None:
    entra.admin.controls(graphReadLagSeconds=0)
    base = f"/applications/{entra.principal(APP).app_object_id}/federatedIdentityCredentials"
    name = f"nolag-{uuid.uuid4().hex[:8]}"
    body = {"name": name, "issuer": ISSUER, "subject": f"sa:{name}", "audiences": [AUDIENCE]}
    assert entra.graph("POST", base, body).status_code == 201
    assert name in _names(entra, base)
    assert entra.graph("DELETE", f"{base}(name='{name}')").status_code == 204
    assert name not in _names(entra, base)
