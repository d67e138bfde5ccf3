"""Start, stop and describe the sandbox: the stand-in for AKS, Entra ID and Azure SQL.

The sandbox is a handful of processes on loopback, each started from its own command and each
announcing readiness with one ``READY ...`` line on stdout:

* ``controlplane``: the Go binary built from ``sandbox/controlplane`` (etcd, kube-apiserver,
  kube-controller-manager in one process);
* ``entra``: the Entra ID emulator (token service, Graph, ARM), ``python -m sandbox.entra serve``;
* ``proxy``: an HTTPS CONNECT proxy that sends Azure's public hosts to the Entra emulator, so
  unmodified clients reach it through ``HTTPS_PROXY``, ``python -m sandbox.proxy serve``;
* ``azuresql``: the Azure SQL endpoint emulator, ``python -m sandbox.azuresql serve``;
* ``containerd``, ``kubelet``, ``kube-proxy``: the node, in a network namespace of its own
  (``python -m sandbox.node run NAME``, see ``sandbox/node/__init__.py``); ``up`` creates that
  namespace first (the API server also listens on the host's end of its link) and ``down``
  removes it and everything the node left after stopping them.

Everything lives in one *state directory*: the sandbox CA, each component's log and pid file, and
the JSON file each component writes once it listens (``<name>.json``, with an ``env`` mapping of
the variables a client needs). ``up`` starts what is not running and returns once every component
is ready, leaving them in the background; ``down`` stops them; ``env`` turns the JSON files into
``export`` lines. A component that died (crash, ``kill -9``) is noticed by its pid file and simply
started again by the next ``up``: no manual clean-up.

A *second cluster* (``attach``, ``up --cloud-of DIR``) is a state directory with a control plane
of its own and the emulators of another sandbox: two clusters, two issuers, one tenant and one
set of SQL servers, as when several AKS clusters federate the same identities. It shares the
first sandbox's CA (the emulators fetch its issuer's keys over TLS, its clients trust the
emulators) and has no node.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sandbox import node
from sandbox.gobuild import SandboxError as SandboxError  # noqa: PLC0414 (re-exported)
from sandbox.gobuild import cache_root, cached_build, source_hash
from sandbox.pki import CA_CERT_NAME, CA_KEY_NAME, ensure_ca

REPO_ROOT = Path(__file__).resolve().parent.parent
CONTROLPLANE_SRC = Path(__file__).resolve().parent / "controlplane"
WORLD_FILE = Path(__file__).resolve().parent / "world.yaml"

STATE_DIR_ENV = "SWI_SANDBOX_DIR"
# Another world file for the Entra and SQL emulators (the benchmarks generate a bigger one).
WORLD_ENV = "SWI_SANDBOX_WORLD"
DEFAULT_STATE_DIR = REPO_ROOT / ".sandbox"

READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR).resolve()


# --- building the control plane ------------------------------------------------------------


def controlplane_source_hash() -> str:
    """Hash of everything the control-plane binary is built from (go.sum first of all)."""
    return source_hash(
        p
        for p in CONTROLPLANE_SRC.iterdir()
        if p.is_file() and (p.suffix == ".go" or p.name in {"go.mod", "go.sum", "build.sh"})
    )


def controlplane_bin_dir() -> Path:
    """Where the cached ``swi-controlplane`` and ``kubectl`` for the current sources live."""
    return cache_root() / f"controlplane-{controlplane_source_hash()}"


CONTROLPLANE_BINARIES = ("swi-controlplane", "kubectl", "kubelet", "kube-proxy")


def build_controlplane(*, quiet: bool = False) -> Path:
    """Build the control plane, kubectl, kubelet and kube-proxy unless a build of the same
    sources is cached."""
    return cached_build(
        what="the sandbox control plane, kubectl, kubelet and kube-proxy",
        src_dir=CONTROLPLANE_SRC,
        cache_name=controlplane_bin_dir().name,
        outputs=CONTROLPLANE_BINARIES,
        quiet=quiet,
        cold_estimate="about 6 minutes plus the module download",
    )


# --- components ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """One process of the sandbox and how to start it."""

    name: str
    # Lines matching this are the process we started (guards against a recycled pid).
    cmdline_marker: str

    def argv(self, state_dir: Path) -> list[str]:
        ca = state_dir / "ca.crt"
        if self.name == "controlplane":
            bin_dir = build_controlplane()
            argv = [
                str(bin_dir / "swi-controlplane"),
                "--state-dir",
                str(state_dir / "controlplane"),
                "--ca-cert",
                str(ca),
                "--ca-key",
                str(state_dir / "ca.key"),
            ]
            net = _node_net(state_dir)
            if net is not None:
                # Pods reach the API server on the host's end of the node's link.
                argv += ["--node-address", net.host_ip, "--service-cidr", net.service_cidr]
            return argv
        if self.name in NODE_COMPONENT_NAMES:
            return [
                sys.executable,
                "-m",
                "sandbox.node",
                "run",
                self.name,
                "--state-dir",
                str(state_dir),
            ]
        if self.name == "operator":
            return [sys.executable, "-m", "swi_operator", "--install-crds", str(REPO_ROOT / "crds")]
        module = f"sandbox.{self.name}"
        argv = [sys.executable, "-m", module, "serve", "--state-dir", str(state_dir)]
        if self.name in {"entra", "azuresql"}:
            argv += ["--world", os.environ.get(WORLD_ENV) or str(WORLD_FILE)]
        if self.name in {"proxy", "azuresql"} and (net := _node_net(state_dir)) is not None:
            # Pods reach Azure's host names and the SQL servers there too, as the API server.
            argv += ["--node-address", net.host_ip]
        # A fixed port when asked for (SWI_SANDBOX_ENTRA_PORT=8443 ...); by default a free one.
        port = os.environ.get(f"SWI_SANDBOX_{self.name.upper()}_PORT")
        if port and self.name in {"entra", "proxy"}:
            argv += ["--port", port]
        return argv


def _node_net(state_dir: Path) -> node.NodeNet | None:
    """The node's network when it exists (its host end is where pods reach the host)."""
    net = node.load_plan(state_dir)
    return net if net is not None and node.network_up(net) else None


def _operator_env(state_dir: Path) -> dict[str, str]:
    """The operator's settings against this sandbox, with its own app's credentials from the
    world (swi-operator --help names each variable)."""
    import yaml

    sandbox = environment(state_dir)
    world = yaml.safe_load(Path(os.environ.get(WORLD_ENV) or WORLD_FILE).read_text())
    app = next(
        a for a in world["entra"]["applications"] if a["name"] == "sql-workload-identity-operator"
    )
    return {
        "KUBECONFIG": sandbox["KUBECONFIG"],
        "AZURE_TENANT_ID": app["tenant"],
        "AZURE_CLIENT_ID": app["appId"],
        "AZURE_CLIENT_SECRET": app["secrets"][0],
        # Azure's default endpoints, as in a cluster: the sandbox proxy answers for them.
        "HTTPS_PROXY": sandbox["HTTPS_PROXY"],
        "NO_PROXY": sandbox["NO_PROXY"],
        "AZURE_SUBSCRIPTION_ID": sandbox["SANDBOX_SUBSCRIPTION_ID"],
        "SWI_CA_BUNDLE": str(state_dir / "ca.crt"),
        "SWI_DRIFT_INTERVAL": os.environ.get("SWI_DRIFT_INTERVAL", "30"),
        # As deployed: a resource needs a SqlIdentityPolicy (deploy/examples/policies.yaml);
        # SWI_REQUIRE_POLICY=false leaves identities no policy names unrestricted.
        "SWI_REQUIRE_POLICY": os.environ.get("SWI_REQUIRE_POLICY", "true"),
        # The ODBC driver's registration: database users and the Verified probe log in to the
        # SQL emulator (what /etc/odbcinst.ini does in the operator's image).
        **{k: v for k, v in sandbox.items() if k == "ODBCSYSINI"},
    }


NODE_COMPONENT_NAMES = ("containerd", "kubelet", "kube-proxy")
CONTROLPLANE = Component("controlplane", "swi-controlplane")
ENTRA = Component("entra", "sandbox.entra")
PROXY = Component("proxy", "sandbox.proxy")
AZURESQL = Component("azuresql", "sandbox.azuresql")
CONTAINERD = Component("containerd", "sandbox.node run containerd")
KUBELET = Component("kubelet", "sandbox.node run kubelet")
KUBE_PROXY = Component("kube-proxy", "sandbox.node run kube-proxy")
NODE_COMPONENTS = (CONTAINERD, KUBELET, KUBE_PROXY)
# Not started by a plain `up` (no sandbox/operator/ module): `up --operator` starts it after the
# others; `down` stops it first.
OPERATOR = Component("operator", "swi_operator")

# Start order matters: the proxy and the SQL emulator read the Entra emulator's address from its
# JSON file.
# The node comes after the control plane (the kubelet registers with it) and the emulators.
ALL_COMPONENTS: tuple[Component, ...] = (
    CONTROLPLANE,
    ENTRA,
    PROXY,
    AZURESQL,
    *NODE_COMPONENTS,
    OPERATOR,
)


def available_components() -> list[Component]:
    """The components whose code exists in this checkout (the sandbox grows issue by issue)."""
    here = Path(__file__).resolve().parent
    present = []
    for comp in ALL_COMPONENTS:
        if comp is CONTROLPLANE:
            if (CONTROLPLANE_SRC / "go.mod").exists():
                present.append(comp)
        elif comp in NODE_COMPONENTS:
            if CONTROLPLANE in present and (here / "node" / "__main__.py").exists():
                present.append(comp)
        elif (here / comp.name / "__main__.py").exists() or (here / f"{comp.name}.py").exists():
            if comp is PROXY and ENTRA not in present:
                continue  # the proxy only ever forwards to the Entra emulator
            present.append(comp)
    return present


# In a second cluster's state directory: the state directory whose emulators it uses.
CLOUD_FILE = "cloud"
# What a second cluster runs itself; everything else is its cloud's.
CLUSTER_COMPONENTS = (CONTROLPLANE, OPERATOR)


def cloud_of(state_dir: Path) -> Path | None:
    """The sandbox whose Entra and SQL emulators ``state_dir`` shares, if it is a second
    cluster."""
    try:
        text = (state_dir / CLOUD_FILE).read_text().strip()
    except OSError:
        return None
    return Path(text) if text else None


def attach(state_dir: Path, cloud: Path) -> None:
    """Make ``state_dir`` a second cluster of the sandbox in ``cloud``, whose emulators must
    be running: the same CA (copied), its own control plane at the next ``up``."""
    cloud = cloud.resolve()
    state_dir = state_dir.resolve()
    if cloud == state_dir:
        raise SandboxError(f"{state_dir} cannot be a second cluster of itself")
    if cloud_of(cloud) is not None:
        raise SandboxError(
            f"{cloud} is itself a second cluster (of {cloud_of(cloud)}): name that one"
        )
    if not inspect(cloud, ENTRA).alive:
        raise SandboxError(
            f"no Entra emulator runs in {cloud}: start that sandbox first "
            f"(`python -m sandbox up --state-dir {cloud}`)"
        )
    current = cloud_of(state_dir)
    if current is not None and current != cloud:
        raise SandboxError(
            f"{state_dir} is a second cluster of {current} already: "
            f"`python -m sandbox down --state-dir {state_dir}` and use another directory"
        )
    if current is None and (state_dir / CA_CERT_NAME).exists():
        raise SandboxError(
            f"{state_dir} is a sandbox of its own (it has a CA): use an empty directory"
        )
    state_dir.mkdir(parents=True, exist_ok=True)
    for name in (CA_CERT_NAME, CA_KEY_NAME):
        shutil.copy2(cloud / name, state_dir / name)
    (state_dir / CLOUD_FILE).write_text(f"{cloud}\n")


def components_of(state_dir: Path) -> list[Component]:
    """What ``up`` starts in ``state_dir`` by default: everything in this checkout, or in a
    second cluster its control plane alone."""
    if cloud_of(state_dir) is not None:
        return [CONTROLPLANE]
    return available_components()


def _pid_alive(pid: int, marker: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A zombie is dead for our purposes; it only waits for its parent to reap it.
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state != "Z" and marker in cmdline


@dataclass
class Running:
    component: Component
    pid: int | None
    alive: bool
    info: dict[str, object] = field(default_factory=dict)


def _pid_file(state_dir: Path, comp: Component) -> Path:
    return state_dir / "run" / f"{comp.name}.pid"


def _info_file(state_dir: Path, comp: Component) -> Path:
    if comp is CONTROLPLANE:
        return state_dir / "controlplane" / "apiserver.json"
    return state_dir / f"{comp.name}.json"


def inspect(state_dir: Path, comp: Component) -> Running:
    pid_file = _pid_file(state_dir, comp)
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return Running(comp, None, False)
    alive = _pid_alive(pid, comp.cmdline_marker)
    info: dict[str, object] = {}
    with contextlib.suppress(OSError, ValueError):
        info = json.loads(_info_file(state_dir, comp).read_text())
    return Running(comp, pid, alive, info)


def _forget(state_dir: Path, comp: Component) -> None:
    """Remove what a dead component left behind, so a restart starts clean."""
    _pid_file(state_dir, comp).unlink(missing_ok=True)
    _info_file(state_dir, comp).unlink(missing_ok=True)


def _log_paths(state_dir: Path, comp: Component) -> tuple[Path, Path]:
    logs = state_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return logs / f"{comp.name}.out", logs / f"{comp.name}.log"


# What `env` exports (for any sandbox) and so must not leak from the caller's environment into a
# component: a shell that ran `eval "$(python -m sandbox env)"` for one sandbox and then starts
# another (or a test session doing the same) would otherwise point it at the first one.
_EXPORTED_PREFIXES = ("AZURE_", "AZ_", "SANDBOX_")
_EXPORTED_NAMES = frozenset(
    {
        "KUBECONFIG",
        "KUBECACHEDIR",
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "ODBCSYSINI",
        "SWI_AZURESQL_ADMIN_URL",
        "HTTPS_PROXY",
        "https_proxy",
        "NO_PROXY",
        "no_proxy",
        STATE_DIR_ENV,
    }
)


def _without_sandbox_env(environ: Mapping[str, str]) -> dict[str, str]:
    return {
        name: value
        for name, value in environ.items()
        if name not in _EXPORTED_NAMES and not name.startswith(_EXPORTED_PREFIXES)
    }


def _start(state_dir: Path, comp: Component, timeout: float) -> Running:
    argv = comp.argv(state_dir)
    out_path, err_path = _log_paths(state_dir, comp)
    env = _without_sandbox_env(os.environ)
    env.update(_trust_env(state_dir))
    # Components started later find the earlier ones through their JSON files, not the proxy.
    env["NO_PROXY"] = env["no_proxy"] = "localhost,127.0.0.1"
    if comp is OPERATOR:
        env.update(_operator_env(state_dir))
    with out_path.open("wb") as out, err_path.open("ab") as err:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            cwd=REPO_ROOT,
            env=env,
            start_new_session=True,  # survives the launcher; `down` signals it by pid
        )
    _pid_file(state_dir, comp).parent.mkdir(parents=True, exist_ok=True)
    _pid_file(state_dir, comp).write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while True:
        text = out_path.read_text(errors="replace")
        if any(line.startswith("READY") for line in text.splitlines()):
            return inspect(state_dir, comp)
        code = proc.poll()
        if code is not None:
            _forget(state_dir, comp)
            raise SandboxError(
                f"{comp.name} exited with code {code} before it was ready: "
                f"{_last_error(err_path) or 'no message'} (full log: {err_path})"
            )
        if time.monotonic() > deadline:
            _terminate(proc.pid)
            _forget(state_dir, comp)
            raise SandboxError(f"{comp.name} was not ready after {timeout:.0f}s; see {err_path}")
        time.sleep(0.1)


def _last_error(err_path: Path) -> str:
    """The component's own one-line ``error:`` message, or its last log line."""
    try:
        lines = [
            ln.strip() for ln in err_path.read_text(errors="replace").splitlines() if ln.strip()
        ]
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith("error:"):
            return line.removeprefix("error:").strip()
    return lines[-1] if lines else ""


def _terminate(pid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)
            if waited == pid:
                return
        except ChildProcessError:
            pass  # not our child (started by an earlier `up`): poll /proc instead
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


# --- the public operations -------------------------------------------------------------------


def _trust_env(state_dir: Path) -> dict[str, str]:
    ca = str(state_dir / "ca.crt")
    return {"SANDBOX_CA": ca, "REQUESTS_CA_BUNDLE": ca, "SSL_CERT_FILE": ca}


def up(
    state_dir: Path,
    components: Iterable[Component] | None = None,
    *,
    timeout: float = READY_TIMEOUT_S,
) -> list[Running]:
    """Start every component that is not running; return once all are ready."""
    state_dir.mkdir(parents=True, exist_ok=True)
    ensure_ca(state_dir)
    comps = list(components if components is not None else components_of(state_dir))
    cloud = cloud_of(state_dir)
    if cloud is not None:
        shared = [c.name for c in comps if c not in CLUSTER_COMPONENTS]
        if shared:
            raise SandboxError(
                f"{state_dir} is a second cluster of {cloud}: {', '.join(shared)} run there, "
                "and a second cluster has no node"
            )
        if not inspect(cloud, ENTRA).alive:
            raise SandboxError(f"the sandbox in {cloud}, whose emulators this one uses, is down")
    if any(c in NODE_COMPONENTS for c in comps):
        _prepare_node(state_dir)
    started: list[Running] = []
    for comp in comps:
        current = inspect(state_dir, comp)
        if current.alive:
            started.append(current)
            continue
        if current.pid is not None:
            _forget(state_dir, comp)  # it crashed or was killed: recover silently
        started.append(_start(state_dir, comp, timeout))
    return started


def _prepare_node(state_dir: Path) -> None:
    """The node's network namespace and binaries, before the control plane starts (it listens
    on the node's link)."""
    try:
        node.require_root()
        node.build_node()
        build_controlplane()
        planned = node.load_plan(state_dir)
        was_up = planned is not None and node.network_up(planned)
        node.setup_network(state_dir)
    except node.NodeError as exc:
        raise SandboxError(str(exc)) from None
    # These listen on the node's link only if it existed when they started.
    for comp in (CONTROLPLANE, PROXY, AZURESQL):
        if inspect(state_dir, comp).alive and not was_up:
            raise SandboxError(
                f"the {comp.name} runs without the node's network (it was started before it): "
                f"`python -m sandbox down --state-dir {state_dir}` and `up` again"
            )


def down(state_dir: Path) -> list[str]:
    """Stop every component (last started first), then remove what the node left on the
    machine; return the names that were running."""
    stopped = []
    for comp in reversed(ALL_COMPONENTS):
        current = inspect(state_dir, comp)
        if current.alive and current.pid is not None:
            _terminate(current.pid)
            stopped.append(comp.name)
        _forget(state_dir, comp)
    from sandbox.node.runtime import teardown

    teardown(state_dir)
    return stopped


def status(state_dir: Path) -> list[Running]:
    """Each component of the sandbox; a second cluster's own, then its cloud's."""
    cloud = cloud_of(state_dir)
    if cloud is None:
        return [inspect(state_dir, comp) for comp in available_components()]
    return [inspect(state_dir, CONTROLPLANE)] + [
        inspect(cloud, comp) for comp in _cloud_components()
    ]


def _cloud_components() -> list[Component]:
    """The components a second cluster uses from its cloud: the emulators and the proxy."""
    return [
        c
        for c in available_components()
        if c not in CLUSTER_COMPONENTS and c not in NODE_COMPONENTS
    ]


def environment(state_dir: Path) -> dict[str, str]:
    """The variables a shell or an unmodified client needs to use the running sandbox."""
    env: dict[str, str] = {STATE_DIR_ENV: str(state_dir)}
    env.update(_trust_env(state_dir))
    cloud = cloud_of(state_dir)
    if cloud is not None:  # a second cluster: its cloud's endpoints, then its own control plane
        for comp in _cloud_components():
            running = inspect(cloud, comp)
            extra = running.info.get("env")
            if running.alive and isinstance(extra, dict):
                env.update({str(k): str(v) for k, v in extra.items()})
    for comp in available_components():
        if cloud is not None and comp not in CLUSTER_COMPONENTS:
            continue
        running = inspect(state_dir, comp)
        if not running.alive:
            continue
        if comp is CONTROLPLANE:
            env["KUBECONFIG"] = str(running.info.get("kubeconfig", ""))
            # kubectl's discovery cache is keyed by host and port and kept for hours: a later
            # sandbox on a reused port would be read through the last one's resource list
            # ("the server doesn't have a resource type swi"). Each sandbox has its own.
            env["KUBECACHEDIR"] = str(state_dir / "kube-cache")
            env["SANDBOX_ISSUER"] = str(running.info.get("issuer", ""))
            env["PATH"] = f"{controlplane_bin_dir()}:{os.environ.get('PATH', '')}"
        extra = running.info.get("env")
        if isinstance(extra, dict):
            env.update({str(k): str(v) for k, v in extra.items()})
    return env


def export_lines(env: dict[str, str]) -> str:
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())
