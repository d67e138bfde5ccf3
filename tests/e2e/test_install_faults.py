"""Faults on a running install (e2e tier, a sandbox of its own): the operator installed with its
chart is killed (its pod force-deleted) in the middle of onboarding 50 resources; its Deployment
starts a new pod, every resource turns Ready, and no federated credential or database user is
duplicated or left without a resource; the pod's metrics count what it did."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sandbox import images, install, launcher, node
from sandbox.entra.ctl import AdminClient
from sandbox.tools import helm_binary

pytestmark = pytest.mark.controlplane

N = 50
APPS = 3  # at most 17 resources each: under Entra's 20 credentials per app
NAMESPACES = 10
SQL_SERVER = "tcp:sandbox-sql.database.windows.net,1433"


def _guid(*parts: object) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "swi-e2e/" + "/".join(map(str, parts))))


def write_world(path: Path) -> list[dict[str, Any]]:
    """sandbox/world.yaml plus APPS app registrations the operator owns."""
    world = yaml.safe_load(launcher.WORLD_FILE.read_text())
    tenant = world["entra"]["applications"][0]["tenant"]
    apps = [
        {
            "name": f"e2e-app-{i}",
            "tenant": tenant,
            "appId": _guid(i, "appId"),
            "objectId": _guid(i, "objectId"),
            "servicePrincipalObjectId": _guid(i, "sp"),
            "owners": ["sql-workload-identity-operator"],
        }
        for i in range(APPS)
    ]
    world["entra"]["applications"].extend(apps)
    path.write_text(yaml.safe_dump(world, sort_keys=False))
    return apps


def kubectl(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(
        ["kubectl", *args], input=stdin, capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}"
    return proc.stdout


def wait_for(what: str, check: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if last := check():
            return last
        time.sleep(1)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}", pytrace=False)


@pytest.fixture(scope="module")
def installed(sandbox: Any) -> Iterator[tuple[Path, dict[str, str], list[dict[str, Any]]]]:
    """Its own sandbox (with three more apps) and the operator installed from the chart."""
    if images.cached_images() is None:
        pytest.fail("the images are not built for these sources: run `make images`", False)
    state_dir = Path(tempfile.mkdtemp(prefix="swi-e2e-", dir="/tmp"))
    world = state_dir / "world.yaml"
    apps = write_world(world)
    saved = os.environ.get(launcher.WORLD_ENV)
    os.environ[launcher.WORLD_ENV] = str(world)
    try:
        launcher.up(state_dir)
        env = install.install(state_dir, say=lambda _: None)
    except launcher.SandboxError as exc:
        launcher.down(state_dir)
        pytest.fail(f"the sandbox or the install failed: {exc}", pytrace=False)
    finally:
        if saved is None:
            os.environ.pop(launcher.WORLD_ENV, None)
        else:
            os.environ[launcher.WORLD_ENV] = saved
    try:
        yield state_dir, env, apps
    finally:
        launcher.down(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)


def _manifests(apps: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, set[str]]]:
    namespaces = [f"e2e-{n:02d}" for n in range(NAMESPACES)]
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}} for ns in namespaces
    ]
    docs += [
        {
            "apiVersion": "sqlidentity.io/v1alpha1",
            "kind": "SqlIdentityPolicy",
            "metadata": {"name": app["name"]},
            "spec": {
                "identity": {"applicationClientId": app["appId"]},
                "namespaces": {"names": namespaces},
                "sql": {"servers": [SQL_SERVER], "databases": ["mydb"], "roles": ["db_datareader"]},
            },
        }
        for app in apps
    ]
    subjects: dict[str, set[str]] = {app["name"]: set() for app in apps}
    for i in range(N):
        app, ns = apps[i % APPS], namespaces[i % NAMESPACES]
        docs.append(
            {
                "apiVersion": "sqlidentity.io/v1alpha1",
                "kind": "SqlWorkloadIdentity",
                "metadata": {"name": f"swi-{i:02d}", "namespace": ns},
                "spec": {
                    "serviceAccountName": f"sa-{i:02d}",
                    "identity": {"applicationClientId": app["appId"]},
                    "sql": {"server": SQL_SERVER, "database": "mydb", "roles": ["db_datareader"]},
                },
            }
        )
        subjects[app["name"]].add(f"system:serviceaccount:{ns}:sa-{i:02d}")
    return docs, subjects


def _ready_count(env: dict[str, str]) -> int:
    items = json.loads(kubectl(env, "get", "swi", "-A", "-o", "json"))["items"]
    conditions = [(i.get("status") or {}).get("conditions", []) for i in items]
    return sum(
        any(c["type"] == "Ready" and c["status"] == "True" for c in each) for each in conditions
    )


def _operator_pods(env: dict[str, str]) -> list[dict[str, Any]]:
    pods = json.loads(kubectl(env, "-n", install.NAMESPACE, "get", "pods", "-o", "json"))
    items: list[dict[str, Any]] = pods["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def test_the_operator_pod_killed_while_onboarding_50_resources(
    installed: tuple[Path, dict[str, str], list[dict[str, Any]]],
) -> None:
    state_dir, env, apps = installed
    # Slow Graph down as Azure is (a few hundred ms a call), so the kill lands mid-way.
    entra = AdminClient.from_state_dir(state_dir)
    entra.latency("graph.*", 0.3)
    docs, subjects = _manifests(apps)
    kubectl(env, "apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
    (first,) = _operator_pods(env)
    started = wait_for("a few resources Ready", lambda: 3 <= _ready_count(env) < N, timeout=300)
    assert started
    killed_at = _ready_count(env)
    kubectl(
        env, "-n", install.NAMESPACE, "delete", "pod", first["metadata"]["name"],
        "--grace-period=0", "--force", "--wait=false",
    )  # fmt: skip
    # The Deployment starts another pod, which takes the work over.
    wait_for(
        "the operator's new pod to run",
        lambda: any(
            p["metadata"]["name"] != first["metadata"]["name"]
            and p["status"].get("phase") == "Running"
            for p in _operator_pods(env)
        ),
        timeout=180,
    )
    wait_for(f"all {N} resources Ready", lambda: _ready_count(env) == N, timeout=600)
    assert killed_at < N, "the kill came after onboarding ended: it tested nothing"

    # No duplicate and no orphan federated credential: each app trusts exactly its resources'
    # subjects, once each.
    principals = {p["name"]: p for p in entra.call("GET", "state")["principals"]}
    for app in apps:
        creds = principals[app["name"]]["credentials"]
        found = Counter(c["subject"] for c in creds)
        assert set(found) == subjects[app["name"]], app["name"]
        assert all(count == 1 for count in found.values()), found
    # One database user per app, with the role, and no other new user.
    admin_url = launcher.environment(state_dir)["SWI_AZURESQL_ADMIN_URL"]
    (server,) = requests.get(f"{admin_url}/servers", timeout=10).json()
    users = Counter(u["name"] for u in server["databases"]["mydb"])
    for app in apps:
        assert users[app["name"]] == 1, users
    roles = {u["name"]: u["roles"] for u in server["databases"]["mydb"]}
    assert all("db_datareader" in roles[app["name"]] for app in apps), roles


def test_the_operator_pod_serves_its_metrics(
    installed: tuple[Path, dict[str, str], list[dict[str, Any]]],
) -> None:
    """The chart's metrics Service and port, and the operator pod's /metrics fetched over the pod
    network through the API server's pod proxy (the sandbox's controller-manager keeps
    EndpointSlices only, which the service proxy does not read): the pod that onboarded the 50
    (the test above; applied again here, which is a no-op after it) counts its reconciles and
    its Graph requests with their statuses, and the policy webhook's answer to a server-side dry
    run of one more resource."""
    _, env, apps = installed
    docs, _ = _manifests(apps)
    kubectl(env, "apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
    wait_for(f"all {N} resources Ready", lambda: _ready_count(env) == N, timeout=600)
    (probe,) = [d for d in docs if d["metadata"]["name"] == "swi-00"]
    probe = {
        **probe,
        "metadata": {**probe["metadata"], "name": "swi-metrics-probe"},
        "spec": {**probe["spec"], "serviceAccountName": "sa-metrics-probe"},
    }
    kubectl(env, "apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(probe))
    service = json.loads(
        kubectl(
            env, "-n", install.NAMESPACE, "get", "service",
            "sql-workload-identity-operator-metrics", "-o", "json",
        )
    )  # fmt: skip
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "protocol": "TCP", "targetPort": "metrics"}
    ]
    (pod,) = [p for p in _operator_pods(env) if p["status"].get("phase") == "Running"]
    path = (
        f"/api/v1/namespaces/{install.NAMESPACE}/pods/"
        f"http:{pod['metadata']['name']}:9090/proxy/metrics"
    )
    text = kubectl(env, "get", "--raw", path)
    families = {f.name: f.samples for f in text_string_to_metric_families(text)}
    ready = sum(
        s.value
        for s in families["swi_reconciles"]
        if s.labels["operation"] == "reconcile" and s.labels["result"] == "ready"
    )
    assert ready > 0, families["swi_reconciles"]
    graph = [s for s in families["swi_cloud_requests"] if s.labels["service"] == "graph"]
    assert sum(s.value for s in graph if s.labels["status"].startswith("2")) > 0, graph
    assert families["swi_reconcile_slots"][0].value > 0
    admitted = [
        s
        for s in families["swi_webhook_requests"]
        if s.labels["webhook"] == "validate-sqlworkloadidentity" and s.labels["result"] == "allowed"
    ]
    assert sum(s.value for s in admitted) > 0, families["swi_webhook_requests"]


def test_helm_upgrade_to_another_image_keeps_everything_and_counts_refusals(
    installed: tuple[Path, dict[str, str], list[dict[str, Any]]],
) -> None:
    """After the 50 (the test above): a labelled Deployment exists, then `helm upgrade` moves the
    operator to another image reference while admission requests keep coming. Nothing is lost;
    the requests the webhooks refused while the one replica was replaced are counted (printed;
    the high-availability issue brings them to zero)."""
    state_dir, env, apps = installed
    assert _ready_count(env) == N, "needs the 50 Ready resources of the test above"
    entra = AdminClient.from_state_dir(state_dir)
    before = {p["name"]: p["credentials"] for p in entra.call("GET", "state")["principals"]}
    ns, app = "e2e-00", apps[0]
    reader = {
        "apiVersion": "sqlidentity.io/v1alpha1",
        "kind": "SqlWorkloadIdentity",
        "metadata": {"name": "reader", "namespace": ns},
        "spec": {
            "serviceAccountName": "reader",
            "identity": {"applicationClientId": app["appId"]},
            "workloads": {"selector": {"matchLabels": {"app": "reader"}}},
        },
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "reader", "namespace": ns},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "reader"}},
            "template": {
                "metadata": {"labels": {"app": "reader"}},
                "spec": {
                    "serviceAccountName": "reader",
                    "containers": [
                        {
                            "name": "main",
                            "image": "sql-workload-identity-workload:0.1.0",
                            "imagePullPolicy": "Never",
                            "command": ["sleep", "infinity"],
                        }
                    ],
                },
            },
        },
    }
    kubectl(env, "apply", "-f", "-", stdin=json.dumps(reader))
    kubectl(env, "apply", "-f", "-", stdin=json.dumps(deployment))
    wait_for("the reader resource Ready", lambda: _ready_count(env) == N + 1, timeout=300)
    label = "{.spec.template.metadata.labels.azure\\.workload\\.identity/use}"
    assert kubectl(env, "-n", ns, "get", "deploy", "reader", "-o", f"jsonpath={label}") == "true"

    # Admission requests during the upgrade: a resource (the policy webhook, Fail) and a
    # labelled pod (the injection webhook, Fail), both server-side dry runs, every 0.2 s.
    refused: Counter[str] = Counter()
    sent: Counter[str] = Counter()
    unexpected: list[str] = []
    stop = threading.Event()
    probe_swi = {
        **reader,
        "metadata": {"name": "probe", "namespace": ns},
        "spec": {**reader["spec"], "serviceAccountName": "probe"},  # reader's is taken
    }
    probe_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "probe",
            "namespace": ns,
            "labels": {"azure.workload.identity/use": "true"},
        },
        "spec": {
            "serviceAccountName": "reader",
            "containers": [{"name": "main", "image": "sql-workload-identity-workload:0.1.0"}],
        },
    }

    def probe() -> None:
        while not stop.is_set():
            for kind, doc in (("policy", probe_swi), ("injection", probe_pod)):
                proc = subprocess.run(
                    ["kubectl", "apply", "--dry-run=server", "-f", "-"],
                    input=json.dumps(doc), capture_output=True, text=True, env=env, check=False,
                )  # fmt: skip
                sent[kind] += 1
                if proc.returncode != 0:
                    refused[kind] += 1
                    # Only an unreachable webhook may refuse these (the API server's words).
                    if "failed calling webhook" not in proc.stderr:
                        unexpected.append(proc.stderr)
            time.sleep(0.2)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        (old,) = _operator_pods(env)
        # Another reference to the operator's image, as a rebuilt image would be.
        ref = next(r for r in images.image_refs() if r.startswith(f"{install.RELEASE}:"))
        tag = node.ctr(state_dir, "images", "tag", "--force", images.qualified(ref),
                       images.qualified(f"{ref}-upgrade"))  # fmt: skip
        subprocess.run(tag, check=True, capture_output=True)
        subprocess.run(
            [str(helm_binary()), "upgrade", install.RELEASE, str(install.CHART), "-n",
             install.NAMESPACE, "--reuse-values", "--set", f"image.tag={ref.split(':')[1]}-upgrade",
             "--wait", "--timeout", "5m"],
            check=True, capture_output=True, env=env,
        )  # fmt: skip

        def upgraded_alone() -> list[dict[str, Any]] | None:
            pods = _operator_pods(env)
            alone = len(pods) == 1 and pods[0]["metadata"]["name"] != old["metadata"]["name"]
            return pods if alone else None

        (new,) = wait_for("the upgraded operator alone", upgraded_alone, timeout=180)
        assert new["spec"]["containers"][0]["image"].endswith("-upgrade")
        time.sleep(5)  # a few more probes against the new pod
    finally:
        stop.set()
        prober.join(timeout=60)
    print(
        f"\nadmission requests refused during the upgrade: policy {refused['policy']}/"
        f"{sent['policy']}, injection {refused['injection']}/{sent['injection']}"
    )
    # Nothing lost: every resource Ready again, the same credentials, the workload still labelled.
    wait_for("every resource Ready after the upgrade", lambda: _ready_count(env) == N + 1, 300)
    after = {p["name"]: p["credentials"] for p in entra.call("GET", "state")["principals"]}
    for each in apps[1:]:
        assert after[each["name"]] == before[each["name"]], each["name"]
    assert kubectl(env, "-n", ns, "get", "deploy", "reader", "-o", f"jsonpath={label}") == "true"
    assert not unexpected, unexpected[:3]
    # The probes were admitted when a pod served them (before and after the rollout).
    assert sent["policy"] > refused["policy"] and sent["injection"] > refused["injection"]
