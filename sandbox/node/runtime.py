"""The node's three programs: their configuration files, how each is started, when it is ready,
and what ``teardown`` removes after them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from sandbox.node import (
    BRIDGE,
    CGROUP_ROOT,
    CNI_BIN_DIR,
    KUBELET_PORT,
    KUBELET_SYSCTLS,
    PAUSE_IMAGE,
    NodeError,
    NodeNet,
    containerd_socket,
    in_netns,
    load_plan,
    node_bin_dir,
    node_dir,
    run_dir,
    teardown_network,
)

COMPONENTS = ("containerd", "kubelet", "kube-proxy")
# Where the kubelet links container logs no matter its root dir (a constant in the kubelet).
KUBELET_LOG_LINKS = Path("/var/log/containers")
CNI_CACHE = Path("/var/lib/cni/results")


def _controlplane_bin_dir() -> Path:
    from sandbox.launcher import controlplane_bin_dir

    return controlplane_bin_dir()


# --- configuration ------------------------------------------------------------------------------


def containerd_config(state_dir: Path, net: NodeNet) -> Path:
    base = node_dir(state_dir) / "containerd"
    sock = containerd_socket(state_dir)
    sock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    cni_conf = node_dir(state_dir) / "cni" / "net.d"
    runc = node_bin_dir() / "runc"
    text = f"""version = 3
root = "{base / "root"}"
state = "{base / "state"}"
oom_score = 0

[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{base / "opt"}"
[plugins."io.containerd.nri.v1.nri"]
  disable = true
[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{PAUSE_IMAGE}"
[plugins."io.containerd.cri.v1.runtime"]
  # This machine's root lacks CAP_SYS_RESOURCE: clamp the kubelet's negative oom_score_adj.
  restrict_oom_score_adj = true
  # Pod network namespaces under the state dir, not /var/run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{CNI_BIN_DIR}"]
    conf_dir = "{cni_conf}"
    max_conf_num = 1
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"""
    cni_conf.mkdir(parents=True, exist_ok=True)
    (cni_conf / "10-swi.conflist").write_text(
        json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": f"swi-{net.id}",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": BRIDGE,
                        "isGateway": True,
                        # No ipMasq: pod traffic keeps its source address and has nowhere to go
                        # but the node, the host's link address and other pods.
                        "ipMasq": False,
                        "hairpinMode": True,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": net.pod_cidr}]],
                            "routes": [{"dst": "0.0.0.0/0"}],
                            "dataDir": str(node_dir(state_dir) / "cni" / "ipam"),
                        },
                    },
                    {"type": "portmap", "capabilities": {"portMappings": True}, "snat": False},
                ],
            },
            indent=2,
        )
        + "\n"
    )
    path = base / "config.toml"
    base.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _client_kubeconfig(state_dir: Path, net: NodeNet, name: str, organization: str | None) -> Path:
    """A kubeconfig with a client certificate from the sandbox CA, for the API server."""
    from sandbox.pki import ensure_ca

    ca = ensure_ca(state_dir)
    pki = node_dir(state_dir) / "pki"
    pki.mkdir(parents=True, exist_ok=True)
    # The subject is the user name (system:node:<node> for the Node authorizer).
    cert, key = ca.issue(pki, name, [], client=True, organization=organization)
    # The node cannot see the host's loopback: it reaches the API server on the link.
    loopback = json.loads((state_dir / "controlplane" / "apiserver.json").read_text())["server"]
    server = f"https://{net.host_ip}:{loopback.rsplit(':', 1)[1]}"
    path = node_dir(state_dir) / f"{name}.kubeconfig"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "sandbox",
                        "cluster": {"server": server, "certificate-authority": str(ca.cert_path)},
                    }
                ],
                "users": [
                    {
                        "name": name,
                        "user": {"client-certificate": str(cert), "client-key": str(key)},
                    }
                ],
                "contexts": [{"name": "sandbox", "context": {"cluster": "sandbox", "user": name}}],
                "current-context": "sandbox",
            }
        )
    )
    return path


def kubelet_config(state_dir: Path, net: NodeNet) -> Path:
    base = node_dir(state_dir) / "kubelet"
    base.mkdir(parents=True, exist_ok=True)
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # cgroup v1 on this machine kind; 1.35+ kubelets refuse it unless told not to.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": net.cgroup_parent,
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{containerd_socket(state_dir)}",
        "address": net.node_ip,
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "podLogsDir": str(base / "pods-logs"),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(state_dir / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        # No cluster DNS runs: pods resolve nothing (the kubelet's "nameserver limits" Event
        # names it); the in-cluster config uses KUBERNETES_SERVICE_HOST, an address.
        "resolvConf": "",
        "oomScoreAdj": 0,
        "serializeImagePulls": False,
        # A shared developer machine: never evict or collect images because of its disk.
        "evictionHard": {
            "memory.available": "1Mi",
            "nodefs.available": "0%",
            "imagefs.available": "0%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "registerNode": True,
        "maxPods": 110,
        "staticPodPath": "",
        "localStorageCapacityIsolation": True,
        "shutdownGracePeriod": "0s",
    }
    path = base / "config.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def kube_proxy_config(state_dir: Path, net: NodeNet, kubeconfig: Path) -> Path:
    base = node_dir(state_dir) / "kube-proxy"
    base.mkdir(parents=True, exist_ok=True)
    config = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": net.node_name,
        "bindAddress": net.node_ip,
        "clusterCIDR": net.pod_cidr,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # Leave the machine-wide conntrack settings alone.
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
        "iptables": {"localhostNodePorts": False, "masqueradeAll": False},
        "nodePortAddresses": [f"{net.node_ip}/32"],
        "oomScoreAdj": 0,
    }
    path = base / "config.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def _ensure_cgroup_parent(net: NodeNet) -> None:
    """The kubelet needs its cgroupRoot to exist in every v1 hierarchy; cpuset needs its
    cpus/mems filled in before anything can join it."""
    for hierarchy in sorted(CGROUP_ROOT.iterdir()):
        if not hierarchy.is_dir() or hierarchy.name == "unified":
            continue
        path = hierarchy / net.cgroup_parent.lstrip("/")
        path.mkdir(exist_ok=True)
        if hierarchy.name == "cpuset":
            for name in ("cpuset.cpus", "cpuset.mems"):
                target = path / name
                if not target.read_text().strip():
                    target.write_text((hierarchy / name).read_text())


def _save_sysctls(state_dir: Path) -> None:
    path = node_dir(state_dir) / "sysctl.json"
    if path.exists():
        return
    values = {}
    for name in KUBELET_SYSCTLS:
        with contextlib.suppress(OSError):
            values[name] = (Path("/proc/sys") / name).read_text().strip()
    path.write_text(json.dumps(values) + "\n")


def _restore_sysctls(state_dir: Path) -> None:
    path = node_dir(state_dir) / "sysctl.json"
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    for name, value in values.items():
        with contextlib.suppress(OSError):
            (Path("/proc/sys") / name).write_text(f"{value}\n")
    path.unlink(missing_ok=True)


def command(state_dir: Path, name: str, net: NodeNet) -> tuple[list[str], dict[str, str]]:
    """The program's argv (inside the node's network namespace) and its environment."""
    env = dict(os.environ)
    env["PATH"] = f"{node_bin_dir()}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    # Nothing the node runs goes through a proxy.
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        env.pop(var, None)
    if name == "containerd":
        config = containerd_config(state_dir, net)
        return in_netns(net, [str(node_bin_dir() / "containerd"), "--config", str(config)]), env
    if name == "kubelet":
        _ensure_cgroup_parent(net)
        _save_sysctls(state_dir)
        kubeconfig = _client_kubeconfig(
            state_dir, net, f"system:node:{net.node_name}", "system:nodes"
        )
        config = kubelet_config(state_dir, net)
        argv = [
            str(_controlplane_bin_dir() / "kubelet"),
            f"--config={config}",
            f"--kubeconfig={kubeconfig}",
            f"--root-dir={node_dir(state_dir) / 'kubelet' / 'root'}",
            f"--hostname-override={net.node_name}",
            f"--node-ip={net.node_ip}",
            f"--cert-dir={node_dir(state_dir) / 'kubelet' / 'pki'}",
            "--v=1",
        ]
        return in_netns(net, argv), env
    if name == "kube-proxy":
        kubeconfig = _client_kubeconfig(state_dir, net, "system:kube-proxy", None)
        config = kube_proxy_config(state_dir, net, kubeconfig)
        argv = [str(_controlplane_bin_dir() / "kube-proxy"), f"--config={config}", "--v=1"]
        return in_netns(net, argv), env
    raise NodeError(f"unknown node component {name!r} (one of {', '.join(COMPONENTS)})")


# --- readiness ---------------------------------------------------------------------------------


def ready(state_dir: Path, name: str, net: NodeNet) -> bool:
    if name == "containerd":
        if not containerd_socket(state_dir).exists():
            return False
        version = subprocess.run(
            [
                str(node_bin_dir() / "ctr"),
                "--address",
                str(containerd_socket(state_dir)),
                "version",
            ],
            capture_output=True,
            check=False,
        )
        return version.returncode == 0
    kubeconfig = str(state_dir / "controlplane" / "kubeconfig")
    kubectl = str(_controlplane_bin_dir() / "kubectl")
    if name == "kubelet":
        proc = subprocess.run(
            [kubectl, "--kubeconfig", kubeconfig, "get", "node", net.node_name, "-o", "json"],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            return False
        conditions = json.loads(proc.stdout).get("status", {}).get("conditions", [])
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    if name == "kube-proxy":
        proc = subprocess.run(
            in_netns(net, ["iptables", "-t", "nat", "-S", "KUBE-SERVICES"]),
            capture_output=True,
            text=True,
            check=False,
        )
        return "default/kubernetes:https" in proc.stdout
    raise NodeError(f"unknown node component {name!r}")


def info(state_dir: Path, name: str, net: NodeNet) -> dict[str, object]:
    if name == "containerd":
        return {"url": f"unix://{containerd_socket(state_dir)}", "netns": net.netns}
    if name == "kubelet":
        return {
            "url": f"https://{net.node_ip}:{KUBELET_PORT} node {net.node_name}",
            "node": net.node_name,
            "env": {
                "SANDBOX_NODE": net.node_name,
                # The host's address on the node's link: pods reach listeners bound here.
                "SANDBOX_NODE_HOST_ADDRESS": net.host_ip,
                "SANDBOX_POD_CIDR": net.pod_cidr,
                "SANDBOX_SERVICE_CIDR": net.service_cidr,
            },
        }
    return {"url": f"iptables in netns {net.netns}", "netns": net.netns}


# --- teardown ----------------------------------------------------------------------------------


def _cgroup_pids(net: NodeNet) -> set[int]:
    pids: set[int] = set()
    for hierarchy in CGROUP_ROOT.iterdir():
        root = hierarchy / net.cgroup_parent.lstrip("/")
        if not root.is_dir():
            continue
        for procs in root.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in procs.read_text().split())
    return pids


def _shim_pids(state_dir: Path) -> set[int]:
    """containerd-shim-runc-v2 processes of this node (they run in their own process group, so
    stopping containerd leaves them): found by the socket path on their command line."""
    marker = str(containerd_socket(state_dir)).encode()
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes()
            if b"containerd-shim" in cmdline and marker in cmdline:
                pids.add(int(proc.name))
    return pids


def _kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            mountpoint = line.split()[4].replace("\\040", " ")
            if mountpoint.startswith(prefix) or mountpoint == prefix[:-1]:
                found.append(mountpoint)
    return found


def _remove_cgroups(net: NodeNet) -> None:
    for hierarchy in CGROUP_ROOT.iterdir():
        root = hierarchy / net.cgroup_parent.lstrip("/")
        if not root.is_dir():
            continue
        dirs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for d in [*dirs, root]:
            with contextlib.suppress(OSError):
                d.rmdir()


def leftovers(state_dir: Path) -> list[str]:
    """What of the node is still on the machine (empty after a clean ``teardown``)."""
    net = load_plan(state_dir)
    found: list[str] = []
    if net is None:
        return found
    if net.netns_path.exists():
        found.append(f"network namespace {net.netns}")
    if (
        subprocess.run(
            ["ip", "link", "show", net.host_if], capture_output=True, check=False
        ).returncode
        == 0
    ):
        found.append(f"link {net.host_if}")
    found += [f"mount {m}" for m in _mounts_under(state_dir)]
    found += [f"process {pid} (shim)" for pid in _shim_pids(state_dir)]
    found += [f"process {pid} (pod)" for pid in _cgroup_pids(net)]
    for hierarchy in CGROUP_ROOT.iterdir():
        if (hierarchy / net.cgroup_parent.lstrip("/")).exists():
            found.append(f"cgroup {hierarchy / net.cgroup_parent.lstrip('/')}")
    routes = subprocess.run(
        ["ip", "-4", "route", "show"], capture_output=True, text=True, check=False
    )
    for cidr in (net.pod_cidr, net.service_cidr):
        if cidr in routes.stdout:
            found.append(f"route {cidr}")
    logs = node_dir(state_dir) / "kubelet" / "pods-logs"
    with contextlib.suppress(OSError):
        for link in KUBELET_LOG_LINKS.iterdir():
            if link.is_symlink() and str(os.readlink(link)).startswith(str(logs)):
                found.append(f"log link {link}")
    with contextlib.suppress(OSError):
        found += [
            f"CNI cache {c}" for c in CNI_CACHE.iterdir() if c.name.startswith(f"swi-{net.id}-")
        ]
    if (node_dir(state_dir) / "cni" / "ipam").exists():
        found.append(f"CNI state {node_dir(state_dir) / 'cni' / 'ipam'}")
    if run_dir(state_dir).exists():
        found.append(f"socket folder {run_dir(state_dir)}")
    return found


def teardown(state_dir: Path) -> None:
    """Remove everything the node put on the machine. Run after its programs are stopped."""
    net = load_plan(state_dir)
    if net is None:
        return
    # Pods and their shims first (the kubelet is gone, nobody would stop them).
    for _ in range(3):
        pids = _shim_pids(state_dir) | _cgroup_pids(net)
        if not pids:
            break
        _kill_all(pids)
        time.sleep(0.3)
    # Mounts: container rootfs, pod volumes (tmpfs), netns bind mounts; deepest first.
    for mountpoint in sorted(_mounts_under(state_dir), key=len, reverse=True):
        subprocess.run(["umount", "-l", mountpoint], capture_output=True, check=False)
    teardown_network(net)
    _remove_cgroups(net)
    logs = node_dir(state_dir) / "kubelet" / "pods-logs"
    with contextlib.suppress(OSError):
        for link in KUBELET_LOG_LINKS.iterdir():
            if link.is_symlink() and str(os.readlink(link)).startswith(str(logs)):
                link.unlink()
    # CNI IPAM leases and caches, containerd's state (sockets, task dirs): stale once the
    # namespaces are gone. Images (containerd root) stay, so the next `up` is quick.
    import shutil

    for stale in (
        node_dir(state_dir) / "cni" / "ipam",
        node_dir(state_dir) / "containerd" / "state",
        run_dir(state_dir),
        node_dir(state_dir) / "kubelet" / "root" / "pods",
    ):
        shutil.rmtree(stale, ignore_errors=True)
    # libcni's result cache (a constant /var/lib/cni in containerd): our network's entries.
    with contextlib.suppress(OSError):
        for cached in CNI_CACHE.iterdir():
            if cached.name.startswith(f"swi-{net.id}-"):
                cached.unlink()
    _restore_sysctls(state_dir)
