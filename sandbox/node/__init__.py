"""The sandbox's node: containerd, kubelet and kube-proxy in a network namespace of their own.

Layout (everything derived from the state directory, so two sandboxes run side by side):

* a network namespace ``swi-<id>`` holds the node: its end of a veth link (``node_ip``), the
  pods' bridge ``swibr0`` (``pod_cidr``), kube-proxy's and the kubelet's iptables chains and
  ports. Its only routes are the link and the bridge: no default route, so pods reach the
  node's emulators, each other and the API server, and nothing beyond this machine;
* the host keeps the other end of the link (``host_ip``, device ``swih<id>``) and routes the
  pod and Service ranges to ``node_ip``. The API server also listens on ``host_ip`` (pods reach
  it through the ``kubernetes`` Service) and so can any emulator that should serve pods;
* containerd's root, state and socket, the kubelet's root and pod logs, CNI configuration and
  IPAM state, the pods' network namespaces and cgroups (``/swi-<id>`` under each v1 controller)
  all live under ``<state dir>/node`` or are named after ``<id>``.

``python -m sandbox.node run containerd|kubelet|kube-proxy --state-dir DIR`` is the launcher's
component command: it prepares what the program needs, starts it inside the node's network
namespace, prints ``READY ...`` once it is usable and stops it on SIGTERM. ``teardown`` is
what ``python -m sandbox down`` calls after stopping them: it kills what pods left running,
unmounts, deletes the namespace (and with it the link, the bridge, the pods' veths and every
iptables rule the node made), the cgroups, the CNI state and the kubelet's log links, and
restores the kernel settings the kubelet changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from sandbox.gobuild import SandboxError, cache_root, cached_build, source_hash

NODE_SRC = Path(__file__).resolve().parent
# The kubelet's CRI asks for containerd's pinned sandbox image; we build it (no registry).
PAUSE_IMAGE = "registry.k8s.io/pause:3.10.2"
# A tiny static test workload (sandbox/node/cmd/swi-probe), imported the same way.
PROBE_IMAGE = "sandbox.local/swi-probe:v1"
CNI_BIN_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
BRIDGE = "swibr0"  # inside the node's own network namespace, so the name can be fixed
UPLINK = "uplink"  # the node's end of the link to the host
KUBELET_PORT = 10250
NETNS_DIR = Path("/run/netns")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# The kernel settings the kubelet's container manager insists on (it writes them at start);
# `teardown` puts the values it found back.
KUBELET_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)


class NodeError(SandboxError):
    """A problem the user can act on; ``str()`` is one line."""


# --- the plan: names and addresses of this sandbox's node ----------------------------------


@dataclass(frozen=True)
class NodeNet:
    id: str
    index: int  # the second octet of 10.<index>.0.0/16, this node's private range

    @property
    def netns(self) -> str:
        return f"swi-{self.id}"

    @property
    def host_if(self) -> str:
        return f"swih{self.id}"

    @property
    def node_name(self) -> str:
        return f"swi-node-{self.id}"

    @property
    def service_cidr(self) -> str:
        return f"10.{self.index}.0.0/24"

    @property
    def pod_cidr(self) -> str:
        return f"10.{self.index}.1.0/24"

    @property
    def link_cidr(self) -> str:
        return f"10.{self.index}.255.0/30"

    @property
    def host_ip(self) -> str:
        return f"10.{self.index}.255.1"

    @property
    def node_ip(self) -> str:
        return f"10.{self.index}.255.2"

    @property
    def cgroup_parent(self) -> str:
        return f"/swi-{self.id}"

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns


def node_dir(state_dir: Path) -> Path:
    return state_dir / "node"


def _plan_file(state_dir: Path) -> Path:
    return node_dir(state_dir) / "net.json"


def load_plan(state_dir: Path) -> NodeNet | None:
    try:
        data = json.loads(_plan_file(state_dir).read_text())
        return NodeNet(id=str(data["id"]), index=int(data["index"]))
    except (OSError, ValueError, KeyError):
        return None


def _ip_json(*args: str) -> list[dict[str, object]]:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=False).stdout
    try:
        rows = json.loads(out or "[]")
    except ValueError:
        return []
    return rows if isinstance(rows, list) else []


def _state_hash(state_dir: Path) -> str:
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()


def _node_id(state_dir: Path) -> str:
    return _state_hash(state_dir)[:8]


# Ranges chosen by the sandboxes of this host, one file per index naming its state directory:
# two sandboxes starting at once (test tiers, helpers) both see the range free before either has
# a route, and the second ``ip route replace`` would take the first one's Service range.
RESERVATIONS = Path("/run/swi-node-ranges")


@contextlib.contextmanager
def _reservations() -> Iterator[set[int] | None]:
    """Under a host-wide lock: the indexes other sandboxes hold (a reservation whose state
    directory no longer has that plan is stale and removed); None without /run access."""
    try:
        RESERVATIONS.mkdir(mode=0o700, exist_ok=True)
        lock = open(RESERVATIONS / ".lock", "w")  # noqa: SIM115 - held for the block
    except OSError:
        yield None
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        held: set[int] = set()
        for entry in RESERVATIONS.iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                owner = load_plan(Path(entry.read_text().strip()))
                if owner is not None and owner.index == int(entry.name):
                    held.add(owner.index)
                else:
                    entry.unlink()
        yield held


def plan(state_dir: Path) -> NodeNet:
    """This sandbox's node names and ranges: kept in ``node/net.json`` once chosen (the API
    server's Service range must not change under it), first chosen from a hash of the state
    directory and moved on while another sandbox (``RESERVATIONS``) or a host route already
    uses the range."""
    existing = load_plan(state_dir)
    if existing is not None:
        return existing
    digest = _state_hash(state_dir)
    node_id = digest[:8]
    with _reservations() as held:
        taken: list[ipaddress.IPv4Network] = [
            ipaddress.IPv4Network(f"10.{index}.0.0/16") for index in held or ()
        ]
        for route in _ip_json("-4", "route", "show", "table", "all"):
            dst = str(route.get("dst", ""))
            if dst and dst != "default" and not dst.startswith(("127.", "broadcast", "local")):
                with contextlib.suppress(ValueError):
                    taken.append(ipaddress.IPv4Network(dst, strict=False))
        for addr in _ip_json("-4", "addr", "show"):
            infos = addr.get("addr_info")
            for info in infos if isinstance(infos, list) else []:
                if isinstance(info, dict) and "local" in info:
                    with contextlib.suppress(ValueError):
                        taken.append(
                            ipaddress.IPv4Network(
                                f"{info['local']}/{info.get('prefixlen', 32)}", False
                            )
                        )
        start = int(digest[8:12], 16) % 150
        for step in range(150):
            index = 100 + (start + step) % 150
            mine = ipaddress.IPv4Network(f"10.{index}.0.0/16")
            if not any(mine.overlaps(net) for net in taken):
                chosen = NodeNet(node_id, index)
                node_dir(state_dir).mkdir(parents=True, exist_ok=True)
                _plan_file(state_dir).write_text(json.dumps(asdict(chosen)) + "\n")
                if held is not None:
                    (RESERVATIONS / str(index)).write_text(f"{state_dir.resolve()}\n")
                return chosen
    raise NodeError("no free 10.X.0.0/16 range (X in 100..249) for the sandbox node's network")


# --- privileged helpers ---------------------------------------------------------------------


def require_root() -> None:
    if os.geteuid() != 0:
        raise NodeError(
            "the sandbox node needs root (network namespaces, mounts, cgroups): run as root, "
            "or start the sandbox without it: `python -m sandbox up --no-node`"
        )


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise NodeError(f"`{' '.join(argv)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def in_netns(net: NodeNet, argv: list[str]) -> list[str]:
    """``argv`` run inside the node's network namespace (mounts and cgroups stay the host's)."""
    return ["nsenter", f"--net={net.netns_path}", "--", *argv]


def _write_in_netns(net: NodeNet, path: str, value: str) -> None:
    # /proc/sys/net shows the namespace of the process that opens it.
    _run(in_netns(net, ["sh", "-c", f"echo {value} > {path}"]))


def network_up(net: NodeNet) -> bool:
    return net.netns_path.exists() and any(
        link.get("ifname") == net.host_if for link in _ip_json("link", "show", net.host_if)
    )


def setup_network(state_dir: Path) -> NodeNet:
    """Create (or find) the node's network namespace and its link to the host; idempotent."""
    require_root()
    net = plan(state_dir)
    if network_up(net):
        return net
    teardown_network(net)  # a half-made one from a crash
    _run(["ip", "netns", "add", net.netns])
    _run(
        [
            "ip",
            "link",
            "add",
            net.host_if,
            "type",
            "veth",
            "peer",
            "name",
            UPLINK,
            "netns",
            net.netns,
        ]
    )
    _run(["ip", "addr", "add", f"{net.host_ip}/30", "dev", net.host_if])
    _run(["ip", "link", "set", net.host_if, "up"])
    for argv in (
        ["ip", "link", "set", "lo", "up"],
        ["ip", "addr", "add", f"{net.node_ip}/30", "dev", UPLINK],
        ["ip", "link", "set", UPLINK, "up"],
    ):
        _run(in_netns(net, argv))
    # The node routes between its pods and the link; nothing else (no default route).
    _write_in_netns(net, "/proc/sys/net/ipv4/ip_forward", "1")
    # Pod -> Service -> pod on the same bridge must pass kube-proxy's iptables rules.
    bridge_nf = "/proc/sys/net/bridge/bridge-nf-call-iptables"
    with contextlib.suppress(NodeError):
        _write_in_netns(net, bridge_nf, "1")
    # The host sends the pod and Service ranges to the node (the API server reaches webhooks,
    # kubelet and pods that way; replies to pods return the same way).
    for cidr in (net.pod_cidr, net.service_cidr):
        _run(["ip", "route", "replace", cidr, "via", net.node_ip, "dev", net.host_if])
    return net


def teardown_network(net: NodeNet) -> None:
    """Delete the namespace: its bridge, veths, routes and iptables rules go with it."""
    if net.netns_path.exists():
        _run(["ip", "netns", "del", net.netns], check=False)
    # The host's end (and its routes) disappear with the peer; this covers a netns that was
    # removed by hand.
    if _ip_json("link", "show", net.host_if):
        _run(["ip", "link", "del", net.host_if], check=False)
    # `ip netns add` made /run/netns a mount point of its own; once no namespace is left in it
    # (no other sandbox runs), it goes too.
    with contextlib.suppress(OSError):
        if NETNS_DIR.is_dir() and not any(NETNS_DIR.iterdir()):
            subprocess.run(["umount", str(NETNS_DIR)], capture_output=True, check=False)


# --- binaries ---------------------------------------------------------------------------------


def node_source_hash() -> str:
    return source_hash(
        p
        for p in NODE_SRC.rglob("*")
        if p.is_file() and (p.suffix == ".go" or p.name in {"go.mod", "go.sum", "build.sh"})
    )


NODE_BINARIES = ("containerd", "containerd-shim-runc-v2", "ctr", "runc", "pause", "swi-probe")


def node_bin_dir() -> Path:
    return cache_root() / f"node-{node_source_hash()}"


def build_node(*, quiet: bool = False) -> Path:
    """Build containerd, runc, pause and swi-probe unless a build of the same sources is cached
    (a module the proxy refuses is named in one line, as for every Go build of the sandbox)."""
    return cached_build(
        what="the sandbox node's containerd, runc, pause and swi-probe",
        src_dir=NODE_SRC,
        cache_name=node_bin_dir().name,
        outputs=NODE_BINARIES,
        quiet=quiet,
        cold_estimate="about 8 CPU-minutes plus the module download",
    )


# --- images -----------------------------------------------------------------------------------


def write_oci_archive(binary: Path, ref: str, out: Path, argv: list[str]) -> Path:
    """A one-layer OCI image archive holding ``binary`` as ``/<name>``, tagged ``ref``.

    Plain tar and JSON (the OCI image layout is four small documents): the one Go library that
    fits (go-containerregistry) would add a module set to the node's build for what is here a
    few lines."""
    import io
    import tarfile

    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.PAX_FORMAT) as layer:
        info = tarfile.TarInfo(binary.name)
        data = binary.read_bytes()
        info.size, info.mode, info.mtime = len(data), 0o755, 0
        layer.addfile(info, io.BytesIO(data))
    layer_bytes = layer_buf.getvalue()
    layer_digest = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": argv, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": f"sandbox.node: {binary.name}"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": "sha256:" + hashlib.sha256(config_bytes).hexdigest(),
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": len(layer_bytes),
            }
        ],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": manifest["mediaType"],
                "digest": "sha256:" + hashlib.sha256(manifest_bytes).hexdigest(),
                "size": len(manifest_bytes),
                "annotations": {
                    "io.containerd.image.name": ref,
                    "org.opencontainers.image.ref.name": ref,
                },
            }
        ],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, mode="w") as archive:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            archive.addfile(info, io.BytesIO(data))

        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", json.dumps(index).encode())
        for blob in (layer_bytes, config_bytes, manifest_bytes):
            add(f"blobs/sha256/{hashlib.sha256(blob).hexdigest()}", blob)
    return out


def run_dir(state_dir: Path) -> Path:
    """The node's sockets: a short path of its own under /run, since a unix socket path holds at
    most 108 bytes and a state directory (pytest's, a bench's) can be deeper than that."""
    return Path("/run") / f"swi-{_node_id(state_dir)}"


def containerd_socket(state_dir: Path) -> Path:
    return run_dir(state_dir) / "containerd.sock"


def ctr(state_dir: Path, *args: str) -> list[str]:
    return [
        str(node_bin_dir() / "ctr"),
        "--address",
        str(containerd_socket(state_dir)),
        "--namespace",
        "k8s.io",
        *args,
    ]


def import_image(state_dir: Path, archive: Path) -> None:
    """Import an OCI (or docker-save) archive into the node's containerd, where the kubelet
    finds it (namespace k8s.io); pods then use it with ``imagePullPolicy: Never`` or
    ``IfNotPresent``. Needs the node's containerd running."""
    if not containerd_socket(state_dir).exists():
        raise NodeError(
            f"the node's containerd is not running in {state_dir}: `python -m sandbox up` first"
        )
    proc = subprocess.run(
        ctr(state_dir, "images", "import", "--no-unpack=false", str(archive)),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise NodeError(f"importing {archive} into the node failed: {proc.stderr.strip()}")


def image_names(state_dir: Path) -> set[str]:
    proc = subprocess.run(
        ctr(state_dir, "images", "ls", "-q"), capture_output=True, text=True, check=False
    )
    return set(proc.stdout.split())


def import_project_images(state_dir: Path) -> list[str]:
    """The operator and workload images built from our Dockerfiles (``make images``), if built
    for the current sources and not in the node yet, or in it from other sources (a rebuilt
    image keeps its name: what each name was imported from is remembered); returns the refs
    imported. The chart and overlays name them as a node resolves them, so pods find them
    without a registry."""
    from sandbox.images import cached_images, qualified

    archives = cached_images()
    if archives is None:
        return []
    record = state_dir / "node" / "imported-images.json"
    try:
        imported_from: dict[str, str] = json.loads(record.read_text())
    except (OSError, ValueError):
        imported_from = {}
    have = image_names(state_dir)
    imported = []
    for ref, archive in archives.items():
        if qualified(ref) not in have or imported_from.get(ref, str(archive)) != str(archive):
            import_image(state_dir, archive)
            imported.append(ref)
        imported_from[ref] = str(archive)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(imported_from))
    return imported


def import_builtin_images(state_dir: Path) -> None:
    """The pause image and the swi-probe test image, made from our own static binaries."""
    bins = node_bin_dir()
    have = image_names(state_dir)
    images = node_dir(state_dir) / "images"
    for binary, ref, argv in (
        (bins / "pause", PAUSE_IMAGE, ["/pause"]),
        (bins / "swi-probe", PROBE_IMAGE, ["/swi-probe"]),
    ):
        if ref in have:
            continue
        archive = write_oci_archive(binary, ref, images / f"{binary.name}.oci.tar", argv)
        import_image(state_dir, archive)
