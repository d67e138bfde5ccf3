"""The README's "On AKS" walkthrough, executed on a sandbox of its own (e2e tier).

Steps 5, 7, 8 and 9 run as written, in bash, with the README's own kubectl and helm commands.
What Azure's ``az`` does in steps 1-4 and 6 (and step 9's image build) is done by the sandbox in
ONE place, :func:`azure_on_the_sandbox`; the shims a sandbox pod needs (proxy, CA, the SQL
name's host alias; a chart without the AKS add-on) are :data:`SHIMS`. Everything else is the
README's text, so a change there that breaks the walkthrough fails here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sandbox import images, install, launcher, node
from sandbox.tools import helm_binary

pytestmark = pytest.mark.controlplane

REPO = Path(__file__).resolve().parents[2]
ACR = "myswiregistry"
STEPS_RUN = (5, 7, 8, 9)


def walkthrough_steps() -> dict[int, str]:
    """The README's walkthrough split at its ``# N.`` comments."""
    section = (REPO / "README.md").read_text().split("\n## On AKS\n", 1)[1]
    script = section.split("```sh\n", 1)[1].split("\n```", 1)[0]
    steps: dict[int, str] = {}
    number = 0
    for line in script.splitlines(keepends=True):
        if found := re.match(r"# (\d+)\. ", line):
            number = int(found.group(1))
        steps[number] = steps.get(number, "") + line
    return steps


# The sandbox's stand-ins, as bash functions ahead of the README's steps:
# - az: steps 1-4, 6 and step 9's image build are done by azure_on_the_sandbox beforehand; a
#   call is recorded (the test checks which), never run;
# - helm: the chart gets the sandbox's values too (no AKS add-on: identity.mode=projected and the
#   injection webhook on; the proxy, CA and host alias; the node's image, never pulled);
# - kubectl apply -f -: a workload's pod template gets the same pod additions.
SHIMS = r"""
az() { printf '%s\n' "az $*" >> "$AZ_CALLS"; }
helm() { command "$SANDBOX_HELM" "$@" -f "$SANDBOX_CHART_VALUES"; }
kubectl() {
  if [ "$1" = apply ] && [ "$2" = -f ] && [ "$3" = - ]; then
    "$SANDBOX_PYTHON" -m sandbox.install pod-additions --state-dir "$SWI_SANDBOX_DIR" \
      | command kubectl apply -f -
  else
    command kubectl "$@"
  fi
}
set -euo pipefail
"""


def azure_on_the_sandbox(state_dir: Path, env: dict[str, str]) -> dict[str, str]:
    """What the walkthrough's ``az`` steps leave behind, made on the sandbox; returns the shell
    variables they export."""
    world = yaml.safe_load(launcher.WORLD_FILE.read_text())
    apps = {a["name"]: a for a in world["entra"]["applications"]}
    operator_app = apps["sql-workload-identity-operator"]
    # 1: the cluster with its OIDC issuer is the sandbox. 2: the operator's app (its Graph and
    # ARM rights are in the world) federated with its service account.
    install.federate_operator(env)
    # 3: the world makes the operator the server's Entra admin; the emulator has no firewall.
    # 4 and 9: the images from our Dockerfiles, under the names the ACR would give them.
    node.import_project_images(state_dir)
    for ref in images.image_refs():
        acr_name = f"{ACR}.azurecr.io/{ref}"
        tag = node.ctr(state_dir, "images", "tag", "--force", images.qualified(ref), acr_name)
        subprocess.run(tag, check=True, capture_output=True)
    # The CA the operator's pod mounts (the chart's sandbox values name it), in the namespace
    # step 5 creates.
    for doc in (install.namespace(), install.ca_configmap(state_dir, install.NAMESPACE)):
        subprocess.run(
            ["kubectl", "apply", "-f", "-"],
            input=json.dumps(doc),
            text=True,
            env=env,
            check=True,
            capture_output=True,
        )
    # 6: customer-api, owned by the operator (world.yaml).
    (server,) = world["sql"]["servers"]
    return {
        "ACR": ACR,
        "TENANT": operator_app["tenant"],
        "OPERATOR_APP_ID": operator_app["appId"],
        "APP_ID": apps["customer-api"]["appId"],
        "SQL_SERVER": server["name"],
        "SQL_DATABASE": server["databases"][0]["name"],
    }


@pytest.fixture(scope="module")
def own_sandbox(sandbox: Any) -> Iterator[Path]:
    """A sandbox of its own: the walkthrough installs an operator for the whole cluster, which
    must not meet the session sandbox's tests. (``sandbox`` only makes sure it is built.)"""
    if images.cached_images() is None:
        pytest.fail("the images are not built for these sources: run `make images`", False)
    state_dir = Path(tempfile.mkdtemp(prefix="swi-e2e-", dir="/tmp"))
    try:
        launcher.up(state_dir)
    except launcher.SandboxError as exc:
        launcher.down(state_dir)
        pytest.fail(f"the walkthrough's sandbox did not start: {exc}", pytrace=False)
    try:
        yield state_dir
    finally:
        launcher.down(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)


def _logs(env: dict[str, str]) -> str:
    return subprocess.run(
        ["kubectl", "-n", "workload-demo", "logs", "deploy/customer-api"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    ).stdout


def test_the_readme_walkthrough_runs_on_the_sandbox(own_sandbox: Path, tmp_path: Path) -> None:
    state_dir = own_sandbox
    env = {**os.environ, **launcher.environment(state_dir)}
    exports = azure_on_the_sandbox(state_dir, env)
    values = tmp_path / "sandbox-values.yaml"
    sandbox_values = install.chart_values(env)
    del sandbox_values["image"]["repository"], sandbox_values["identity"]  # the README --sets them
    sandbox_values["identity"] = {"mode": "projected"}
    values.write_text(yaml.safe_dump(sandbox_values))
    az_calls = tmp_path / "az-calls"
    az_calls.touch()
    steps = walkthrough_steps()
    script = SHIMS + "".join(steps[n] for n in STEPS_RUN)
    proc = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={
            **env,
            **exports,
            "AZ_CALLS": str(az_calls),
            "SANDBOX_HELM": str(helm_binary()),
            "SANDBOX_CHART_VALUES": str(values),
            "SANDBOX_PYTHON": sys.executable,
        },
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    # Only the image build of step 9 goes to az among the steps run.
    assert az_calls.read_text().splitlines() == [
        f"az acr build -r {ACR} -t sql-workload-identity-workload:0.1.0 -f workload/Dockerfile ."
    ]
    # The operator runs as a pod of the chart, signed in with its projected token (no secret).
    pods = json.loads(
        subprocess.run(
            ["kubectl", "-n", install.NAMESPACE, "get", "pods", "-o", "json"],
            capture_output=True, text=True, env=env, check=True,
        ).stdout
    )  # fmt: skip
    live = [p for p in pods["items"] if not p["metadata"].get("deletionTimestamp")]
    assert len(live) == 2, [p["metadata"]["name"] for p in live]  # the chart's two replicas
    for operator_pod in live:
        container = operator_pod["spec"]["containers"][0]
        assert container["image"] == f"{ACR}.azurecr.io/sql-workload-identity-operator:0.1.0"
        names = {e["name"] for e in container.get("env", [])}
        assert "AZURE_FEDERATED_TOKEN_FILE" in names and "AZURE_CLIENT_SECRET" not in names
    # The seed's ending: the workload's pod prints the five customers.
    deadline = time.monotonic() + 180
    while "(5 rows)" not in (log := _logs(env)) and time.monotonic() < deadline:
        time.sleep(2)
    assert "(5 rows)" in log, log
    for first, last in [("John", "Doe"), ("Emily", "Davis")]:
        assert any(first in line and last in line for line in log.splitlines()), log
