"""``swi-operator`` / ``python -m swi_operator``: run the operator against the current kubeconfig.

Configuration is validated before anything connects; a bad setting prints one ``error:`` line
naming it and exits 2. See ``swi-operator --help`` for every flag and its environment variable.

Run from a command line (``argv`` None), the process first starts itself again on jemalloc with
``heap.ALLOCATOR_ENV``, unless whoever started it chose an allocator (``heap.ensure_allocator``;
the image sets them itself).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import sys

from swi_operator import config as config_module
from swi_operator import heap


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        heap.ensure_allocator()
    try:
        config, args = config_module.load(argv)
    except config_module.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if config.injection_webhook or config.policy_webhook or config.workload_webhook:
        from swi_operator.webhooks import WebhookConfigError, WebhookSettings

        try:  # the webhook server's settings (SWI_WEBHOOK_*), read again at its start
            WebhookSettings.from_env()
        except WebhookConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    import kopf
    import uvloop

    from swi_operator import handlers  # noqa: F401  (registers the handlers)

    if config.injection_webhook:
        from swi_operator import webhooks  # noqa: F401  (registers the pod injection webhook)
    if config.policy_webhook:
        from swi_operator import policy_webhook  # noqa: F401  (the SqlIdentityPolicy check)
    if config.workload_webhook:
        from swi_operator import workload_webhook  # noqa: F401  (labels workloads at admission)

    # kopf's JSON formatter (python-json-logger, a dependency of kopf's) for --log-format json:
    # one object per line with the resource's namespace and name as fields of their own.
    log_format = kopf.LogFormat.JSON if config.log_format == "json" else kopf.LogFormat.FULL
    kopf.configure(
        verbose=args.verbose, log_format=log_format, log_prefix=log_format != kopf.LogFormat.JSON
    )
    for chatty in ("azure", "httpx"):  # one log line per HTTP request otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    # Our own peer identity, so that the drift loop can recognise this replica among the peers.
    identity = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"
    # With peering, SIGTERM drains before kopf stops and leaves the peering (handlers.start).
    stop_flag = asyncio.Event()
    if argv is None:  # a process of its own: everything above is loaded, out of the way for good
        heap.tune_collector()
        # libuv's event loop (uvloop, which kopf's own CLI picks when installed): its transports
        # and TLS are compiled, not asyncio's Python; kopf.run() makes its loop from the policy.
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    kopf.run(
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        standalone=config.peering is None,
        peering_name=config.peering,
        identity=identity,  # type: ignore[arg-type]  # kopf's NewType over str, not exported
        liveness_endpoint=config.liveness_endpoint,
        stop_flag=stop_flag,
        memo=kopf.Memo(config=config, peer_identity=identity, stop_flag=stop_flag),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
