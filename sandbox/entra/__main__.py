"""``python -m sandbox.entra serve|ctl``: run the Entra emulator, or steer a running one.

``serve`` follows the sandbox service contract (see server.py): it prints ``READY url=...`` once
listening and writes ``DIR/entra.json``; start-up errors are one ``error:`` line on stderr and
exit status 2. ``ctl`` calls the admin API (see ctl.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sandbox.entra import ctl
from sandbox.entra.state import DEFAULT_WORLD, DEMO_APP


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sandbox.entra",
        description="Entra ID emulator: token service, Microsoft Graph and ARM managed identities.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="serve HTTPS on 127.0.0.1 until SIGTERM")
    run.add_argument("--state-dir", type=Path, required=True)
    run.add_argument("--world", type=Path, default=DEFAULT_WORLD)
    run.add_argument("--port", type=int, default=0, help="0 picks a free port")
    run.add_argument("--snapshot", type=Path, default=None, help="keep state in this JSON file")
    run.add_argument(
        "--san",
        action="append",
        default=[],
        help="an extra DNS name for the serving certificate (repeatable)",
    )
    run.add_argument(
        "--demo-app", default=DEMO_APP, help="the app exported as AZ_CLIENT_ID/AZ_CLIENT_SECRET"
    )
    ctl.add_arguments(sub.add_parser("ctl", help="call the admin API of a running emulator"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from sandbox.entra.server import ServeOptions, serve  # ctl needs none of the server

        return serve(
            ServeOptions(
                state_dir=args.state_dir.resolve(),
                world=args.world,
                port=args.port,
                snapshot=args.snapshot,
                extra_sans=args.san,
                demo_app=args.demo_app,
            )
        )
    try:
        print(json.dumps(ctl.run(args), indent=2))
    except ctl.CtlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
