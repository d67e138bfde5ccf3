"""Shared fixtures: one sandbox for the whole test session, a fresh namespace per test.

The session starts the real sandbox (control plane, Entra emulator, Azure SQL emulator, the
node) in a temporary state directory through the same launcher `python -m sandbox up` uses,
applies its environment (CA bundle variables, Azure endpoints) to this process the way a user's
shell would, and stops it at the end. Set ``SWI_TEST_SANDBOX_DIR`` to a running sandbox's state
directory to reuse it across runs while developing (it is then left running).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from sandbox import launcher


@dataclass
class Sandbox:
    state_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def ca(self) -> Path:
        return self.state_dir / "ca.crt"

    @property
    def kubeconfig(self) -> str:
        return self.env["KUBECONFIG"]

    @property
    def issuer(self) -> str:
        return self.env["SANDBOX_ISSUER"]

    @property
    def kubectl(self) -> Path:
        return launcher.controlplane_bin_dir() / "kubectl"

    def component(self, name: str) -> launcher.Running:
        """The running component ``name``; fails the test clearly if this checkout lacks it."""
        comp = next(c for c in launcher.ALL_COMPONENTS if c.name == name)
        running = launcher.inspect(self.state_dir, comp)
        if not running.alive:
            pytest.fail(
                f"sandbox component {name!r} is not running in {self.state_dir}", pytrace=False
            )
        return running


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    reuse = os.environ.get("SWI_TEST_SANDBOX_DIR")
    state_dir = Path(reuse) if reuse else tmp_path_factory.mktemp("sandbox")
    try:
        launcher.up(state_dir)
    except launcher.SandboxError as exc:
        if not reuse:
            launcher.down(state_dir)
        pytest.fail(f"the sandbox did not start: {exc}", pytrace=False)
    env = launcher.environment(state_dir)
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    box = Sandbox(state_dir, env)
    try:
        yield box
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if not reuse:
            launcher.down(state_dir)


@pytest.fixture(scope="session")
def kube(sandbox: Sandbox):  # type: ignore[no-untyped-def]
    """A kubernetes ApiClient for the sandbox's admin (system:masters)."""
    from kubernetes import config

    client = config.new_client_from_config(config_file=sandbox.kubeconfig)
    yield client
    client.close()


@pytest.fixture(scope="session")
def admin_graph(sandbox: Sandbox) -> Callable[..., requests.Response]:
    """Raw Microsoft Graph calls as the world's ``sandbox-admin`` app (Application.ReadWrite.All),
    for tests that set up or inspect federated credentials outside the code under test."""
    from sandbox.entra.state import load_world

    admin = next(p for p in load_world(launcher.WORLD_FILE).principals if p.name == "sandbox-admin")
    env = sandbox.env

    def call(method: str, path: str, body: dict[str, Any] | None = None) -> requests.Response:
        token = requests.post(
            f"{env['AZURE_AUTHORITY_HOST']}/{admin.tenant_id}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": admin.client_id,
                "client_secret": admin.secrets[0],
                "scope": "https://graph.microsoft.com/.default",
            },
            verify=str(sandbox.ca),
            timeout=10,
        ).json()["access_token"]
        return requests.request(
            method,
            f"{env['SANDBOX_GRAPH_URL']}{path}",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            verify=str(sandbox.ca),
            timeout=10,
        )

    return call


@pytest.fixture
def namespace(kube) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A fresh namespace for one test, deleted (without waiting) afterwards."""
    from kubernetes import client

    core = client.CoreV1Api(kube)
    name = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


@pytest.fixture
def federated_app(sandbox: Sandbox, namespace: str, admin_graph: Any) -> Iterator[tuple[str, str]]:
    """customer-api federated with ``system:serviceaccount:<ns>:customer-reader`` (audience
    api://AzureADTokenExchange); yields its client id and service principal object id."""
    from sandbox.entra.state import load_world

    app = next(p for p in load_world(launcher.WORLD_FILE).principals if p.name == "customer-api")
    name = f"node-{uuid.uuid4().hex[:12]}"
    path = f"/applications/{app.app_object_id}/federatedIdentityCredentials"
    created = admin_graph(
        "POST",
        path,
        {
            "name": name,
            "issuer": sandbox.issuer,
            "subject": f"system:serviceaccount:{namespace}:customer-reader",
            "audiences": ["api://AzureADTokenExchange"],
        },
    )
    assert created.status_code == 201, created.text
    try:
        yield app.client_id, app.sp_object_id
    finally:
        admin_graph("DELETE", f"{path}(name='{name}')")
