"""The metrics module: route templates stay low-cardinality, each recorder counts what it says, and
the server serves the registry over HTTP. Counters are global to the process, so each test
compares a sample before and after."""

from __future__ import annotations

import asyncio
import urllib.request
from types import SimpleNamespace

import httpx
import pytest
from operator_fakes import APP, TENANT, FakeKube, FakeStore, resource  # type: ignore[import-not-found]
from prometheus_client import REGISTRY
from swi_operator import conditions, metrics
from swi_operator.cloud import Pacer
from swi_operator.errors import Reason, TransientError
from swi_operator.runtime import build_pipeline
from swi_operator.spec import ApplicationRef

APP_OBJECT = "0b6c1a52-3d8e-4f71-9a0b-5c2d7e8f9a10"
SUB = "11111111-2222-3333-4444-555555555555"


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize(
    ("url", "template"),
    [
        (
            f"https://graph.microsoft.com/v1.0/applications(appId='{APP}')?$select=id",
            "/v1.0/applications(appId={id})",
        ),
        (
            f"https://graph.microsoft.com/v1.0/applications/{APP_OBJECT}/federatedIdentityCredentials",
            "/v1.0/applications/{id}/federatedIdentityCredentials",
        ),
        (
            f"https://graph.microsoft.com/v1.0/applications/{APP_OBJECT}"
            "/federatedIdentityCredentials(name='swi-team-a-reader-x1')",
            "/v1.0/applications/{id}/federatedIdentityCredentials(name={id})",
        ),
        (
            f"https://graph.microsoft.com/v1.0/servicePrincipals(appId='{APP}')",
            "/v1.0/servicePrincipals(appId={id})",
        ),
        (
            f"https://management.azure.com/subscriptions/{SUB}/resourceGroups/team-a/providers/"
            "Microsoft.ManagedIdentity/userAssignedIdentities/reader/federatedIdentityCredentials/"
            "swi-x?api-version=2024-11-30",
            "/subscriptions/{id}/resourceGroups/{id}/providers/Microsoft.ManagedIdentity/"
            "userAssignedIdentities/{id}/federatedIdentityCredentials/{id}",
        ),
        (
            f"https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token",
            "/{id}/oauth2/v2.0/token",
        ),
        ("https://graph.microsoft.com/v1.0/team-a('x')", "/v1.0/{id}"),
    ],
)
def test_routes_are_templates_without_ids_or_names(url, template):
    assert metrics.route(url) == template
    for tenant_chosen in (APP, APP_OBJECT, SUB, TENANT, "team-a", "reader", "swi-x"):
        assert tenant_chosen not in metrics.route(url)


async def test_httpx_hooks_count_requests_by_service_route_and_status():
    answers = iter([429, 200])

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(answers), json={})

    labels = {"service": "graph", "method": "GET", "route": "/v1.0/applications(appId={id})"}
    before = {s: sample("swi_cloud_requests_total", **labels, status=s) for s in ("429", "200")}
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(answer), event_hooks=metrics.httpx_hooks("graph")
    ) as client:
        url = f"https://graph.microsoft.com/v1.0/applications(appId='{APP}')"
        await client.get(url)
        await client.get(url)
    for status in ("429", "200"):
        assert sample("swi_cloud_requests_total", **labels, status=status) == before[status] + 1
    assert sample("swi_cloud_request_duration_seconds_count", **labels) >= 2


def test_azure_hooks_count_and_time_a_response():
    url = (
        f"https://management.azure.com/subscriptions/{SUB}/resourceGroups/rg/providers/"
        "Microsoft.ManagedIdentity/userAssignedIdentities/reader"
    )
    labels = {"service": "arm", "method": "GET", "route": metrics.route(url)}
    before = sample("swi_cloud_requests_total", **labels, status="404")
    hooks = metrics.azure_hooks("arm")
    context: dict[str, float] = {}
    request = SimpleNamespace(method="GET", url=url)
    hooks["raw_request_hook"](SimpleNamespace(http_request=request, context=context))
    hooks["raw_response_hook"](
        SimpleNamespace(
            http_request=request, http_response=SimpleNamespace(status_code=404), context=context
        )
    )
    assert sample("swi_cloud_requests_total", **labels, status="404") == before + 1
    assert "swi_started" in context


async def test_pacer_records_what_each_write_waited():
    now = [0.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    pacer = Pacer(2.0, burst=1.0, clock=lambda: now[0], sleep=sleep, name="test-pacer")
    count = sample("swi_pacer_wait_seconds_count", pacer="test-pacer")
    total = sample("swi_pacer_wait_seconds_sum", pacer="test-pacer")
    for _ in range(3):
        await pacer.acquire()
    assert slept == [0.5, 1.0]
    assert sample("swi_pacer_wait_seconds_count", pacer="test-pacer") == count + 3
    assert sample("swi_pacer_wait_seconds_sum", pacer="test-pacer") == pytest.approx(total + 1.5)


async def test_tracked_slots_count_the_reconciles_in_them():
    slots = metrics.TrackedSlots(2)
    assert sample("swi_reconcile_slots") == 2
    base = sample("swi_reconcile_slots_in_use")
    async with slots:
        assert sample("swi_reconcile_slots_in_use") == base + 1
        async with slots:
            assert sample("swi_reconcile_slots_in_use") == base + 2
            assert slots.locked()
    assert sample("swi_reconcile_slots_in_use") == base


async def test_pipeline_counts_reconciles_by_result_and_reason_and_times_steps():
    store = FakeStore()
    store.add_identity(ApplicationRef(APP))
    pipeline = build_pipeline(store, FakeKube(), TENANT, None)
    step = {"step": "FederatedCredentialReady", "result": "ok"}
    steps_before = sample("swi_step_duration_seconds_count", **step)

    outcome = await pipeline.reconcile(resource())
    ready = conditions.find(outcome.status["conditions"], conditions.READY)
    assert ready is not None and ready.is_true
    ready_labels = {"operation": "reconcile", "result": "ready", "reason": ready.reason}
    assert sample("swi_reconciles_total", **ready_labels) >= 1
    assert sample("swi_step_duration_seconds_count", **step) == steps_before + 1

    store.fail_next("list", TransientError(Reason.THROTTLED, "slow down", 3.0))
    retry = {"operation": "reconcile", "result": "retry", "reason": "Throttled"}
    transient = {"step": "FederatedCredentialReady", "result": "transient"}
    before, transient_before = (
        sample("swi_reconciles_total", **retry),
        sample("swi_step_duration_seconds_count", **transient),
    )
    outcome = await pipeline.reconcile(resource(name="other"))
    assert outcome.retry is not None
    assert sample("swi_reconciles_total", **retry) == before + 1
    assert sample("swi_step_duration_seconds_count", **transient) == transient_before + 1


async def test_webhook_wrapper_counts_allowed_denied_and_failed():
    class AdmissionError(Exception):  # stands for kopf's
        pass

    @metrics.observed_webhook("test-hook", AdmissionError)
    async def handler(verdict: str) -> str:
        await asyncio.sleep(0)
        if verdict == "deny":
            raise AdmissionError("no")
        if verdict == "crash":
            raise RuntimeError("bug")
        return verdict

    before = {
        r: sample("swi_webhook_requests_total", webhook="test-hook", result=r)
        for r in (
            "allowed",
            "denied",
            "error",
        )
    }
    assert await handler("allow") == "allow"
    with pytest.raises(AdmissionError):
        await handler("deny")
    with pytest.raises(RuntimeError):
        await handler("crash")
    for result in ("allowed", "denied", "error"):
        now = sample("swi_webhook_requests_total", webhook="test-hook", result=result)
        assert now == before[result] + 1, result
    assert sample("swi_webhook_duration_seconds_count", webhook="test-hook") >= 3


def test_server_serves_the_registry_and_refuses_a_busy_port():
    server = metrics.MetricsServer.start("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as got:
            text = got.read().decode()
        assert f'swi_build_info{{version="{metrics.version()}"}} 1.0' in text
        assert "# TYPE swi_reconciles_total counter" in text
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{server.port}"):
            metrics.MetricsServer.start("127.0.0.1", server.port)
    finally:
        server.stop()
