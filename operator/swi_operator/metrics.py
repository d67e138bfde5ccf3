"""Prometheus metrics: every metric the operator exports, the small helpers that record them, and
the HTTP server that serves them on a port of their own (``--metrics-port``).

Built on ``prometheus_client``, the Prometheus project's own Python client: its text exposition
is what Prometheus and the ServiceMonitor scrape, and it brings the process collectors (CPU,
memory, open files) for free. The metrics live in its default registry, so one scrape also
shows ``process_*`` and ``python_*``.

Labels are bounded on purpose: a route is a template (``applications(appId={id})``, never an
object id), a reason is one of ``errors.Reason`` or a step's own constants, a webhook is a kopf
handler id, a pacer is one of the few made at start-up. Nothing a tenant names (resources,
service accounts) becomes a label value, and no secret or token ever does.

Where each is recorded: ``pipeline`` (reconciles, step durations), ``cloud.graph``, ``cloud.arm``
and ``cloud.exchange`` (HTTP requests, by their clients' response hooks), ``cloud.Pacer`` (time
waited), ``runtime`` (reconcile slots, via ``TrackedSlots``), ``steps.verification`` (probes),
the webhook handlers (``observed_webhook``) and ``drift`` (cycle duration).
"""

from __future__ import annotations

import asyncio
import functools
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, ParamSpec, TypeVar
from urllib.parse import urlsplit
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics, start_http_server

from swi_operator import version

P = ParamSpec("P")
R = TypeVar("R")

# No *_created series next to every counter: a restart shows in process_start_time_seconds.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Cloud calls last from milliseconds (a cached Graph read) to a 30 s timeout; reconciles and
# drift cycles up to minutes (a fleet of a thousand at a restart).
_CALL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LONG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

BUILD_INFO = Gauge("swi_build_info", "the operator's version (always 1)", ["version"])
RECONCILES = Counter(
    "swi_reconciles",
    "reconcile and clean-up passes over a SqlWorkloadIdentity, by what they ended with "
    "(result: ready, not_ready, retry for reconcile; done, retry for finalize) and the reason "
    "of the Ready condition or of the failure",
    ["operation", "result", "reason"],
)
STEP_DURATION = Histogram(
    "swi_step_duration_seconds",
    "time one reconcile step took, by its condition and how it ended (ok, transient, permanent)",
    ["step", "result"],
    buckets=_LONG_BUCKETS,
)
CLOUD_REQUESTS = Counter(
    "swi_cloud_requests",
    "HTTP requests to Microsoft Graph, ARM and Entra's token service, by service, method, route "
    "template and HTTP status (429 when throttled)",
    ["service", "method", "route", "status"],
)
CLOUD_REQUEST_DURATION = Histogram(
    "swi_cloud_request_duration_seconds",
    "time from sending a cloud request to its response, by service, method and route template",
    ["service", "method", "route"],
    buckets=_CALL_BUCKETS,
)
PACER_WAIT = Histogram(
    "swi_pacer_wait_seconds",
    "time a write waited for its turn in a write pacer (Graph's tenant quota, ARM's per "
    "subscription and per identity)",
    ["pacer"],
    buckets=(0.0, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
RECONCILE_SLOTS = Gauge("swi_reconcile_slots", "reconciles allowed at once (--max-reconciles)")
RECONCILE_SLOTS_IN_USE = Gauge("swi_reconcile_slots_in_use", "reconciles running now")
VERIFIED_PROBES = Counter(
    "swi_verified_probes",
    "end-to-end probes of the Verified condition, by status (True, False, or Unknown when the "
    "probe itself failed transiently) and reason",
    ["status", "reason"],
)
WEBHOOK_REQUESTS = Counter(
    "swi_webhook_requests",
    "admission requests handled, by webhook handler and result (allowed, denied, error)",
    ["webhook", "result"],
)
WEBHOOK_DURATION = Histogram(
    "swi_webhook_duration_seconds",
    "time the operator's admission handler took, by webhook handler",
    ["webhook"],
    buckets=_CALL_BUCKETS,
)
SERVICE_ACCOUNT_READS = Counter(
    "swi_webhook_service_account_reads",
    "service accounts the pod injection webhook read, by source: cache (its watch-fed cache), "
    "api (a live GET: a miss, an account without the client id, or a cache not following), "
    "cache_after_401 (the live GET refused this replica's own token: the cache's view used)",
    ["source"],
)
DRIFT_CYCLE_DURATION = Histogram(
    "swi_drift_cycle_duration_seconds",
    "time one drift check of every served resource took",
    buckets=_LONG_BUCKETS,
)
DRIFT_RESOURCES = Gauge("swi_drift_resources", "resources the last drift check listed")

# --- routes --------------------------------------------------------------------------------------

# Path segments kept as they are; any other becomes {id}, so a route is a template whatever the
# ids, names and tenants in the URL. OData keys keep their key name: applications(appId={id}).
_KNOWN_SEGMENTS = frozenset(
    {
        "v1.0",
        "beta",
        "applications",
        "servicePrincipals",
        "federatedIdentityCredentials",
        "subscriptions",
        "resourceGroups",
        "resourcegroups",
        "providers",
        "Microsoft.ManagedIdentity",
        "userAssignedIdentities",
        "oauth2",
        "v2.0",
        "token",
        "$count",
    }
)
_ODATA_KEY = re.compile(r"^(?P<segment>[^()]+)\((?P<keys>.*)\)$")
_ODATA_KEY_NAME = re.compile(r"([A-Za-z]+)=")


def route(url: str) -> str:
    """The URL's path as a template: ids, names and tenants replaced by ``{id}``."""
    parts = []
    for segment in urlsplit(url).path.strip("/").split("/"):
        if not segment:
            continue
        if segment in _KNOWN_SEGMENTS:
            parts.append(segment)
            continue
        keyed = _ODATA_KEY.match(segment)
        if keyed and keyed["segment"] in _KNOWN_SEGMENTS:
            keys = ",".join(f"{name}={{id}}" for name in _ODATA_KEY_NAME.findall(keyed["keys"]))
            parts.append(f"{keyed['segment']}({keys or '{id}'})")
            continue
        parts.append("{id}")
    return "/" + "/".join(parts)


def observe_request(
    service: str, method: str, url: str, status: int | str, seconds: float | None
) -> None:
    """One HTTP request to a cloud service and the status of its answer."""
    template = route(url)
    CLOUD_REQUESTS.labels(service, method.upper(), template, str(status)).inc()
    if seconds is not None:
        CLOUD_REQUEST_DURATION.labels(service, method.upper(), template).observe(seconds)


def httpx_hooks(service: str) -> dict[str, list[Callable[[Any], Awaitable[None]]]]:
    """``event_hooks`` for an ``httpx.AsyncClient``: each response counted under ``service``."""

    async def on_request(request: Any) -> None:
        request.extensions["swi_started"] = time.perf_counter()

    async def on_response(response: Any) -> None:
        request = response.request
        started = request.extensions.get("swi_started")
        seconds = time.perf_counter() - started if started is not None else None
        observe_request(service, request.method, str(request.url), response.status_code, seconds)

    return {"request": [on_request], "response": [on_response]}


def azure_hooks(service: str) -> dict[str, Callable[[Any], None]]:
    """azure-core's ``raw_request_hook`` and ``raw_response_hook`` (keywords of any Azure SDK
    client): each response counted under ``service``, timed from the request hook."""

    def on_request(pipeline_request: Any) -> None:
        pipeline_request.context["swi_started"] = time.perf_counter()

    def on_response(pipeline_response: Any) -> None:
        request = pipeline_response.http_request
        started = pipeline_response.context.get("swi_started")
        seconds = time.perf_counter() - started if started is not None else None
        status = pipeline_response.http_response.status_code
        observe_request(service, request.method, request.url, status, seconds)

    return {"raw_request_hook": on_request, "raw_response_hook": on_response}


# --- the rest ------------------------------------------------------------------------------------


class TrackedSlots(asyncio.Semaphore):
    """The reconcile slots: an ``asyncio.Semaphore`` whose holders are counted in a gauge."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        RECONCILE_SLOTS.set(value)

    async def acquire(self) -> Literal[True]:
        acquired = await super().acquire()
        RECONCILE_SLOTS_IN_USE.inc()
        return acquired

    def release(self) -> None:
        super().release()
        RECONCILE_SLOTS_IN_USE.dec()


@contextmanager
def timed(histogram: Histogram, *labels: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        (histogram.labels(*labels) if labels else histogram).observe(time.perf_counter() - started)


def observed_webhook(
    webhook: str, refusal: type[Exception]
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Wrap an admission handler: its duration, and whether it allowed, denied (it raised
    ``refusal``: kopf's ``AdmissionError``, passed in so that this module needs no kopf) or
    failed."""

    def wrap(handler: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(handler)
        async def observed(*args: P.args, **kwargs: P.kwargs) -> R:
            result = "error"
            try:
                with timed(WEBHOOK_DURATION, webhook):
                    returned = await handler(*args, **kwargs)
                result = "allowed"
                return returned
            except refusal:
                result = "denied"
                raise
            finally:
                WEBHOOK_REQUESTS.labels(webhook, result).inc()

        return observed

    return wrap


class MetricsServer:
    """prometheus_client's HTTP server on its own thread, on ``address``:``port``."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    @classmethod
    def start(cls, address: str, port: int) -> MetricsServer:
        """Serve the default registry; an address in use raises ``OSError`` naming it."""
        try:
            server, thread = start_http_server(port, addr=address)
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot serve metrics on {address}:{port}: {exc.strerror}"
            ) from exc
        BUILD_INFO.labels(version()).set(1)
        return cls(server, thread)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
