"""Faults on a running install (e2e tier, a sandbox of its own), with the chart's two replicas:
the active operator pod is force-deleted in the middle of onboarding 50 resources; the standby
takes over (its failover time is printed), every resource turns Ready, a resource created after
the kill too, and no federated credential or database user is duplicated or left without a
resource. Then `helm upgrade` rolls both pods to another image. Through both, server-side dry runs
probe the two fail-closed webhooks every 0.2 s and none may be refused, and the pods' logs and the
peering object show one writer at a time, never two; the pods' metrics count what each did.
`helm test` passes (and its check fails with the wrong CA), the chart README's upgrade block (CRDs
first) restores an older CRD, and its uninstall block, run last, leaves nothing of the operator's
in Entra, SQL or the cluster."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
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


CHART_README = install.CHART / "README.md"


def chart_readme_block(heading: str) -> str:
    """The first ``sh`` block under a ``## heading`` of the chart's README: what a user runs."""
    text = CHART_README.read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```sh\n", 1)[1].split("\n```", 1)[0]


def run_shell(env: dict[str, str], script: str, timeout: float) -> str:
    """A README block under bash -e from the repository root, with helm and kubectl on PATH."""
    path = f"{helm_binary().parent}:{env.get('PATH', '')}"
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=launcher.REPO_ROOT, capture_output=True,
        text=True, env={**env, "PATH": path}, timeout=timeout, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"{script}\nexit {proc.returncode}: {proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr


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
    except BaseException:  # a timeout or an interrupt: no sandbox left running
        launcher.down(state_dir)
        shutil.rmtree(state_dir, ignore_errors=True)
        raise
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
    selector = f"app.kubernetes.io/name={install.RELEASE}"  # not helm test's pod
    pods = json.loads(
        kubectl(env, "-n", install.NAMESPACE, "get", "pods", "-l", selector, "-o", "json")
    )
    items: list[dict[str, Any]] = pods["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


PEERING = "sql-workload-identity-operator"  # the chart's ClusterKopfPeering
RESUMED = "Resuming operations"  # kopf, when a paused replica becomes the active one
DRAINING = "stopping: no new work"  # the operator, on SIGTERM, before it leaves the peering
# What only a reconciling replica logs: kopf's handler outcomes and our drift check. Not the
# event handlers that only wake the (peering-gated) sweep and policy review: kopf runs those on
# every replica for a moment when two start at once, before each has read the other's peering
# record, and they change nothing.
WRITES = ("Handler '", "drift check of")
WAKE_ONLY = ("Handler 'namespace-labels'", "Handler 'resource-gone'", "Handler 'policy-changed'")


def _writes(text: str) -> bool:
    return any(w in text for w in WRITES) and not any(w in text for w in WAKE_ONLY)


def _peering(env: dict[str, str]) -> dict[str, Any]:
    found = json.loads(kubectl(env, "get", "clusterkopfpeering", PEERING, "-o", "json"))
    status: dict[str, Any] = found.get("status") or {}
    return status


def _live_peers(status: dict[str, Any]) -> dict[str, int]:
    """pod name -> priority of the records kopf counts now (our identity: <pod>/<pid>/<random>)."""
    now = dt.datetime.now(dt.UTC)
    live = {}
    for identity, info in status.items():
        if not isinstance(info, dict) or "lastseen" not in info:
            continue
        seen = dt.datetime.fromisoformat(str(info["lastseen"]))
        if seen + dt.timedelta(seconds=int(info.get("lifetime", 60))) > now:
            live[identity.split("/")[0]] = int(info.get("priority", 0))
    return live


def _active_pod(env: dict[str, str]) -> str | None:
    live = _live_peers(_peering(env))
    return max(live, key=lambda pod: live[pod]) if live else None


def _stamp(text: str) -> float:
    """kubectl logs --timestamps' RFC 3339 (nanoseconds) as Unix seconds."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z", text)
    assert m, text
    whole = dt.datetime.fromisoformat(m.group(1)).replace(tzinfo=dt.UTC).timestamp()
    return whole + float(f"0.{m.group(2) or 0}")


class OperatorLogs:
    """Follows every operator pod's log from the moment it runs (kubectl logs -f --timestamps),
    whatever happens to the pod later."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self.lines: dict[str, list[tuple[float, str]]] = {}
        self._procs: list[subprocess.Popen[str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._discover, daemon=True)

    def __enter__(self) -> OperatorLogs:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for proc in self._procs:
            proc.terminate()

    def _discover(self) -> None:
        while not self._stop.is_set():
            raw = subprocess.run(
                ["kubectl", "-n", install.NAMESPACE, "get", "pods", "-o", "json"],
                capture_output=True, text=True, env=self._env, check=False,
            )  # fmt: skip
            pods = json.loads(raw.stdout)["items"] if raw.returncode == 0 else []
            for pod in pods:
                name = pod["metadata"]["name"]
                if name not in self.lines and pod["status"].get("phase") == "Running":
                    self.lines[name] = []
                    proc = subprocess.Popen(
                        ["kubectl", "-n", install.NAMESPACE, "logs", "-f", "--timestamps", name],
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                        env=self._env,
                    )  # fmt: skip
                    self._procs.append(proc)
                    threading.Thread(target=self._read, args=(name, proc), daemon=True).start()
            time.sleep(0.5)

    def _read(self, pod: str, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            stamp, _, text = line.rstrip("\n").partition(" ")
            self.lines[pod].append((_stamp(stamp), text))

    def first(self, pod: str, needle: str, after: float = 0.0) -> float | None:
        return next(
            (t for t, text in self.lines.get(pod, []) if needle in text and t > after), None
        )

    def transitions(self) -> list[str]:
        """Each change of writer: when, which pod, what it logged (for a failure's message)."""
        events = sorted(
            (t, pod, text)
            for pod, lines in self.lines.items()
            for t, text in lines
            if _writes(text)
        )
        changes, last = [], None
        for t, pod, text in events:
            if pod != last:
                changes.append(f"{t:.3f} {pod}: {text[:120]}")
                last = pod
        return changes

    def writers(self) -> list[str]:
        """The pods in the order they reconciled, consecutive runs merged: a pod listed twice
        wrote again after another one had written, i.e. two writers at once."""
        events = sorted(
            (t, pod) for pod, lines in self.lines.items() for t, text in lines if _writes(text)
        )
        order: list[str] = []
        for _, pod in events:
            if not order or order[-1] != pod:
                order.append(pod)
        return order

    def wrote_before_resuming(self) -> list[str]:
        """Pods that reconciled before kopf let them (a write before their own RESUMED line)."""
        early = []
        for pod, lines in self.lines.items():
            resumed = self.first(pod, RESUMED)
            writes = [t for t, text in lines if _writes(text)]
            if writes and (resumed is None or min(writes) < resumed):
                early.append(pod)
        return early


class PeeringWatch:
    """Samples the peering object every 0.2 s: kopf pauses every replica that shares its priority
    with a live peer, so no sample may show two live records with the same priority."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self.samples = 0
        self.clashes: list[dict[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeeringWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(AssertionError, ValueError):
                live = _live_peers(_peering(self._env))
                self.samples += 1
                if len(set(live.values())) < len(live):
                    self.clashes.append(live)
            time.sleep(0.2)


class AdmissionProbe:
    """Server-side dry runs every 0.2 s of a SqlWorkloadIdentity (the policy webhook, Fail) and
    of a labelled pod (the injection webhook, Fail); counts what was sent and refused."""

    def __init__(self, env: dict[str, str], ns: str, app: dict[str, Any]) -> None:
        self._env = env
        self._docs = {
            "policy": {
                "apiVersion": "sqlidentity.io/v1alpha1",
                "kind": "SqlWorkloadIdentity",
                "metadata": {"name": "probe", "namespace": ns},
                "spec": {
                    "serviceAccountName": "probe",
                    "identity": {"applicationClientId": app["appId"]},
                },
            },
            "injection": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "probe",
                    "namespace": ns,
                    "labels": {"azure.workload.identity/use": "true"},
                },
                "spec": {
                    "serviceAccountName": "probe",
                    "containers": [
                        {"name": "main", "image": "sql-workload-identity-workload:0.1.0"}
                    ],
                },
            },
        }
        self.sent: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> AdmissionProbe:
        # The pod's service account must exist (the API server checks it before the webhooks);
        # a plain one: nothing to inject, the request only has to be answered.
        sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "probe"}}
        ns = self._docs["injection"]["metadata"]["namespace"]
        kubectl(self._env, "-n", ns, "apply", "-f", "-", stdin=json.dumps(sa))
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while not self._stop.is_set():
            for kind, doc in self._docs.items():
                proc = subprocess.run(
                    ["kubectl", "apply", "--dry-run=server", "-f", "-"],
                    input=json.dumps(doc), capture_output=True, text=True, env=self._env,
                    check=False,
                )  # fmt: skip
                self.sent[kind] += 1
                if proc.returncode != 0:
                    self.refused[kind] += 1
                    self.errors.append(f"{kind}: {proc.stderr.strip()}")
            time.sleep(0.2)

    def summary(self) -> str:
        return ", ".join(f"{k} {self.refused[k]}/{self.sent[k]}" for k in ("policy", "injection"))


def test_the_active_operator_pod_killed_while_onboarding_50_resources(
    installed: tuple[Path, dict[str, str], list[dict[str, Any]]],
) -> None:
    state_dir, env, apps = installed
    # Slow Graph down as Azure is (a few hundred ms a call), so the kill lands mid-way.
    entra = AdminClient.from_state_dir(state_dir)
    entra.latency("graph.*", 0.3)
    docs, subjects = _manifests(apps)
    pods = wait_for("the chart's two replicas", lambda: len(_operator_pods(env)) == 2, 120)
    assert pods
    with OperatorLogs(env) as logs, PeeringWatch(env) as peering:
        active = wait_for("a replica reconciling", lambda: _active_pod(env), timeout=120)
        (standby,) = [p["metadata"]["name"] for p in _operator_pods(env)
                      if p["metadata"]["name"] != active]  # fmt: skip
        kubectl(env, "apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
        with AdmissionProbe(env, "e2e-00", apps[0]) as probe:
            started = wait_for("a few resources Ready", lambda: 3 <= _ready_count(env) < N, 300)
            assert started
            killed_at = _ready_count(env)
            killed = time.time()
            kubectl(
                env, "-n", install.NAMESPACE, "delete", "pod", active,
                "--grace-period=0", "--force", "--wait=false",
            )  # fmt: skip
            # The standby takes over; the Deployment starts a third pod, which waits on standby.
            resumed = wait_for(
                "the standby to take over", lambda: logs.first(standby, RESUMED, killed), 120
            )
            after = {
                "apiVersion": "sqlidentity.io/v1alpha1",
                "kind": "SqlWorkloadIdentity",
                "metadata": {"name": "after-kill", "namespace": "e2e-00"},
                "spec": {
                    "serviceAccountName": "after-kill",
                    "identity": {"applicationClientId": apps[0]["appId"]},
                },
            }
            kubectl(env, "apply", "-f", "-", stdin=json.dumps(after))
            subjects[apps[0]["name"]].add("system:serviceaccount:e2e-00:after-kill")
            wait_for(
                "the operator's new pod to run",
                lambda: len([p for p in _operator_pods(env)
                             if p["status"].get("phase") == "Running"]) == 2,
                timeout=180,
            )  # fmt: skip
            wait_for(f"all {N + 1} resources Ready", lambda: _ready_count(env) == N + 1, 600)
            ready = time.time()
        time.sleep(2)  # the last log lines
    print(
        f"\nfailover: the standby resumed {resumed - killed:.1f} s after the active pod was "
        f"force-deleted ({killed_at}/{N} Ready then; all {N + 1} Ready "
        f"{ready - killed:.0f} s after); admission requests refused during the kill: "
        f"{probe.summary()}; peering samples: {peering.samples}"
    )
    print("writers in turn:\n  " + "\n  ".join(logs.transitions()))
    print(f"the killed pod drained: {logs.first(active, DRAINING) is not None}")
    assert killed_at < N, "the kill came after onboarding ended: it tested nothing"
    assert not probe.errors, probe.errors[:3]
    assert probe.sent["policy"] > 10 and probe.sent["injection"] > 10
    # One writer at a time: the killed pod, then the standby, and the new pod not yet.
    assert logs.writers() == [active, standby], (killed, resumed, logs.transitions())
    assert not logs.wrote_before_resuming(), logs.wrote_before_resuming()
    assert not peering.clashes, peering.clashes[:3]
    assert peering.samples > 10

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


def test_the_operator_pods_serve_their_metrics(
    installed: tuple[Path, dict[str, str], list[dict[str, Any]]],
) -> None:
    """The chart's metrics Service and port, and each operator pod's /metrics fetched over the
    pod network through the API server's pod proxy (the sandbox's controller-manager keeps
    EndpointSlices only, which the service proxy does not read): the active replica, which took
    over the onboarding in the test above, counts its reconciles and its Graph requests with
    their statuses, the standby counts none, and the policy webhook's answers to server-side dry
    runs (either replica may serve them) are counted."""
    _, env, apps = installed
    assert _ready_count(env) == N + 1, "needs the Ready resources of the test above"
    docs, _ = _manifests(apps)
    (probe,) = [d for d in docs if d["metadata"]["name"] == "swi-00"]
    probe = {
        **probe,
        "metadata": {**probe["metadata"], "name": "swi-metrics-probe"},
        "spec": {**probe["spec"], "serviceAccountName": "sa-metrics-probe"},
    }
    for _ in range(4):
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
    running = [p["metadata"]["name"] for p in _operator_pods(env)
               if p["status"].get("phase") == "Running"]  # fmt: skip
    assert len(running) == 2, running
    active = _active_pod(env)
    assert active in running, (active, running)
    families: dict[str, dict[str, Any]] = {}
    for pod in running:
        path = f"/api/v1/namespaces/{install.NAMESPACE}/pods/http:{pod}:9090/proxy/metrics"
        text = kubectl(env, "get", "--raw", path)
        families[pod] = {f.name: f.samples for f in text_string_to_metric_families(text)}

    def ready(pod: str) -> float:
        return sum(
            s.value
            for s in families[pod]["swi_reconciles"]
            if s.labels["operation"] == "reconcile" and s.labels["result"] == "ready"
        )

    assert ready(active) > 0, families[active]["swi_reconciles"]
    (standby,) = [pod for pod in running if pod != active]
    assert ready(standby) == 0, families[standby]["swi_reconciles"]
    graph = [s for s in families[active]["swi_cloud_requests"] if s.labels["service"] == "graph"]
    assert sum(s.value for s in graph if s.labels["status"].startswith("2")) > 0, graph
    assert families[active]["swi_reconcile_slots"][0].value > 0
    admitted = [
        s
        for pod in running
        for s in families[pod]["swi_webhook_requests"]
        if s.labels["webhook"] == "validate-sqlworkloadidentity" and s.labels["result"] == "allowed"
    ]
    assert sum(s.value for s in admitted) >= 4, admitted


def test_helm_test_checks_the_running_install(
    installed: tuple[Path, dict[str, str], list[dict[str, Any]]],
) -> None:
    """`helm test` (the chart's install-check pod): the webhook's TLS verified with the CA the
    configurations trust, the policy webhook answering a review, the metrics with the chart's
    version. Then the same check with a CA that did not issue the certificate must fail."""
    _, env, _ = installed
    helm = str(helm_binary())
    proc = subprocess.run(
        [helm, "test", install.RELEASE, "-n", install.NAMESPACE, "--logs", "--timeout", "3m"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for line in ("ok: webhook TLS", "ok: policy webhook", "ok: metrics"):
        assert line in proc.stdout, proc.stdout
    assert "version 0.1.0" in proc.stdout, proc.stdout
    # The pod's check can fail: the same pod with another CA (the sandbox's) in its place.
    pod = json.loads(kubectl(env, "-n", install.NAMESPACE, "get", "pod",
                             f"{install.RELEASE}-install-check", "-o", "json"))  # fmt: skip
    assert pod["status"]["phase"] == "Succeeded", pod["status"]
    spec = pod["spec"]
    spec["volumes"] = [
        {"name": "webhook-ca", "configMap": {"name": install.CA_CONFIGMAP}}
        if v["name"] == "webhook-ca" else v
        for v in spec["volumes"]
    ]  # fmt: skip
    spec.pop("nodeName", None)
    meta = {"name": "install-check-wrong-ca", "namespace": install.NAMESPACE}
    wrong = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}
    kubectl(env, "apply", "-f", "-", stdin=json.dumps(wrong))
    try:
        phase = wait_for("the wrong-CA check to end", lambda: json.loads(kubectl(
            env, "-n", install.NAMESPACE, "get", "pod", "install-check-wrong-ca", "-o", "json",
        ))["status"].get("phase") in ("Succeeded", "Failed") or None, timeout=120)  # fmt: skip
        assert phase
        logs = kubectl(env, "-n", install.NAMESPACE, "logs", "install-check-wrong-ca")
        status = json.loads(kubectl(env, "-n", install.NAMESPACE, "get", "pod",
                                    "install-check-wrong-ca", "-o", "json"))["status"]  # fmt: skip
        assert status["phase"] == "Failed", logs
        assert "FAILED: webhook TLS" in logs and "CERTIFICATE_VERIFY_FAILED" in logs, logs
        assert "ok: metrics" in logs, logs
    finally:
        kubectl(env, "-n", install.NAMESPACE, "delete", "pod", "install-check-wrong-ca",
                "--wait=false")  # fmt: skip


def test_helm_upgrade_to_another_image_refuses_no_admission_and_keeps_everything(
    installed: tuple[Path, dict[str, str], list[dict[str, Any]]],
) -> None:
    """After the test above: a labelled Deployment exists, then `helm upgrade` rolls both replicas
    to another image reference while admission requests keep coming. None is refused, one replica
    reconciles at a time, and nothing is lost."""
    state_dir, env, apps = installed
    assert _ready_count(env) == N + 1, "needs the Ready resources of the test above"
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
    wait_for("the reader resource Ready", lambda: _ready_count(env) == N + 2, timeout=300)
    label = "{.spec.template.metadata.labels.azure\\.workload\\.identity/use}"
    assert kubectl(env, "-n", ns, "get", "deploy", "reader", "-o", f"jsonpath={label}") == "true"

    # An older CRD, as after an earlier chart version: one printer column fewer. Helm would never
    # change it; the README's CRD step must.
    crd_name = "sqlworkloadidentities.sqlidentity.io"
    shipped = yaml.safe_load(
        (install.CHART / "crds" / "sqlidentity.io_sqlworkloadidentities.yaml").read_text()
    )

    def printer_columns() -> list[list[dict[str, Any]]]:
        live = json.loads(kubectl(env, "get", "crd", crd_name, "-o", "json"))
        return [v.get("additionalPrinterColumns", []) for v in live["spec"]["versions"]]

    wanted = [v.get("additionalPrinterColumns", []) for v in shipped["spec"]["versions"]]
    assert printer_columns() == wanted and wanted[0], "the installed CRD is not the shipped one"
    dropped = wanted[0][-1]["name"]
    last = f"/spec/versions/0/additionalPrinterColumns/{len(wanted[0]) - 1}"
    kubectl(env, "patch", "crd", crd_name, "--type=json", "-p",
            json.dumps([{"op": "remove", "path": last}]))  # fmt: skip
    assert printer_columns() != wanted

    # Admission requests during the upgrade: both fail-closed webhooks, every 0.2 s.
    with OperatorLogs(env) as logs, PeeringWatch(env) as peering:
        with AdmissionProbe(env, ns, app) as probe:
            old = {p["metadata"]["name"] for p in _operator_pods(env)}
            assert len(old) == 2, old
            # Another reference to the operator's image, as a rebuilt image would be.
            ref = next(r for r in images.image_refs() if r.startswith(f"{install.RELEASE}:"))
            tag = node.ctr(state_dir, "images", "tag", "--force", images.qualified(ref),
                           images.qualified(f"{ref}-upgrade"))  # fmt: skip
            subprocess.run(tag, check=True, capture_output=True)
            started = time.time()
            # The chart README's upgrade, as written (the CRDs, then helm upgrade), to the new
            # image and waiting for the roll.
            script = chart_readme_block("Upgrading")
            assert "kubectl apply -f charts/sql-workload-identity-operator/crds/" in script
            tag = f"{ref.split(':')[1]}-upgrade"
            run_shell(env, f"{script} --set image.tag={tag} --wait --timeout 5m", timeout=400)

            def upgraded_alone() -> list[dict[str, Any]] | None:
                pods = _operator_pods(env)
                names = {p["metadata"]["name"] for p in pods}
                return pods if len(pods) == 2 and not names & old else None

            new = wait_for("the two upgraded replicas alone", upgraded_alone, timeout=180)
            rolled = time.time()
            assert all(p["spec"]["containers"][0]["image"].endswith("-upgrade") for p in new)
            wait_for("an upgraded replica reconciling", lambda: _active_pod(env) in {
                p["metadata"]["name"] for p in new}, timeout=120)  # fmt: skip
            time.sleep(5)  # a few more probes against the new pods
        time.sleep(2)  # the last log lines
    print(
        f"\nadmission requests refused during the upgrade ({rolled - started:.0f} s): "
        f"{probe.summary()}; writers in turn: {logs.writers()}"
    )
    assert not probe.errors, probe.errors[:3]
    assert probe.sent["policy"] > 10 and probe.sent["injection"] > 10
    writers = logs.writers()
    assert len(writers) == len(set(writers)), logs.transitions()
    assert not logs.wrote_before_resuming(), logs.wrote_before_resuming()
    assert not peering.clashes, peering.clashes[:3]
    # Each replaced pod was stopped by SIGTERM and drained before it left the peering.
    assert all(logs.first(pod, DRAINING) is not None for pod in old), {
        pod: logs.lines.get(pod, [])[-3:] for pod in old
    }
    # Nothing lost: every resource Ready again, the same credentials, the workload still labelled.
    wait_for("every resource Ready after the upgrade", lambda: _ready_count(env) == N + 2, 300)
    after = {p["name"]: p["credentials"] for p in entra.call("GET", "state")["principals"]}
    for each in apps[1:]:
        assert after[each["name"]] == before[each["name"]], each["name"]
    assert kubectl(env, "-n", ns, "get", "deploy", "reader", "-o", f"jsonpath={label}") == "true"
    # The README's CRD step brought the shipped CRD back, the dropped column included.
    assert printer_columns() == wanted, f"the CRD step did not restore {dropped!r}"


def test_the_documented_uninstall_leaves_nothing_behind(
    installed: tuple[Path, dict[str, str], list[dict[str, Any]]],
) -> None:
    """Last: the chart README's uninstall, as written. The resources go first while the operator
    cleans up (credentials and database users removed), then the chart, then the CRDs: nothing
    hangs on a finalizer, no fail-closed webhook configuration is left pointing at a missing
    Service, and no credential or user the operator made is left in Entra or SQL."""
    state_dir, env, apps = installed
    entra = AdminClient.from_state_dir(state_dir)
    admin_url = launcher.environment(state_dir)["SWI_AZURESQL_ADMIN_URL"]
    names = {app["name"] for app in apps}

    def ours() -> tuple[list[str], list[str]]:
        credentials = [
            c["subject"]
            for p in entra.call("GET", "state")["principals"] if p["name"] in names
            for c in p["credentials"] if c["subject"].startswith("system:serviceaccount:e2e-")
        ]  # fmt: skip
        (server,) = requests.get(f"{admin_url}/servers", timeout=10).json()
        users = [u["name"] for u in server["databases"]["mydb"] if u["name"] in names]
        return credentials, users

    credentials, users = ours()
    assert len(credentials) > N and sorted(users) == sorted(names), (credentials, users)
    script = chart_readme_block("Uninstalling")
    assert script.index("delete sqlworkloadidentities") < script.index("helm uninstall")
    started = time.time()
    output = run_shell(env, script, timeout=900)
    print(f"\nuninstalled in {time.time() - started:.0f} s:\n{output}")
    assert ours() == ([], []), "the operator's credentials or database users outlived it"
    crds = kubectl(env, "get", "crd", "-o", "name")
    assert "sqlidentity.io" not in crds and "clusterkopfpeerings" not in crds, crds
    hooks = kubectl(env, "get", "mutatingwebhookconfigurations,validatingwebhookconfigurations",
                    "-o", "name")  # fmt: skip
    assert install.RELEASE not in hooks, hooks
    left = kubectl(env, "-n", install.NAMESPACE, "get", "deploy,svc,pdb,pods", "-o", "name")
    assert install.RELEASE not in left.replace("install-check", ""), left
    assert "not found" in subprocess.run(
        [str(helm_binary()), "status", install.RELEASE, "-n", install.NAMESPACE],
        capture_output=True, text=True, env=env, check=False,
    ).stderr  # fmt: skip
