"""What the fleet benchmarks share: the bench world, Azure's limits, the sandbox, the operator as a
process, and the meters read around each measurement.

* ``write_world``: sandbox/world.yaml plus enough app registrations (owned by the operator's app)
  and user-assigned managed identities (the operator may write their credentials) for 1000
  resources at under 20 federated credentials each; the launcher passes it to the emulators
  through ``SWI_SANDBOX_WORLD``.
* ``CloudProfile``: the latency and quotas of shared/docs/scale.md, applied to the Entra emulator
  (its latency, rate-limit and write-delay controls), and the lower bound they allow.
* ``Sandbox``: the real sandbox (control plane, Entra, proxy, Azure SQL) in a state directory,
  with an admin Kubernetes client, the CRD, namespaces and the workloads teams already run.
* ``OperatorProcess``: ``python -m swi_operator`` against it, with its CPU time and resident
  memory read from /proc.
* ``ReadyTracker``: one watch on the SqlWorkloadIdentities; when each became Ready at its
  current generation (nothing polls the API server while a measurement runs).
* ``Meters``: Entra's per-route request counts, the SQL emulator's query log and the API server's
  ``apiserver_request_total``, as deltas over a window.

Every number a benchmark prints is measured here, on this machine, in the same run as the number
it is compared with.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sandbox import launcher
from sandbox.entra.ctl import AdminClient

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"

GROUP, VERSION, PLURAL = "sqlidentity.io", "v1alpha1", "sqlworkloadidentities"
POLICIES = "sqlidentitypolicies"
CRDS = REPO / "crds"
AUDIENCE = "api://AzureADTokenExchange"
USE_LABEL = "azure.workload.identity/use"
CLIENT_ID_ANNOTATION = "azure.workload.identity/client-id"
TENANT_ID_ANNOTATION = "azure.workload.identity/tenant-id"
PHASE_LABEL = "bench.sqlidentity.io/phase"
FLEET_LABEL = "bench.sqlidentity.io/fleet"  # on the bench's namespaces; its policies select it

NAMESPACES = 50
SQL_DATABASE = "mydb"  # the sandbox world's database
SQL_ROLES = ("db_datareader",)
SQL_SCOPE = "https://database.windows.net/.default"
BENCH_APPS = 80
BENCH_IDENTITIES = 80
PER_IDENTITY = 14  # resources per identity: room under Entra's 20 for churn's moves

Kind = Literal["app", "mi"]
IdentityKind = Literal["app", "mi", "pool"]


# --- the bench world ---------------------------------------------------------------------------


def _guid(*parts: object) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "swi-bench/" + "/".join(map(str, parts))))


@dataclass(frozen=True)
class Identity:
    kind: IdentityKind
    name: str
    client_id: str  # "" for a pool
    ref: str  # the application's object id, the managed identity's resource id, the pool's name

    def spec(self) -> dict[str, str]:
        """``spec.identity`` of a SqlWorkloadIdentity bound to it."""
        if self.kind == "app":
            return {"applicationClientId": self.client_id}
        if self.kind == "pool":
            return {"poolName": self.ref}
        return {"managedIdentityResourceId": self.ref}

    @classmethod
    def pool(cls, name: str) -> Identity:
        """A SqlIdentityPool, named by resources and policies as one identity is."""
        return cls("pool", name, "", name)


@dataclass(frozen=True)
class BenchWorld:
    path: Path
    tenant: str
    subscription: str
    operator_client_id: str
    operator_secret: str
    admin_client_id: str
    admin_secret: str
    apps: tuple[Identity, ...]
    identities: tuple[Identity, ...]

    def pool(self, kind: Kind) -> tuple[Identity, ...]:
        return self.apps if kind == "app" else self.identities


def write_world(
    path: Path, apps: int = BENCH_APPS, identities: int = BENCH_IDENTITIES
) -> BenchWorld:
    """sandbox/world.yaml plus ``apps`` apps the operator owns and ``identities`` managed
    identities it may write."""
    world = yaml.safe_load(launcher.WORLD_FILE.read_text())
    entra = world["entra"]
    by_name = {a["name"]: a for a in entra["applications"]}
    operator, admin = by_name["sql-workload-identity-operator"], by_name["sandbox-admin"]
    tenant, subscription = operator["tenant"], entra["subscription"]
    bench_apps, bench_identities = [], []
    for i in range(apps):
        entry = {
            "name": f"bench-app-{i:03d}",
            "tenant": tenant,
            "appId": _guid("app", i, "appId"),
            "objectId": _guid("app", i, "objectId"),
            "servicePrincipalObjectId": _guid("app", i, "sp"),
            "owners": ["sql-workload-identity-operator"],
        }
        entra["applications"].append(entry)
        bench_apps.append(Identity("app", entry["name"], entry["appId"], entry["objectId"]))
    for i in range(identities):
        entry = {
            "name": f"bench-identity-{i:03d}",
            "resourceGroup": "bench-rg",
            "tenant": tenant,
            "clientId": _guid("mi", i, "clientId"),
            "principalId": _guid("mi", i, "principalId"),
            "writers": ["sql-workload-identity-operator", "sandbox-admin"],
        }
        entra["managedIdentities"].append(entry)
        resource_id = (
            f"/subscriptions/{subscription}/resourceGroups/bench-rg/providers/"
            f"Microsoft.ManagedIdentity/userAssignedIdentities/{entry['name']}"
        )
        bench_identities.append(Identity("mi", entry["name"], entry["clientId"], resource_id))
    path.write_text(
        "# Generated by bench/harness.py: sandbox/world.yaml plus the benchmarks' identities.\n"
        + yaml.safe_dump(world, sort_keys=False)
    )
    return BenchWorld(
        path,
        tenant,
        subscription,
        operator["appId"],
        operator["secrets"][0],
        admin["appId"],
        admin["secrets"][0],
        tuple(bench_apps),
        tuple(bench_identities),
    )


# --- the fleet: who is who --------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One team's onboarding: a namespace, a service account, its Deployment, an identity."""

    index: int
    namespace: str
    name: str  # of the SqlWorkloadIdentity
    service_account: str
    deployment: str
    identity: Identity


def identity_count(n: int) -> int:
    """Identities used for ``n`` resources: at most ``PER_IDENTITY`` each, an even number."""
    count = max(2, math.ceil(n / PER_IDENTITY))
    return count + count % 2


def fleet(prefix: str, n: int, pool: Sequence[Identity]) -> list[Member]:
    """``n`` members over ``NAMESPACES`` namespaces; members 2m and 2m+1 sit on a pair of
    identities (2j, 2j+1), so that churn can swap a couple without moving the per-identity count."""
    used = identity_count(n)
    if used > len(pool):
        raise SystemExit(f"{n} resources need {used} identities; the bench world has {len(pool)}")
    members = []
    for i in range(n):
        pair = (i // 2) % (used // 2)
        members.append(
            Member(
                index=i,
                namespace=f"{prefix}-{i % NAMESPACES:02d}",
                name=f"swi-{i:04d}",
                service_account=f"sa-{i:04d}",
                deployment=f"app-{i:04d}",
                identity=pool[2 * pair + i % 2],
            )
        )
    return members


def namespaces_of(members: Iterable[Member]) -> list[str]:
    return sorted({m.namespace for m in members})


# --- Azure's limits -----------------------------------------------------------------------------

# Graph's write quota counts every write of the calling app: credentials' create, update and
# delete, and the applications and service principals a growing pool creates.
GRAPH_WRITES = "graph.*.[cud][rpe][edl]*"
ARM_WRITES_SUBSCRIPTION = "arm.fic.[pd]*"  # put, delete: one bucket for the subscription
ARM_WRITES_IDENTITY = "arm.fic.[dp][eu]*"  # the same routes, one bucket per identity


@dataclass(frozen=True)
class CloudProfile:
    """Latency and quotas injected into the Entra emulator (shared/docs/scale.md)."""

    graph_latency: float = 0.1
    arm_latency: float = 0.1
    token_latency: float = 0.05
    arm_write_seconds: float = 0.2  # a credential write holds its identity (overlap -> 409)
    graph_write_rate: float = 20.0  # per calling app and tenant: ~3000 per 2.5 min
    graph_write_burst: float = 20.0
    arm_subscription_write_rate: float = 2.0
    arm_subscription_write_burst: float = 2.0
    arm_identity_write_rate: float = 0.25
    arm_identity_write_burst: float = 1.0
    latency_jitter: float = 0.0  # plus a uniform 0..jitter s on every Graph, ARM and token call
    graph_read_lag: float = 0.0  # Graph reads miss a write for this long (replica lag)

    @classmethod
    def none(cls) -> CloudProfile:
        """No latency, no quotas: for setting a fleet up quickly and for smoke tests."""
        return cls(0, 0, 0, 0, 0, 1, 0, 1, 0, 1)

    def apply(self, admin: AdminClient) -> None:
        admin.reset(state=False)
        admin.latency("graph.*", self.graph_latency, self.latency_jitter)
        admin.latency("arm.*", self.arm_latency, self.latency_jitter)
        admin.latency("login.token", self.token_latency, self.latency_jitter)
        admin.controls(
            armWriteSeconds=self.arm_write_seconds, graphReadLagSeconds=self.graph_read_lag
        )
        admin.rate_limit(
            GRAPH_WRITES, self.graph_write_rate, self.graph_write_burst, per_target=False
        )
        # ARM counts a write against the subscription before the identity's own quota.
        admin.rate_limit(
            ARM_WRITES_SUBSCRIPTION,
            self.arm_subscription_write_rate,
            self.arm_subscription_write_burst,
            per_target=False,
        )
        admin.rate_limit(
            ARM_WRITES_IDENTITY, self.arm_identity_write_rate, self.arm_identity_write_burst
        )

    def describe(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, int | float)}

    def lower_bound(self, kind: Kind, writes_per_identity: Sequence[int]) -> float:
        """The shortest time in which these credential writes can all be done.

        One token, one write's latency, and the slowest quota: Graph's writes per app and tenant,
        or ARM's writes per subscription, per identity, and one write at a time per identity.
        Reads and Kubernetes calls are free here: the bound is what Azure allows, not what a
        client can reach.
        """
        writes = sum(writes_per_identity)
        if writes == 0:
            return 0.0

        def drain(count: float, rate: float, burst: float) -> float:
            return max(0.0, count - burst) / rate if rate > 0 else 0.0

        if kind == "app":
            quota = drain(writes, self.graph_write_rate, self.graph_write_burst)
            return self.token_latency + self.graph_latency + quota
        busiest = max(writes_per_identity)
        quota = max(
            drain(writes, self.arm_subscription_write_rate, self.arm_subscription_write_burst),
            drain(busiest, self.arm_identity_write_rate, self.arm_identity_write_burst),
            (busiest - 1) * self.arm_write_seconds,
        )
        return self.token_latency + self.arm_latency + self.arm_write_seconds + quota


# --- the sandbox -------------------------------------------------------------------------------


class Sandbox:
    """The sandbox with the bench world, and an admin view of its cluster."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self.own = state_dir is None
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="swi-bench-"))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.world = write_world(self.state_dir / "bench-world.yaml")
        self.env: dict[str, str] = {}
        self.kube: Any = None

    def __enter__(self) -> Sandbox:
        from kubernetes import config as kube_config

        # `timeout`, `kill`: unwind, so that the operator is stopped and a phase retired.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        os.environ[launcher.WORLD_ENV] = str(self.world.path)
        try:
            launcher.up(self.state_dir)
        except launcher.SandboxError as exc:
            raise SystemExit(f"error: the sandbox did not start: {exc}") from exc
        self.env = launcher.environment(self.state_dir)
        os.environ.update(self.env)
        self.kube = kube_config.new_client_from_config(self.env["KUBECONFIG"])  # type: ignore[no-untyped-call]
        self.kube.configuration.connection_pool_maxsize = 16
        self.kube.rest_client.pool_manager.connection_pool_kw["maxsize"] = 16
        self.admin = AdminClient.from_state_dir(self.state_dir)
        self._install_crd()
        self.retire()  # what an interrupted run left behind
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if self.kube is not None:
            self.kube.close()
        if self.own:
            launcher.down(self.state_dir)
            # A sandbox's state is a cluster's worth of files (about 1.7 GB): removed after a
            # run, kept with its logs after a failure.
            if exc_type is None:
                shutil.rmtree(self.state_dir, ignore_errors=True)
            else:
                print(f"the sandbox's state and logs are kept in {self.state_dir}", file=sys.stderr)

    @property
    def ca(self) -> Path:
        return self.state_dir / "ca.crt"

    @property
    def kubectl(self) -> str:
        return str(launcher.controlplane_bin_dir() / "kubectl")

    def _install_crd(self) -> None:
        for args in (
            ["apply", "-k", str(CRDS)],
            ["wait", "--for=condition=Established", "--timeout=60s", "crd", "--all"],
        ):
            subprocess.run(
                [self.kubectl, *args],
                check=True,
                capture_output=True,
                env={**os.environ, **self.env},
            )

    # -- Kubernetes, as the admin -------------------------------------------------------------
    def api(self, name: str) -> Any:
        from kubernetes import client

        return getattr(client, name)(self.kube)

    def prepare(self, members: Sequence[Member], phase: str) -> None:
        """Namespaces and one Deployment per member (replicas 0: the pods are not the point),
        running as its service account: what teams have before they onboard."""
        core, apps = self.api("CoreV1Api"), self.api("AppsV1Api")
        for ns in namespaces_of(members):
            body = {"metadata": {"name": ns, "labels": {PHASE_LABEL: phase, FLEET_LABEL: "true"}}}
            with contextlib.suppress(Exception):
                core.create_namespace(body)
        self.authorize({m.identity for m in members})

        def deployment(m: Member) -> None:
            labels = {"app": m.deployment}
            body = {
                "metadata": {"name": m.deployment, "labels": {PHASE_LABEL: phase}},
                "spec": {
                    "replicas": 0,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "serviceAccountName": m.service_account,
                            "containers": [{"name": "app", "image": "example.invalid/app:1"}],
                        },
                    },
                },
            }
            apps.create_namespaced_deployment(m.namespace, body)

        parallel(deployment, members)

    def authorize(self, identities: Iterable[Identity]) -> None:
        """The platform team's SqlIdentityPolicy for each identity: the bench's namespaces may
        bind it, with read access to the sandbox's database."""
        from kubernetes.client.exceptions import ApiException

        custom = self.api("CustomObjectsApi")

        def policy(identity: Identity) -> None:
            name = f"bench-{identity.name}"
            body: dict[str, Any] = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "SqlIdentityPolicy",
                "metadata": {"name": name},
                "spec": {
                    "identity": identity.spec(),
                    "namespaces": {"selector": {"matchLabels": {FLEET_LABEL: "true"}}},
                    "sql": {
                        "servers": [self.sql_server],
                        "databases": [SQL_DATABASE],
                        "roles": list(SQL_ROLES),
                    },
                },
            }
            try:
                custom.create_cluster_custom_object(GROUP, VERSION, POLICIES, body)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                custom.patch_cluster_custom_object(
                    GROUP, VERSION, POLICIES, name, {"spec": body["spec"]}
                )

        parallel(policy, identities)

    def reset(self) -> None:
        """Back to the world's seed: no federated credentials (the Entra emulator), no contained
        users of the bench's identities (dropped as the server's Entra admin, the operator's
        app), no injected latency or quota."""
        import struct

        import pyodbc
        from azure.identity import ClientSecretCredential

        self.admin.reset(state=True)
        world = self.world
        credential = ClientSecretCredential(
            world.tenant,
            world.operator_client_id,
            world.operator_secret,
            authority=self.env["AZURE_AUTHORITY_HOST"],
            disable_instance_discovery=True,
            connection_verify=str(self.ca),
        )
        token = credential.get_token(SQL_SCOPE).token.encode("UTF-16-LE")
        credential.close()
        connection = pyodbc.connect(
            f"DRIVER={{ODBC Driver 18 for SQL Server}};SERVER={self.sql_server};"
            f"DATABASE={SQL_DATABASE};Encrypt=yes;TrustServerCertificate=no",
            attrs_before={1256: struct.pack(f"<I{len(token)}s", len(token), token)},
            autocommit=True,
        )
        try:
            cursor = connection.cursor()
            for identity in (*world.apps, *world.identities):
                cursor.execute(f"DROP USER IF EXISTS [{identity.name}]")
        finally:
            connection.close()

    @property
    def sql_server(self) -> str:
        return self.env["AZ_SERVER"]  # tcp:localhost,PORT: the SQL emulator

    def resource(self, m: Member, phase: str, sql: bool) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "serviceAccountName": m.service_account,
            "identity": m.identity.spec(),
        }
        if sql:
            spec["sql"] = {
                "server": self.sql_server,
                "database": SQL_DATABASE,
                "roles": list(SQL_ROLES),
            }
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "SqlWorkloadIdentity",
            "metadata": {"name": m.name, "namespace": m.namespace, "labels": {PHASE_LABEL: phase}},
            "spec": spec,
        }

    def apply(self, members: Sequence[Member], phase: str, sql: bool) -> None:
        custom = self.api("CustomObjectsApi")
        parallel(
            lambda m: custom.create_namespaced_custom_object(
                GROUP, VERSION, m.namespace, PLURAL, self.resource(m, phase, sql)
            ),
            members,
        )

    def retire(self, phase: str | None = None) -> None:
        """Remove a phase's resources (every phase's by default) without the operator:
        finalizers dropped, nothing in the cloud touched. The next phase starts from an empty
        fleet, also after a run that was interrupted."""
        custom = self.api("CustomObjectsApi")
        selector = f"{PHASE_LABEL}={phase}" if phase else PHASE_LABEL
        items = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, label_selector=selector)[
            "items"
        ]

        def drop(item: dict[str, Any]) -> None:
            meta = item["metadata"]
            custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                meta["namespace"],
                PLURAL,
                meta["name"],
                {"metadata": {"finalizers": None}},
            )
            with contextlib.suppress(Exception):
                custom.delete_namespaced_custom_object(
                    GROUP, VERSION, meta["namespace"], PLURAL, meta["name"]
                )

        parallel(drop, items)

    def operator_env(self, drift_interval: float, **extra: str) -> dict[str, str]:
        w = self.world
        return {
            **os.environ,
            **self.env,  # this cluster's (a second cluster's KUBECONFIG is not in os.environ)
            "AZURE_TENANT_ID": w.tenant,
            "AZURE_CLIENT_ID": w.operator_client_id,
            "AZURE_CLIENT_SECRET": w.operator_secret,
            "AZURE_AUTHORITY_HOST": self.env["AZURE_AUTHORITY_HOST"],
            "SWI_GRAPH_URL": self.env["SANDBOX_GRAPH_URL"],
            "SWI_ARM_URL": self.env["SANDBOX_ARM_URL"],
            "AZURE_SUBSCRIPTION_ID": w.subscription,
            "SWI_CA_BUNDLE": str(self.ca),
            "SWI_DRIFT_INTERVAL": f"{drift_interval:g}",
            "SWI_POSTING_LEVEL": "INFO",
            **extra,
        }


class SecondCluster(Sandbox):
    """Another cluster on the first one's cloud: its own control plane and issuer (``launcher
    attach``), the same Entra and SQL emulators and bench world. Meters stay the first one's."""

    def __init__(self, first: Sandbox) -> None:
        self.own = True
        self.first = first
        self.state_dir = first.state_dir / "second-cluster"
        self.world = first.world
        self.env = {}
        self.kube = None

    def __enter__(self) -> SecondCluster:
        from kubernetes import config as kube_config

        try:
            launcher.attach(self.state_dir, self.first.state_dir)
            launcher.up(self.state_dir)
        except launcher.SandboxError as exc:
            launcher.down(self.state_dir)
            raise SystemExit(f"error: the second cluster did not start: {exc}") from exc
        self.env = launcher.environment(self.state_dir)
        self.kube = kube_config.new_client_from_config(self.env["KUBECONFIG"])  # type: ignore[no-untyped-call]
        self.kube.configuration.connection_pool_maxsize = 16
        self.kube.rest_client.pool_manager.connection_pool_kw["maxsize"] = 16
        self.admin = self.first.admin
        self._install_crd()
        self.retire()
        return self

    def controlplane_cpu_seconds(self) -> float:
        running = launcher.inspect(self.state_dir, launcher.CONTROLPLANE)
        return proc_cpu_seconds(running.pid) if running.alive and running.pid else 0.0


def parallel(function: Callable[[Any], Any], items: Iterable[Any], workers: int = 12) -> None:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(function, item) for item in items]:
            future.result()


# --- the operator as a process -----------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime + stime


def proc_memory_mib(pid: int) -> dict[str, float]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return {"rss": values.get("VmRSS", math.nan), "peak": values.get("VmHWM", math.nan)}


class OperatorProcess:
    """``python -m swi_operator`` against the sandbox; its log goes to ``log_path``."""

    def __init__(self, env: dict[str, str], log_path: Path, profile: Path | None = None) -> None:
        self.env = env
        self.log_path = log_path
        self.profile = profile  # write a cProfile of the whole run there
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> OperatorProcess:
        profiling = ["-m", "cProfile", "-o", str(self.profile)] if self.profile else []
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, *profiling, "-m", "swi_operator"],
                stdout=subprocess.PIPE,
                stderr=log,
                env=self.env,
                cwd=REPO,
            )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode()
        if not line.startswith("READY"):
            self.stop()
            raise SystemExit(f"error: the operator did not start; see {self.log_path}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def memory_mib(self) -> dict[str, float]:
        return proc_memory_mib(self.pid)

    def drift_checks(self) -> int:
        """Drift cycles the operator has finished (it logs one line for each)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return len(re.findall(r"drift check of \d+ resources done", text))

    def resumed(self) -> int:
        """Resources kopf has resumed since the operator started (a line each)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text.count("Handler 'reconcile-resume' succeeded")

    def sweeps(self) -> int:
        """Sweeps the operator has finished (it logs one line for each)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return len(re.findall(r"sweep done in ", text))

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Profiler:
    """py-spy sampling a running process (the operator) into a flame graph SVG.

    Sampling is non-blocking (the process is never paused) and counts only the thread holding
    the GIL (Python's CPU: waits in I/O and for the GIL are not drawn, which py-spy's own idle
    detection let through here), at ``rate`` samples a second; the SVG is py-spy's own (inferno)
    flame graph, which is what docs/benchmarks.md shows. ``profile_top`` reads its frames back.
    """

    def __init__(self, pid: int, svg: Path, rate: int = 50) -> None:
        spy = Path(sys.executable).with_name("py-spy")
        if not spy.exists():
            raise SystemExit(f"error: --profile needs py-spy ({spy}); run `make venv`")
        self.svg = svg
        self.process = subprocess.Popen(
            [
                str(spy),
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(rate),
                "--nonblocking",
                "--gil",
                "--function",
                "--format",
                "flamegraph",
                "--output",
                str(svg),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> Path:
        """Stop sampling and write the SVG; its path."""
        self.process.send_signal(signal.SIGINT)
        try:
            _, err = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise SystemExit("error: py-spy did not write its flame graph within 60 s") from None
        if not self.svg.exists():
            raise SystemExit(f"error: py-spy wrote no flame graph: {err.decode(errors='replace')}")
        return self.svg


_FRAME = re.compile(
    r"<title>(?P<name>.*?) \((?P<samples>[\d,]+) samples?, (?P<pct>[\d.]+)%\)</title>"
)


def profile_top(svg: Path, limit: int = 40) -> list[dict[str, Any]]:
    """Each function's inclusive share of the samples in a py-spy flame graph, largest first:
    the sum of its boxes (a recursive function's nested boxes count again; capped at 100%)."""
    import html

    totals: Counter[str] = Counter()
    for match in _FRAME.finditer(svg.read_text(errors="replace")):
        name = html.unescape(match["name"])
        totals[name] += int(match["samples"].replace(",", ""))
    root = totals.pop("all", None) or max(totals.values(), default=1)
    return [
        {"frame": name, "samples": n, "share": round(min(n, root) / root, 4)}
        for name, n in totals.most_common(limit)
    ]


# --- when resources become Ready ---------------------------------------------------------------


def _ready(obj: dict[str, Any]) -> bool:
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    if status.get("observedGeneration") != meta.get("generation"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def ready_reason(obj: dict[str, Any]) -> str:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            return f"{c.get('status')}/{c.get('reason')}"
    return "no status"


class ReadyTracker:
    """Watches a phase's resources; records when each (namespace, name, generation) was first
    seen Ready with that generation observed, and the last state of each."""

    def __init__(self, sandbox: Sandbox, phase: str) -> None:
        self._custom = sandbox.api("CustomObjectsApi")
        self._selector = f"{PHASE_LABEL}={phase}"
        self._lock = threading.Condition()
        self.ready_at: dict[tuple[str, str, int], float] = {}
        self.last: dict[tuple[str, str], dict[str, Any]] = {}
        self.events = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="ready-tracker")

    def __enter__(self) -> ReadyTracker:
        listed = self._custom.list_cluster_custom_object(
            GROUP, VERSION, PLURAL, label_selector=self._selector
        )
        for obj in listed["items"]:
            self._see(obj)
        self._version = listed["metadata"]["resourceVersion"]
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    def _see(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        with self._lock:
            self.events += 1
            self.last[key] = obj
            if _ready(obj):
                self.ready_at.setdefault((*key, int(meta["generation"])), time.monotonic())
            self._lock.notify_all()

    def _run(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            stream = watch.Watch()  # type: ignore[no-untyped-call]
            try:
                for event in stream.stream(  # type: ignore[no-untyped-call]
                    self._custom.list_cluster_custom_object,
                    GROUP,
                    VERSION,
                    PLURAL,
                    label_selector=self._selector,
                    resource_version=self._version,
                    timeout_seconds=30,
                    allow_watch_bookmarks=True,
                ):
                    obj = event["object"]
                    self._version = obj["metadata"]["resourceVersion"]
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._see(obj)
                    if self._stop.is_set():
                        break
            except Exception:  # a dropped watch: resume from the last version seen
                time.sleep(0.2)

    def wait(
        self, keys: Iterable[tuple[str, str, int]], timeout: float, stall: float = 180.0
    ) -> float | None:
        """Block until every key is Ready; the monotonic time the last one was, or None after
        ``timeout``, or after ``stall`` seconds in which none became Ready."""
        wanted = set(keys)
        deadline = time.monotonic() + timeout
        with self._lock:
            progress, last_change = -1, time.monotonic()
            while True:
                missing = wanted - self.ready_at.keys()
                if not missing:
                    return max((self.ready_at[k] for k in wanted), default=time.monotonic())
                now = time.monotonic()
                if len(missing) != progress:
                    progress, last_change = len(missing), now
                if now > deadline or now - last_change > stall:
                    return None
                self._lock.wait(1.0)

    def not_ready(self, keys: Iterable[tuple[str, str, int]]) -> Counter[str]:
        """Why the keys still missing are not Ready, counted by Ready's status/reason."""
        with self._lock:
            return Counter(
                ready_reason(self.last.get(k[:2], {})) for k in keys if k not in self.ready_at
            )


# --- meters ------------------------------------------------------------------------------------

_METRIC = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')
_SQL_WRITES = ("CREATE", "ALTER", "DROP", "GRANT", "REVOKE", "INSERT", "UPDATE", "DELETE")
WRITE_VERBS = frozenset({"POST", "PUT", "PATCH", "DELETE", "APPLY", "DELETECOLLECTION"})


class SqlLog:
    """Counts the SQL emulator's query log (which keeps only its last entries) by following it:
    (who, kind), who being ``operator`` (its own session) or ``identity`` (a probe's login as the
    federated identity), kind ``login``, ``read`` or ``write``."""

    def __init__(self, admin_url: str, operator_user: str) -> None:
        self._url = admin_url.rstrip("/")
        self._operator = operator_user
        self.counts: Counter[tuple[str, str]] = Counter()
        self._since = time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="sql-log")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            with contextlib.suppress(Exception):
                self.poll()

    def poll(self) -> None:
        import urllib.request

        with urllib.request.urlopen(f"{self._url}/log?since={self._since}", timeout=30) as r:  # noqa: S310
            entries = json.loads(r.read())
        with self._lock:
            for entry in entries:
                self._since = max(self._since, float(entry["ts"]))
                # The server's Entra admin (the operator) is dbo in the database.
                user = entry.get("user")
                who = "operator" if user in ("dbo", self._operator) else "identity"
                kind = entry.get("kind", "")
                if kind != "login":
                    text = str(entry.get("text") or "").lstrip().upper()
                    kind = "write" if text.startswith(_SQL_WRITES) else "read"
                self.counts[(who, kind)] += 1

    def snapshot(self) -> Counter[tuple[str, str]]:
        with contextlib.suppress(Exception):
            self.poll()
        with self._lock:
            return Counter(self.counts)

    def close(self) -> None:
        self._stop.set()


@dataclass
class Reading:
    at: float
    entra: Counter[str]
    apiserver: Counter[tuple[str, str]]  # (verb, resource) -> requests
    sql: Counter[tuple[str, str]]
    cpu: dict[str, float]  # component -> CPU seconds


@dataclass
class Delta:
    seconds: float
    entra: Counter[str] = field(default_factory=Counter)
    apiserver: Counter[tuple[str, str]] = field(default_factory=Counter)
    sql: Counter[tuple[str, str]] = field(default_factory=Counter)
    cpu: dict[str, float] = field(default_factory=dict)

    def api_total(self, writes: bool | None = None) -> int:
        return sum(
            n
            for (verb, _), n in self.apiserver.items()
            if writes is None or (verb in WRITE_VERBS) == writes
        )

    def minus(self, control: Delta) -> Delta:
        """This window less a control window's API requests, scaled to this window's length."""
        scale = self.seconds / control.seconds if control.seconds else 0.0
        api = Counter(
            {
                k: max(0, round(v - control.apiserver.get(k, 0) * scale))
                for k, v in self.apiserver.items()
            }
        )
        return Delta(self.seconds, Counter(self.entra), api, Counter(self.sql), dict(self.cpu))


class Meters:
    """Readings of every counter the benchmarks report, and their differences."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sandbox = sandbox
        info = json.loads((sandbox.state_dir / "azuresql.json").read_text())
        self.sql_log = SqlLog(str(info["admin_url"]), "sql-workload-identity-operator")
        self.processes: dict[str, int] = {}
        for comp in launcher.ALL_COMPONENTS:
            running = launcher.inspect(sandbox.state_dir, comp)
            if running.alive and running.pid is not None:
                self.processes[comp.name] = running.pid

    def close(self) -> None:
        self.sql_log.close()

    def _apiserver(self) -> Counter[tuple[str, str]]:
        api = self._sandbox.kube
        response = api.call_api(
            *api.param_serialize(
                method="GET", resource_path="/metrics", auth_settings=["BearerToken"]
            ),
            _request_timeout=30,
        )
        response.read()
        counts: Counter[tuple[str, str]] = Counter()
        for line in response.data.decode().splitlines():
            matched = _METRIC.match(line)
            if matched:
                labels = dict(_LABEL.findall(matched["labels"]))
                resource = labels.get("resource", "")
                if labels.get("subresource"):
                    resource += "/" + labels["subresource"]
                counts[(labels.get("verb", ""), resource)] += int(float(matched["value"]))
        return counts

    def read(self) -> Reading:
        cpu = {}
        for name, pid in self.processes.items():
            with contextlib.suppress(OSError):
                cpu[name] = proc_cpu_seconds(pid)
        counts = Counter(self._sandbox.admin.requests()["counts"])
        return Reading(time.monotonic(), counts, self._apiserver(), self.sql_log.snapshot(), cpu)

    def since(self, before: Reading) -> Delta:
        now = self.read()
        return Delta(
            now.at - before.at,
            now.entra - before.entra,
            now.apiserver - before.apiserver,
            now.sql - before.sql,
            {k: v - before.cpu.get(k, 0.0) for k, v in now.cpu.items()},
        )


# --- output ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kib / 2**20, 1),
        "python": sys.version.split()[0],
        "load_avg_1m": os.getloadavg()[0],
    }


def save(name: str, data: dict[str, Any]) -> Path:
    """bench/results/NAME.json, or NAME itself when it is a path ending in .json."""
    path = Path(name) if name.endswith(".json") else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    started = time.monotonic()
    yield lambda: time.monotonic() - started
