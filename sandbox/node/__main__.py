"""``python -m sandbox.node run containerd|kubelet|kube-proxy --state-dir DIR``: one of the node's
programs as a launcher component (prints ``READY ...`` once usable, stops it on SIGTERM);
``python -m sandbox.node build`` builds (or finds cached) its runtime binaries;
``python -m sandbox.node leftovers --state-dir DIR`` lists what a stopped node left behind.

Failures print one ``error: ...`` line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from sandbox.node import (
    NodeError,
    build_node,
    import_builtin_images,
    import_project_images,
    load_plan,
    require_root,
)
from sandbox.node.runtime import COMPONENTS, command, info, leftovers, ready

READY_TIMEOUT_S = 240.0


def _run(name: str, state_dir: Path) -> int:
    require_root()
    net = load_plan(state_dir)
    if net is None:
        raise NodeError(
            f"no node network planned in {state_dir}: start it with `python -m sandbox up`"
        )
    build_node(quiet=True)
    argv, env = command(state_dir, name, net)
    child = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL)
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready(state_dir, name, net):
        if child.poll() is not None:
            raise NodeError(
                f"{name} exited with code {child.returncode} before it was ready (see its log)"
            )
        if stopping:
            return _wait(child)
        if time.monotonic() > deadline:
            child.terminate()
            raise NodeError(f"{name} was not ready after {READY_TIMEOUT_S:.0f}s (see its log)")
        time.sleep(0.5)
    if name == "containerd":
        import_builtin_images(state_dir)
        import_project_images(state_dir)
    details = info(state_dir, name, net)
    (state_dir / f"{name}.json").write_text(json.dumps(details) + "\n")
    print(f"READY {name} {details['url']}", flush=True)
    return _wait(child)


def _wait(child: subprocess.Popen[bytes]) -> int:
    try:
        code = child.wait(timeout=None)
    except KeyboardInterrupt:
        child.terminate()
        code = child.wait()
    return 0 if code in (0, -signal.SIGTERM) else code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.node")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one of the node's programs as a sandbox component")
    run.add_argument("component", choices=COMPONENTS)
    run.add_argument("--state-dir", type=Path, required=True)
    sub.add_parser("build", help="build (or find cached) containerd, runc, pause, swi-probe")
    left = sub.add_parser("leftovers", help="list what of a stopped node is still on the machine")
    left.add_argument("--state-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            print(build_node())
            return 0
        if args.command == "leftovers":
            found = leftovers(args.state_dir.resolve())
            print("\n".join(found) if found else "nothing")
            return 1 if found else 0
        return _run(args.component, args.state_dir.resolve())
    except NodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
