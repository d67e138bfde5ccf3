"""kopf wiring, and the only module that imports kopf. Everything here is thin on purpose.

* start-up: kopf settings (our finalizer and annotation names under sqlidentity.io, Event
  posting, peering), the ``Runtime`` with every client, the drift loop;
* create / update (of the spec) / resume: ``Pipeline.reconcile`` under the resource's lock, its
  status merged through kopf's patch, its Events posted, a transient failure re-raised as
  ``kopf.TemporaryError`` with the service's Retry-After or a capped backoff;
* delete: ``Pipeline.finalize``; transient failures are retried until ``--deletion-timeout``,
  after which the finalizer lets go and an Event says what may be left behind;
* any SqlIdentityPolicy event: the policy cache is dropped and ``PolicyReview`` looks at the fleet
  (prompt revocation, policy status), and the sweep (``sweep.py``) runs;
* a SqlWorkloadIdentity gone from the API (finalizer or not): the sweep runs;
* a Namespace's labels changed: the policy review and the sweep run (policies select by label);
* a SqlIdentityPool created, deleted or changed: the pools are read again, the pool status runs
  (and moves resources off removed members), and the sweep runs.

Run by ``python -m swi_operator`` (see ``__main__``), or by kopf itself
(``kopf run -m swi_operator.handlers``, configured from the environment), as the tests do.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import os
import secrets
import signal
import time
from typing import Any

import kopf

from swi_operator import config as config_module
from swi_operator import heap, peers, readiness
from swi_operator.errors import TransientError, backoff_delay
from swi_operator.events import CLEANED_UP
from swi_operator.kube import (
    GROUP,
    PLURAL,
    POLICY_PLURAL,
    POOL_PLURAL,
    VERSION,
    in_cluster_server,
)
from swi_operator.metrics import MetricsServer
from swi_operator.naming import OPERATOR_NAME
from swi_operator.policy_review import admission_changed
from swi_operator.runtime import FINALIZER, Runtime
from swi_operator.steps import Event

RESOURCE = (GROUP, VERSION, PLURAL)
LEAVE_SETTLE_S = 0.5
TAKE_SIGNALS_AFTER_S = 1.0
_LEAVING: set[asyncio.Task[None]] = set()  # a task the loop must not garbage-collect

log = logging.getLogger(__name__)


def configure(
    settings: kopf.OperatorSettings, config: config_module.Config, priority: int = 0
) -> None:
    settings.persistence.finalizer = FINALIZER
    # kopf's state in status, which namespace teams cannot write: in annotations a tenant could
    # patch the diff-base and take its resource out of the operator's view (issue 18).
    settings.persistence.progress_storage = kopf.StatusProgressStorage(
        field="status.kopf.progress", touch_field="status.kopf.dummy"
    )
    settings.persistence.diffbase_storage = kopf.StatusDiffBaseStorage(
        field="status.kopf.last-handled-configuration"
    )
    # Our Events are posted by swi_operator.events; kopf's own (handler failures) follow suit.
    settings.posting.level = config.posting_level
    settings.posting.reporting_component = OPERATOR_NAME
    settings.posting.event_name_prefix = "swi-"
    settings.peering.standalone = config.peering is None
    if config.peering is not None:
        # One priority per replica, the oldest highest (peers.py): kopf pauses every replica
        # that shares its priority with another; a short lifetime lets a killed one go quickly.
        settings.peering.name = config.peering
        settings.peering.priority = priority
        settings.peering.lifetime = peers.PEERING_LIFETIME_S
    # A watch that silently stalls would stall the operator: make the server end it regularly.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330


def _runtime(memo: kopf.Memo) -> Runtime:
    runtime: Runtime = memo["runtime"]
    return runtime


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = memo.get("config")
    if config is None:  # started by `kopf run` rather than by our __main__
        config, _args = config_module.load([])
    priority = peers.replica_priority(time.time(), secrets.randbelow(1_000_000))
    configure(settings, config, priority)
    if config.metrics_port:
        try:
            memo["metrics"] = MetricsServer.start(config.metrics_address, config.metrics_port)
        except OSError as exc:
            raise kopf.PermanentError(str(exc)) from exc
    runtime = Runtime.start(config, memo.get("peer_identity"), priority)
    memo["runtime"] = runtime
    # The webhook server (webhooks.py) says when it listens; its start-up may run before this.
    ready = readiness.of(
        memo, config.injection_webhook or config.policy_webhook or config.workload_webhook
    )
    if config.readiness_endpoint is not None:
        memo["readiness_server"] = asyncio.create_task(
            readiness.serve(config.readiness_endpoint, ready), name="swi-readiness"
        )
    if config.install_crds is not None:
        await runtime.install_crds(config.install_crds)
    memo["drift"] = asyncio.create_task(runtime.drift.run(), name="swi-drift")
    memo["policy_review"] = asyncio.create_task(
        runtime.policy_review.run(), name="swi-policy-review"
    )
    memo["sweep"] = asyncio.create_task(runtime.sweep.run(), name="swi-sweep")
    memo["pool_status"] = asyncio.create_task(runtime.pool_status.run(), name="swi-pool-status")
    memo["heap"] = asyncio.create_task(heap.trim_periodically(), name="swi-heap")
    stop_flag: asyncio.Event | None = memo.get("stop_flag")  # given by __main__ with peering
    if stop_flag is not None and config.peering is not None:
        memo["signals"] = asyncio.create_task(_take_signals(runtime, stop_flag), name="swi-signals")
    ready.started = True
    log.info("operator started: %s", runtime.config.redacted())
    # The sandbox launcher waits for a line starting with READY on stdout.
    print(f"READY {OPERATOR_NAME} drift_interval={config.drift_interval:g}s", flush=True)


async def _take_signals(runtime: Runtime, stop_flag: asyncio.Event) -> None:
    """SIGTERM and SIGINT drain first (``_leave``). kopf installs its own handlers for them in
    the same loop iteration as the start-up handlers begin, so ours replace them a moment later
    (a stop within that moment is kopf's, without the drain)."""
    await asyncio.sleep(TAKE_SIGNALS_AFTER_S)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _leave, runtime, stop_flag)
    log.debug("SIGTERM and SIGINT drain before the operator stops")


def _leave(runtime: Runtime, stop_flag: asyncio.Event) -> None:
    """A stop was asked for: drain (peers.Drain), then let kopf stop, which leaves the peering
    object; the next replica resumes only once nothing here writes any more."""

    async def leave() -> None:
        log.info("stopping: no new work; waiting for the running handlers and cycles")
        if not await runtime.drain.drained():
            log.warning("stopping with work still running after %.0f s", peers.DRAIN_TIMEOUT_S)
        await asyncio.sleep(LEAVE_SETTLE_S)  # kopf's status patch after the last handler
        stop_flag.set()

    if not runtime.drain.draining:
        task = asyncio.get_running_loop().create_task(leave(), name="swi-leave")
        _LEAVING.add(task)
        task.add_done_callback(_LEAVING.discard)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The pod's service account, at the address the kubelet gives every pod (kopf's default
    names kubernetes.default.svc, which needs cluster DNS); else KUBECONFIG as it is now (not
    when a library was imported)."""
    info = kopf.login_with_service_account(**kwargs)
    if info is None:
        return kopf.login_with_kubeconfig(**kwargs)
    server = in_cluster_server(os.environ)
    return dataclasses.replace(info, server=server) if server else info


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    for key in (
        "drift",
        "policy_review",
        "sweep",
        "pool_status",
        "heap",
        "readiness_server",
        "signals",
    ):
        task: asyncio.Task[None] | None = memo.get(key)
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):  # its failures were logged where they happened
                await task
    if "runtime" in memo:
        await _runtime(memo).close()
    if "metrics" in memo:
        memo["metrics"].stop()


def _retry(error: TransientError, attempt: int, cap: float) -> kopf.TemporaryError:
    delay = error.delay if error.delay is not None else backoff_delay(attempt, cap)
    return kopf.TemporaryError(f"{error.reason}: {error.message}", delay=delay)


@kopf.on.resume(*RESOURCE, id="reconcile-resume")
@kopf.on.create(*RESOURCE, id="reconcile-create")
@kopf.on.update(*RESOURCE, field="spec", id="reconcile-update")
async def reconcile(
    body: kopf.Body, patch: kopf.Patch, retry: int, memo: kopf.Memo, **_: Any
) -> None:
    state = _runtime(memo)
    async with state.drain.work():  # kopf writes the status patch right after this returns
        state.drift.handling(str(body.metadata.uid))
        async with (
            state.reconcile_slots.hold(str(body.metadata.namespace)),
            state.resource_locks.hold(str(body.metadata.uid)),
        ):
            outcome = await state.pipeline.reconcile(body)
        if outcome.changed:  # a resume pass over a settled fleet writes nothing (bench/fleet.py)
            patch.status.update(outcome.status)
            if admission_changed(body.status, outcome.status):
                state.policy_review.recount()
            if (body.spec.get("identity") or {}).get("poolName"):
                state.pool_status.recount()  # the pool's counts (pool_status.py)
        await state.events.post(body, outcome.events)
    if outcome.retry is not None:
        raise _retry(outcome.retry, retry, state.config.retry_backoff_max)


@kopf.on.event(GROUP, VERSION, POLICY_PLURAL, id="policy-changed")
async def policy_changed(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """A policy created, deleted or its spec changed; not the review's own status writes."""
    if "runtime" not in memo:
        return
    state = _runtime(memo)
    if state.policy_specs.changed(event):
        state.policies.invalidate()
        state.policy_review.changed()
        state.sweep.changed()


@kopf.on.event(GROUP, VERSION, POOL_PLURAL, id="pool-changed")
async def pool_changed(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """A pool created, deleted or its spec changed (its members): the pools are read again, the
    pool status moves resources off removed members, and the sweep runs (pool_status.py)."""
    if "runtime" not in memo:
        return
    state = _runtime(memo)
    if state.pool_specs.changed(event):
        state.pools.invalidate()
        state.pool_status.changed()
        state.sweep.changed()


@kopf.on.event("", "v1", "namespaces", id="namespace-labels")
async def namespace_labels_changed(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """Policies may select namespaces by label: a label change is reviewed at once (revoking, or
    allowing), not at the next drift cycle (issue 18)."""
    if "runtime" in memo and _runtime(memo).namespace_labels.changed(event):
        state = _runtime(memo)
        state.policy_review.changed()
        state.sweep.changed()


def _deleted(type: str | None, **_: Any) -> bool:
    return type == "DELETED"


# Filtered by kopf before it invokes anything: invoking (and logging) a handler for each of the
# three or so events of every resource was a twentieth of the operator's CPU while onboarding.
@kopf.on.event(*RESOURCE, id="resource-gone", when=_deleted)
async def resource_gone(memo: kopf.Memo, **_: Any) -> None:
    """A resource left the API (with or without our finalizer): sweep what it may have left."""
    _runtime(memo).sweep.changed()
    _runtime(memo).policy_review.recount()
    _runtime(memo).pool_status.recount()


@kopf.on.delete(*RESOURCE, id="finalize")
async def finalize(
    body: kopf.Body, retry: int, runtime: dt.timedelta, memo: kopf.Memo, **_: Any
) -> None:
    state = _runtime(memo)
    async with state.drain.work():
        state.drift.handling(str(body.metadata.uid))
        async with (
            state.reconcile_slots.hold(str(body.metadata.namespace)),
            state.resource_locks.hold(str(body.metadata.uid)),
        ):
            outcome = await state.pipeline.finalize(body)
        await state.events.post(body, outcome.events, folded=CLEANED_UP)
    if outcome.retry is None:
        state.drift.forget(str(body.metadata.uid))
        return
    elapsed = runtime.total_seconds()  # since the first attempt of this handler
    if elapsed < state.config.deletion_timeout:
        raise _retry(outcome.retry, retry, state.config.retry_backoff_max)
    abandoned = Event(
        "Warning",
        "CleanupAbandoned",
        f"clean-up still failing after {elapsed:.0f}s ({outcome.retry.message}); releasing the "
        "resource: check the identity's federated credentials and database user by hand",
    )
    async with state.drain.work():
        await state.events.post(body, [abandoned])
