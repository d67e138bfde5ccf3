"""`make demo` tells the whole story and cleans up after itself (it runs its own sandbox)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_the_seed_story_end_to_end(sandbox):
    # `sandbox` only makes sure the control plane is built; the demo starts a sandbox of its own.
    result = subprocess.run(
        [sys.executable, "-m", "sandbox.demo"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, result.stderr[-2000:]
    assert "condition met" in out
    for first, last in [
        ("John", "Doe"),
        ("Jane", "Smith"),
        ("Alice", "Johnson"),
        ("Bob", "Brown"),
        ("Emily", "Davis"),
    ]:
        assert any(first in line and last in line for line in out.splitlines())
    assert "(5 rows)" in out
    # Installed as on a cluster: the chart's operator pod, the workload as a Deployment whose pod
    # the operator's webhooks labelled and injected, its rows read from `kubectl logs`.
    assert "STATUS: deployed" in out
    assert 'deployment "customer-api" successfully rolled out' in out
    assert "AZURE_FEDERATED_TOKEN_FILE=/var/run/secrets/azure" in out
    assert "$ kubectl -n workload-demo logs deploy/customer-api" in out
    assert out.index("logs deploy/customer-api") < out.index("(5 rows)")
    assert "create token" not in out  # no token minted by hand
    assert 'admission webhook "validate-sqlworkloadidentity.sqlidentity.io" denied' in out
    assert "PermissionDenied" in out
    assert "NotAuthorized" in out
    assert "no SqlIdentityPolicy allows namespace workload-demo" in out
    # The operator created the database user itself and proved the chain.
    assert any(line.split()[:2] == ["Verified", "True"] for line in out.splitlines())
    assert any(line.split()[:2] == ["DatabaseAccessReady", "True"] for line in out.splitlines())
    assert "make the operator's app an owner" in out
    # No credential is ever printed.
    assert "eyJ" not in out
    # The sandbox is stopped, its node with it (the operator and the workload were its pods).
    assert out.rstrip().splitlines()[-1].startswith("stopped: kube-proxy, kubelet, containerd")
