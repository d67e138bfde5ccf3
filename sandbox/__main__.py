"""``python -m sandbox up|down|status|env|build|images``: the sandbox from a shell.

Typical use::

    python -m sandbox up             # start everything, return when ready
    eval "$(python -m sandbox env)"  # KUBECONFIG, SANDBOX_CA, Azure endpoints, PATH with kubectl
    kubectl get ns
    python -m sandbox ctl entra latency 'graph.*' 0.1   # test controls of the emulators
    python -m sandbox --state-dir .sandbox-b up --cloud-of .sandbox   # a second cluster
    python -m sandbox down

Every failure prints one line starting with ``error:`` that says what to do, and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sandbox import launcher, node


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sandbox",
        description="The local stand-in for AKS, Entra ID and Azure SQL.",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"where the sandbox keeps its CA, logs and data (default: ${launcher.STATE_DIR_ENV} "
        f"or {launcher.DEFAULT_STATE_DIR})",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the sandbox in the background; return when ready")
    up.add_argument(
        "--only",
        action="append",
        choices=[c.name for c in launcher.ALL_COMPONENTS],
        help="start only this component (repeatable)",
    )
    up.add_argument(
        "--operator",
        action="store_true",
        help="also run the operator (python -m swi_operator) against the sandbox, in background",
    )
    up.add_argument(
        "--no-node",
        action="store_true",
        help="without the node (containerd, kubelet, kube-proxy; needs root): pods stay Pending",
    )
    up.add_argument(
        "--cloud-of",
        type=Path,
        metavar="DIR",
        help="a second cluster: a control plane of its own in --state-dir, with the Entra and "
        "SQL emulators of the sandbox in DIR (which must be up); no node",
    )
    up.add_argument(
        "--timeout",
        type=float,
        default=launcher.READY_TIMEOUT_S,
        help="seconds to wait for each component to be ready",
    )
    sub.add_parser("down", help="stop everything the sandbox started")
    sub.add_parser("status", help="show each component, its pid and address")
    sub.add_parser("env", help="print `export NAME=value` lines for a shell (eval them)")
    build = sub.add_parser(
        "build", help="build (or find cached) the control plane, kubectl and the node's programs"
    )
    build.add_argument(
        "--tools",
        action="store_true",
        help="also the CLI tools only the tests use (helm, gitops-health)",
    )
    sub.add_parser(
        "images",
        help="build (or find cached) the operator and workload images from their Dockerfiles; "
        "print `ref archive` lines",
    )
    sub.add_parser(
        "install",
        help="install the operator on the running sandbox with its Helm chart, as on a cluster "
        "(image from `make images`, the operator's own federated credential, no secret)",
    )
    ctl = sub.add_parser(
        "ctl",
        help="test controls of an emulator: latency, injected faults, request logs "
        "(`python -m sandbox ctl entra --help`, `python -m sandbox ctl azuresql --help`)",
    )
    ctl.add_argument("emulator", choices=["entra", "azuresql"])
    ctl.add_argument("rest", nargs=argparse.REMAINDER, help="the emulator's ctl command")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    state_dir = (args.state_dir or launcher.default_state_dir()).resolve()
    try:
        return _run(args, state_dir)
    except launcher.SandboxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace, state_dir: Path) -> int:
    if args.command == "ctl":
        # Each emulator owns its controls; this only forwards with the state directory filled in.
        if args.emulator == "entra":
            from sandbox.entra.__main__ import main as emulator_main
        else:
            from sandbox.azuresql.__main__ import main as emulator_main
        return emulator_main(["ctl", "--state-dir", str(state_dir), *args.rest])
    if args.command == "build":
        print(launcher.build_controlplane())
        try:
            print(node.build_node())
        except node.NodeError as exc:
            raise launcher.SandboxError(str(exc)) from None
        if args.tools:
            from sandbox.tools import gitops_health_binary, helm_binary

            print(helm_binary())
            print(gitops_health_binary())
        return 0
    if args.command == "images":
        from sandbox import images

        for ref, archive in images.ensure_images().items():
            print(f"{ref} {archive}")
        return 0
    if args.command == "install":
        from sandbox import install

        install.install(state_dir)
        return 0
    if args.command == "up":
        if args.cloud_of is not None:
            launcher.attach(state_dir, args.cloud_of)
        if args.only and launcher.cloud_of(state_dir) is not None:
            # What a second cluster cannot run is refused by `up`, not silently left out.
            comps = [c for c in launcher.ALL_COMPONENTS if c.name in args.only]
        else:
            comps = [
                c
                for c in launcher.components_of(state_dir)
                if (not args.only or c.name in args.only)
                and not (args.no_node and c in launcher.NODE_COMPONENTS)
            ]
        if args.operator:
            comps.append(launcher.OPERATOR)
        for running in launcher.up(state_dir, comps, timeout=args.timeout):
            print(f"{running.component.name}: ready (pid {running.pid}) {_address(running)}")
        print(f'sandbox is up; state in {state_dir}. Use it with: eval "$(python -m sandbox env)"')
        return 0
    if args.command == "down":
        stopped = launcher.down(state_dir)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    if args.command == "status":
        rows = launcher.status(state_dir)
        for running in rows:
            if running.alive:
                state = f"running (pid {running.pid}) {_address(running)}"
            elif running.pid is not None:
                state = f"dead (pid {running.pid} is gone); `python -m sandbox up` restarts it"
            else:
                state = "stopped"
            print(f"{running.component.name}: {state}")
        return 0 if all(r.alive for r in rows) else 1
    if args.command == "env":
        if not any(r.alive for r in launcher.status(state_dir)):
            raise launcher.SandboxError(
                f"the sandbox in {state_dir} is not running: start it with `python -m sandbox up`"
            )
        sys.stdout.write(launcher.export_lines(launcher.environment(state_dir)))
        return 0
    raise AssertionError(args.command)


def _address(running: launcher.Running) -> str:
    info = running.info
    for key in ("server", "url"):
        if key in info:
            return str(info[key])
    servers = info.get("servers")
    if isinstance(servers, dict):
        return " ".join(
            f"{name}={spec.get('server')}"
            for name, spec in servers.items()
            if isinstance(spec, dict)
        )
    return ""


if __name__ == "__main__":
    sys.exit(main())
