"""Fixtures for the operator's integration tests: the real operator (kopf's ``KopfRunner``, or a
subprocess when a test kills it) against the shared sandbox: control plane and Entra emulator.

``operator`` runs the operator for one test, watching only that test's namespace, with the
operator's sandbox credentials and a short drift interval; every test starts from the Entra
emulator's world seed (no credentials, no injected faults). On teardown the test's resources are
deleted while the operator still runs, so their finalizers do not keep the namespace alive.
Nothing here is mocked: the SDKs talk to the emulator, kopf to the API server. The unit tests in
``unit/`` use none of these fixtures and need no sandbox.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from operator_harness import (  # type: ignore[import-not-found]
    CRD_FILE,
    GROUP,
    PLURAL,
    POLICY_CRD_FILE,
    POLICY_PLURAL,
    POOL_CRD_FILE,
    POOL_PLURAL,
    ROOT,
    Cluster,
    Entra,
    World,
    delete_all,
    load_world,
    operator_environment,
)


@pytest.fixture(scope="session")
def world() -> World:
    return load_world()


@pytest.fixture
def entra(sandbox: Any, world: World) -> Entra:
    """The Entra emulator, reset to the world seed for this test."""
    client = Entra(sandbox.state_dir, world)
    client.admin.reset()
    return client


@pytest.fixture(scope="session")
def crds(sandbox: Any) -> None:
    for crd in (CRD_FILE, POLICY_CRD_FILE, POOL_CRD_FILE):
        subprocess.run(
            [str(sandbox.kubectl), "apply", "-f", str(ROOT / "crds" / crd)],
            check=True,
            capture_output=True,
        )
    subprocess.run(
        [
            str(sandbox.kubectl),
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            f"crd/{PLURAL}.{GROUP}",
            f"crd/{POLICY_PLURAL}.{GROUP}",
            f"crd/{POOL_PLURAL}.{GROUP}",
        ],
        check=True,
        capture_output=True,
    )
    # The apply above cached the API's resource types from before the CRDs (kubectl keeps its
    # discovery for hours); `kubectl explain swi` would not know the short name. api-resources
    # always reads discovery afresh and rewrites the cache.
    subprocess.run(
        [str(sandbox.kubectl), "api-resources", f"--api-group={GROUP}"],
        check=True,
        capture_output=True,
    )


@pytest.fixture
def cluster(sandbox: Any, kube: Any, namespace: str, crds: None) -> Cluster:
    return Cluster(kube, sandbox.kubectl, namespace)


@pytest.fixture
def operator_env(
    sandbox: Any, world: World, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    env: dict[str, str] = operator_environment(sandbox, world, namespace)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def operator(operator_env: dict[str, str], cluster: Cluster, entra: Entra) -> Iterator[Any]:
    """The operator, in-process (kopf's KopfRunner), for this test's namespace."""
    from kopf.testing import KopfRunner

    args = ["run", "--standalone", "-n", cluster.namespace, "-m", "swi_operator.handlers"]
    with KopfRunner(args, timeout=60) as runner:
        yield runner
        delete_all(cluster)
    # kopf types ``exception`` as never None; it is None when the operator exited cleanly.
    assert runner.exit_code == 0, f"{runner.exception!r}\n{runner.output}"


@pytest.fixture
def operator_process(
    operator_env: dict[str, str], cluster: Cluster, entra: Entra, tmp_path: Path
) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Start ``python -m swi_operator`` as a real process (so a test can kill -9 it)."""
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        log = (tmp_path / f"operator-{len(started)}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "swi_operator"],
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, **operator_env},
        )
        started.append(process)
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        assert line.startswith("READY"), (tmp_path / f"operator-{len(started) - 1}.log").read_text()
        return process

    yield start
    if started and started[-1].poll() is None:
        delete_all(cluster)
    for process in started:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=20)


@pytest.fixture
def sql(sandbox: Any, world: World, entra: Entra) -> Iterator[Any]:
    """The SQL emulator as its Entra admin sees it (``sql_harness.SqlAdmin``). Ask for it before
    ``operator``: it then outlives the operator's clean-up and puts back the seed's users, the
    emulator's faults and Entra's controls after the test."""
    from sql_harness import SqlAdmin  # type: ignore[import-not-found]

    admin = SqlAdmin(
        sandbox.state_dir, world.tenant, world.operator.client_id, world.operator.secret
    )
    admin.restore_seed(world.demo_app.client_id)
    yield admin
    admin.fail_logins(0)
    admin.restore_seed(world.demo_app.client_id)
    entra.admin.reset(state=False)


@pytest.fixture
def operator_with(
    operator_env: dict[str, str], cluster: Cluster, entra: Entra, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., contextlib.AbstractContextManager[Any]]:
    """``operator`` with other settings: ``with operator_with(SWI_ISSUER="https://..."):``."""
    from kopf.testing import KopfRunner

    @contextlib.contextmanager
    def run(**settings: str) -> Iterator[Any]:
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        args = ["run", "--standalone", "-n", cluster.namespace, "-m", "swi_operator.handlers"]
        with KopfRunner(args, timeout=60) as runner:
            yield runner
            delete_all(cluster)
        assert runner.exit_code == 0, f"{runner.exception!r}\n{runner.output}"

    return run
