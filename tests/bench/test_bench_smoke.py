"""The onboarding benchmark still runs end to end: bench/onboarding.py at N=5, no injected
latency, its own sandbox with the bench world. Checks that the output is sane (every resource
Ready, counts that add up), never how fast anything was: benchmarks print, tests do not time."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
N = 5

pytestmark = pytest.mark.controlplane


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A sandbox state directory with a short path: the kubelet puts unix sockets under it (its
    pod-resources socket), and a socket path holds at most 108 bytes; tmp_path is deeper."""
    path = Path(tempfile.mkdtemp(prefix="swi-bench-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_onboarding_driver_at_tiny_n(tmp_path: Path, state_dir: Path) -> None:
    out = tmp_path / "onboarding.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "onboarding.py"),
            "--n",
            str(N),
            "--no-limits",
            "--state-dir",
            str(state_dir),
            "--name",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    stopped = subprocess.run(
        [sys.executable, "-m", "sandbox", "--state-dir", str(state_dir), "down"],
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert stopped.returncode == 0
    results = json.loads(out.read_text())
    (run,) = results["runs"]
    assert run["n"] == N and run["identities"] == 2 and run["namespaces"] == N

    baseline, operator = run["baseline"], run["operator"]
    assert baseline["credentials"] == N  # one federated credential per service account
    assert baseline["entra_calls"]["graph.fic.create"] == N
    assert baseline["sql"].get("operator write", 0) >= 2  # the seed's Step 2: users, roles

    assert operator["ready"] == N and operator["not_ready"] == {}
    assert operator["seconds"] is not None and operator["seconds"] > 0
    assert len(operator["ready_curve_s"]) == N
    assert operator["credentials"] == N
    calls = operator["entra_calls"]
    assert calls["graph.fic.update"] == N  # one write each, no retries with nothing injected
    # First passes reuse an identity's list for a while (federation.RecentLists): at least one
    # list per identity, never more than one per resource.
    assert run["identities"] <= calls["graph.fic.list"] <= N
    assert calls.get("graph.applications.get", 0) <= 2  # one lookup per app, however many ask
    assert operator["throttled"] == 0
    # Every resource's Verified probe queries as its identity; a first probe may do so on a
    # session another probe of the identity just logged in to (sql.PROBE_SESSION_SHARED_S).
    assert run["identities"] <= operator["sql"].get("identity login", 0) <= N
    assert operator["sql"].get("identity read", 0) >= N
    assert operator["api_requests"] > 0 and operator["operator_rss_mib"] > 0
    assert "| N |" in done.stdout  # the printed table


def test_fleet_driver_at_tiny_n(tmp_path: Path, state_dir: Path) -> None:
    """bench/fleet.py's windows at N=4 with a 4 s drift interval: every phase runs, the drift
    cycles are counted from the operator's log, and a fleet at rest writes nothing to the cloud."""
    out = tmp_path / "fleet.json"
    state = state_dir
    windows = ["--control", "2", "--steady", "10", "--restart-window", "6"]
    windows += ["--probe-window", "10", "--churn-minutes", "0.25", "--drift-interval", "4"]
    fleet = [sys.executable, str(ROOT / "bench" / "fleet.py"), "--n", "4"]
    done = subprocess.run(
        [*fleet, "--state-dir", str(state), *windows, "--name", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    subprocess.run(
        [sys.executable, "-m", "sandbox", "--state-dir", str(state), "down"],
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["steady"]["drift_cycles"] >= 1  # counted, not guessed
    assert results["probe"]["drift_cycles"] >= 1 and results["probes_measured"] >= 4
    hour = results["per_hour"]
    assert hour["graph_writes"] == 0 and hour["arm_writes"] == 0 and hour["sql_writes"] == 0
    assert hour["sql_logins"] > 0  # the hourly probe logs in as the identity
    churn = results["churn"]
    assert churn["changes"] >= 2 and churn["converged"] == churn["changes"]
    assert results["operator_memory_mib"]["rss"] > 0
    assert "per resource per hour" in done.stdout


def test_tokenless_pods_driver_at_tiny_n(tmp_path: Path, state_dir: Path) -> None:
    """bench/tokenless_pods.py with two Deployments of one replica: the drift-only mode counts the
    first ReplicaSet's pods without a token, the webhook mode none."""
    out = tmp_path / "tokenless.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "tokenless_pods.py"),
            "--deployments",
            "2",
            "--replicas",
            "1",
            "--drift-interval",
            "3",
            "--state-dir",
            str(state_dir),
            "--name",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    stopped = subprocess.run(
        [sys.executable, "-m", "sandbox", "--state-dir", str(state_dir), "down"],
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert stopped.returncode == 0
    drift, webhook = json.loads(out.read_text())["runs"]
    assert (drift["mode"], webhook["mode"]) == ("drift", "webhook")
    # Without the webhook, each Deployment's first pod was created before the label.
    assert drift["pods_without_token"] >= 2
    assert drift["pods"] > drift["pods_without_token"]  # and the labelled ones were injected
    assert webhook["pods_without_token"] == 0
    assert webhook["pods"] >= 2


def test_injection_latency_driver_at_tiny_n(tmp_path: Path, state_dir: Path) -> None:
    """bench/injection_latency.py with a few pods of each kind: every measure is there, the
    handler and the API server saw each labelled create, and the webhook's answer injected."""
    out = tmp_path / "injection.json"
    pods = 6
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "injection_latency.py"),
            "--pods",
            str(pods),
            "--warmup",
            "2",
            "--state-dir",
            str(state_dir),
            "--name",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    stopped = subprocess.run(
        [sys.executable, "-m", "sandbox", "--state-dir", str(state_dir), "down"],
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert stopped.returncode == 0
    result = json.loads(out.read_text())
    assert result["baseline"]["n"] == result["with_webhook"]["n"] == pods
    assert result["direct_to_webhook"]["n"] == pods
    # The webhook saw the labelled creates only (the objectSelector keeps the baseline away).
    assert result["handler_calls"] == pods
    assert result["apiserver_webhook_calls"] == pods
    assert result["handler_mean_ms"] > 0
    # Every measured admission was answered from the service account cache.
    assert result["service_account_reads"] == {"cache": pods, "api": 0}


@pytest.mark.timeout(600)  # the restart at the end waits for a drift cycle (every 60 s)
def test_pools_driver_at_tiny_n(tmp_path: Path, state_dir: Path) -> None:
    """bench/pools.py on two clusters with a pool of one member that must grow: every namespace
    Ready, the pool grew by exactly the members needed (one app per name, however the clusters
    raced), no member past 20 credentials; then a small fleet at rest on a grown pool, and a new
    operator resuming it."""
    out = tmp_path / "pools.json"
    namespaces = 30  # two members: one grown
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "pools.py"),
            "--namespaces",
            str(namespaces),
            "--clusters",
            "2",
            "--at-rest",
            "25",
            "--steady",
            "2",
            "--restart-steady",
            "1",
            "--no-limits",
            "--state-dir",
            str(state_dir),
            "--name",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=540,  # the restart waits for a drift cycle (every 60 s)
        check=False,
    )
    stopped = subprocess.run(
        [sys.executable, "-m", "sandbox", "--state-dir", str(state_dir), "down"],
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert stopped.returncode == 0
    results = json.loads(out.read_text())
    onboard = results["onboarding"]
    assert [c["ready"] for c in onboard["per_cluster"]] == [15, 15], onboard["per_cluster"]
    assert onboard["members_needed"] == 2
    assert onboard["apps_created"] == onboard["apps_created_distinct_names"] == 1
    per = onboard["credentials_per_member"]
    assert per["total"] == namespaces and per["max"] <= 20 and per["members_used"] == 2
    assert onboard["seconds"] is not None and onboard["seconds"] > 0
    rest = results["at_rest"]
    assert rest["ready"] == 25 and rest["not_ready"] == {}
    assert rest["operator_rss_mib"] > 0 and rest["memory_bound_mib"] == 512
    again = rest["restart"]  # a new operator resumed all 25, then a drift cycle ran
    assert again["resumed"] == 25 and again["rss_at_rest_max_mib"] > 0, again
    assert "| namespaces | clusters |" in done.stdout
