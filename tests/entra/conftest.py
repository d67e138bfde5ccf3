"""Fixtures for the Entra emulator tests: the emulator as a real subprocess, and an OIDC issuer.

``entra`` starts ``python -m sandbox.entra serve`` once per session in a temporary state
directory, exactly as the launcher does (READY line, ``entra.json``). Tests trust its CA
explicitly (``connection_verify=``, ``EntraService.http``) rather than through
``REQUESTS_CA_BUNDLE``, because the shared ``sandbox`` fixture points that variable at its own CA
for the rest of the session. Every test starts from the world seed with no injected faults
(``reset_emulator`` is autouse). ``issuer`` is a small HTTPS OIDC issuer on loopback (its own RSA
keys, certificate from the sandbox CA) that plays a cluster's issuer for the fast jwt-bearer
tests; test_controlplane_federation.py uses the real control plane's issuer.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from entra_harness import (
    WORLD_FILE,
    EntraService,
    OidcIssuer,
    start_emulator,
    stop_emulator,
)


@pytest.fixture(scope="session")
def entra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EntraService]:
    state_dir = tmp_path_factory.mktemp("entra")
    process, _ = start_emulator(state_dir, "--world", str(WORLD_FILE), "--port", "0")
    service = EntraService.attach(state_dir, process)
    try:
        yield service
    finally:
        assert stop_emulator(process) == 0


@pytest.fixture(autouse=True)
def reset_emulator(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("controlplane") is None:  # those use the sandbox's own
        entra: EntraService = request.getfixturevalue("entra")
        entra.admin.reset()


@pytest.fixture(scope="session")
def issuer(entra: EntraService) -> Iterator[OidcIssuer]:
    with OidcIssuer.start(entra.state_dir) as running:
        yield running


@pytest.fixture
def fresh_issuer(issuer: OidcIssuer) -> OidcIssuer:
    """The issuer with its published keys as at start (undoes key rotation and outages)."""
    issuer.restore()
    return issuer
