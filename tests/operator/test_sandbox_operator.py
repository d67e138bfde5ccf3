"""`python -m sandbox up --operator` runs the operator against a sandbox of its own; `down` stops
it. Exactly the commands docs/operator.md gives, on the examples in deploy/examples/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from operator_harness import ROOT  # type: ignore[import-not-found]

pytestmark = pytest.mark.controlplane


def sandbox_cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SWI_SANDBOX_DIR"}
    return subprocess.run(
        [sys.executable, "-m", "sandbox", "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=240,
        check=False,
    )


def test_up_with_operator_reconciles_the_examples_and_down_stops_it():
    # A short state directory: the kubelet puts unix sockets under it (108 bytes at most), and
    # pytest's tmp_path is deeper than that.
    state = Path(tempfile.mkdtemp(prefix="swi-up-"))
    try:
        up = sandbox_cli(state, "up", "--operator")
        assert up.returncode == 0, up.stderr
        assert "operator: ready" in up.stdout
        exports = sandbox_cli(state, "env").stdout
        env = dict(os.environ)
        for line in exports.splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = value.strip("'")

        def kubectl(*args: str, stdin: str | None = None) -> str:
            done = subprocess.run(
                ["kubectl", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                input=stdin,
            )
            assert done.returncode == 0, done.stderr
            return done.stdout

        examples = ROOT / "deploy" / "examples"
        # As the examples' own comments say: the sandbox's SQL server instead of Azure's name.
        # The platform team's policies come first: the sandbox's operator requires them.
        for name in ("policies.yaml", "customer-reader.yaml"):
            text = (examples / name).read_text()
            text = text.replace("tcp:sandbox-sql.database.windows.net,1433", env["AZ_SERVER"])
            kubectl("apply", "-f", "-", stdin=text)
        kubectl(
            "apply",
            "-f",
            str(examples / "customer-api-managed-identity.yaml"),
            "-f",
            str(examples / "payroll-not-owned.yaml"),
        )
        for name in ("customer-reader", "customer-api"):
            kubectl(
                "wait",
                "--for=condition=Ready",
                f"swi/{name}",
                "-n",
                "workload-demo",
                "--timeout=60s",
            )
        kubectl(
            "wait",
            '--for=jsonpath={.status.conditions[?(@.type=="Ready")].reason}=PermissionDenied',
            "swi/payroll",
            "-n",
            "workload-demo",
            "--timeout=60s",
        )
        table = kubectl("get", "swi", "-A")
        rows = {line.split()[1]: line for line in table.splitlines()[1:]}
        assert " customer-api " in rows["customer-reader"] and " mydb " in rows["customer-reader"]
        assert "customer-api-identity" in rows["customer-api"]
        operator_pid = int((state / "run" / "operator.pid").read_text())
    finally:
        down = sandbox_cli(state, "down")
        shutil.rmtree(state, ignore_errors=True)  # the node's images alone are 1.7 GB
    assert "operator" in down.stdout, down.stdout + down.stderr
    assert (
        not Path(f"/proc/{operator_pid}").exists()
        or "Z" in Path(f"/proc/{operator_pid}/stat").read_text().split()[2]
    )
