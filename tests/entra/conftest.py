"""Fixtures for the Entra emulator tests: the emulator as a real subprocess, and an OIDC issuer.

``entra`` starts ``python -m sandbox.entra serve`` once per session in a temporary state
directory, exactly as the launcher does (READY line, ``entra.json``), and exports the CA bundle
variables the launcher exports. Every test starts from the world seed with no injected faults
(``reset_emulator`` is autouse). ``issuer`` is a small HTTPS OIDC issuer on loopback (its own RSA
keys, certificate from the sandbox CA) that plays the Kubernetes API server for jwt-bearer tests
until those also run against the sandbox control plane.
"""

from __future__ import annotations

import os
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
    trust = {
        "REQUESTS_CA_BUNDLE": str(state_dir / "ca.crt"),
        "SSL_CERT_FILE": str(state_dir / "ca.crt"),
    }
    saved = {name: os.environ.get(name) for name in trust}
    os.environ.update(trust)
    service = EntraService.attach(state_dir, process)
    try:
        yield service
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        assert stop_emulator(process) == 0


@pytest.fixture(autouse=True)
def reset_emulator(entra: EntraService) -> None:
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
