"""``make demo``: the seed's story told on the local sandbox, one printed step at a time.

Each step prints the command a person would type and then its output, so the demo doubles as a
walkthrough. The sandbox is started in its own state directory and stopped at the end unless
``--keep`` is given (then ``eval "$(python -m sandbox env)"`` lets you keep exploring).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from sandbox import launcher

DEMO_NAMESPACE = "workload-demo"
DEMO_SERVICE_ACCOUNT = "workload-demo-service-account"
AUDIENCE = "api://AzureADTokenExchange"


class Demo:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.env: dict[str, str] = {}
        self.step_no = 0

    def step(self, title: str) -> None:
        self.step_no += 1
        print(f"\n=== {self.step_no}. {title}", flush=True)

    def run(self, *argv: str, show: bool = True, check: bool = True) -> str:
        print(f"$ {' '.join(argv)}", flush=True)
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, env={**os.environ, **self.env}, check=False
        )
        if show and proc.stdout:
            print(proc.stdout.rstrip(), flush=True)
        if proc.returncode != 0:
            print(proc.stderr.rstrip(), file=sys.stderr, flush=True)
            if check:
                raise SystemExit(f"error: `{' '.join(argv)}` failed (exit {proc.returncode})")
        return proc.stdout

    def kubectl(self, *args: str, show: bool = True) -> str:
        return self.run("kubectl", *args, show=show)


def _claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    claims: dict[str, object] = json.loads(base64.urlsafe_b64decode(payload))
    return claims


def run_demo(demo: Demo) -> None:
    demo.step(
        "Start the sandbox: a real Kubernetes control plane, Entra ID and Azure SQL emulators"
    )
    print("$ python -m sandbox up", flush=True)
    for running in launcher.up(demo.state_dir):
        print(f"{running.component.name}: ready (pid {running.pid})", flush=True)
    demo.env = launcher.environment(demo.state_dir)
    print('$ eval "$(python -m sandbox env)"', flush=True)

    demo.step("The cluster's service-account issuer, as Entra ID will fetch it (no credentials)")
    demo.kubectl("get", "--raw", "/.well-known/openid-configuration")

    demo.step("The seed's namespace and service account")
    demo.kubectl("create", "namespace", DEMO_NAMESPACE)
    demo.kubectl("create", "serviceaccount", DEMO_SERVICE_ACCOUNT, "-n", DEMO_NAMESPACE)

    demo.step(f"A projected token for audience {AUDIENCE}, as a labelled pod would receive it")
    token = demo.kubectl(
        "create",
        "token",
        DEMO_SERVICE_ACCOUNT,
        "-n",
        DEMO_NAMESPACE,
        "--audience",
        AUDIENCE,
        "--duration",
        "1h",
        show=False,
    ).strip()
    claims = _claims(token)
    print(json.dumps({k: claims[k] for k in ("iss", "sub", "aud", "exp")}, indent=2), flush=True)
    print(f"token: {token[:10]}... (not printed in full: it is a credential)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the sandbox running at the end")
    args = parser.parse_args(argv)
    state_dir = (
        Path(tempfile.mkdtemp(prefix="swi-demo-"))
        if not args.keep
        else (launcher.default_state_dir())
    )
    demo = Demo(state_dir)
    try:
        run_demo(demo)
    except launcher.SandboxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            demo.step("Clean up")
            print("$ python -m sandbox down", flush=True)
            print("stopped: " + ", ".join(launcher.down(state_dir)), flush=True)
    if args.keep:
        print(
            '\nThe sandbox is still running. Explore it with: eval "$(python -m sandbox env)"\n'
            "Stop it with: python -m sandbox down",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
