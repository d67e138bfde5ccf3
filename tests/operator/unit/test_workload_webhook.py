"""The workload labelling webhook over fakes: which workloads it labels at admission (the
reconcile's selection, a live resource the policies allow), where the label goes for each kind,
and that it never refuses a workload."""

from __future__ import annotations

import copy
from collections import Counter
from types import SimpleNamespace
from typing import Any

import kopf
import pytest
from operator_fakes import APP, resource  # type: ignore[import-not-found]
from swi_operator.errors import Reason, TransientError
from swi_operator.kube import WORKLOAD_KINDS
from swi_operator.steps.authorization import KubePolicySource
from swi_operator.steps.workloads import LABELLED_BY, USE_LABEL

NS, SA = "workload-demo", "workload-demo-service-account"
KINDS = {k.kind: k for k in WORKLOAD_KINDS}


class Reader:
    def __init__(self, allowed: bool = True) -> None:
        self.allowed = allowed
        self.calls: Counter[str] = Counter()

    async def list_policies(self) -> list[dict[str, Any]]:
        self.calls["list_policies"] += 1
        if not self.allowed:
            return []
        return [
            {
                "metadata": {"name": "demo", "generation": 1},
                "spec": {"identity": {"applicationClientId": APP}, "namespaces": {"names": [NS]}},
            }
        ]

    async def namespace_labels(self, namespace: str) -> dict[str, str]:
        return {}


def workload(kind: str, account: str = SA, labels: dict[str, str] | None = None) -> dict[str, Any]:
    template = {
        "metadata": {"labels": dict(labels or {"app": "customer-api"})},
        "spec": {"serviceAccountName": account, "containers": [{"name": "a", "image": "a"}]},
    }
    spec: dict[str, Any] = {"template": template}
    if kind == "CronJob":
        spec = {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": template}}}
    return {"kind": kind, "metadata": {"name": "w", "namespace": NS}, "spec": spec}


async def admit(
    body: dict[str, Any],
    resources: list[dict[str, Any]],
    reader: Reader | None = None,
    namespaces: tuple[str, ...] = (),
    fail: Exception | None = None,
) -> dict[str, Any]:
    """The workload as the API server would store it after the webhook's patch."""
    from swi_operator import workload_webhook

    async def list_resources(_: Any) -> list[dict[str, Any]]:
        if fail is not None:
            raise fail
        return resources

    runtime = SimpleNamespace(
        policies=KubePolicySource(reader or Reader(), True, ttl=0),
        config=SimpleNamespace(require_policy=True, namespaces=namespaces),
        kube=SimpleNamespace(list_resources=list_resources),
    )
    index = [k.kind for k in WORKLOAD_KINDS].index(body["kind"])
    patch = kopf.Patch()
    await workload_webhook.HANDLERS[index](
        body=kopf.Body(body), patch=patch, memo=kopf.Memo(runtime=runtime), namespace=NS
    )
    stored = copy.deepcopy(body)
    for fn in patch.fns:
        fn(stored)
    return stored


def template_labels(kind: str, stored: dict[str, Any]) -> dict[str, str]:
    node: Any = stored
    for key in KINDS[kind].template_path:
        node = node[key]
    return dict(node["metadata"]["labels"])


@pytest.mark.parametrize("kind", [k.kind for k in WORKLOAD_KINDS])
async def test_every_kind_gets_the_label_on_its_pod_template(kind: str) -> None:
    selecting = resource(workloads={"selector": {"matchLabels": {"app": "customer-api"}}})
    stored = await admit(workload(kind), [selecting])
    assert template_labels(kind, stored) == {"app": "customer-api", USE_LABEL: "true"}
    assert stored["metadata"]["annotations"][LABELLED_BY] == "customer-reader"


async def test_a_template_without_labels_gets_them_when_no_selector_is_set() -> None:
    body = workload("Deployment")
    del body["spec"]["template"]["metadata"]
    stored = await admit(body, [resource()])
    assert template_labels("Deployment", stored) == {USE_LABEL: "true"}


@pytest.mark.parametrize(
    ("case", "body", "resources"),
    [
        ("another service account", workload("Deployment", "other"), [resource()]),
        (
            "the selector matches the workload's metadata only",
            {
                **workload("Deployment", labels={"app": "x"}),
                "metadata": {"name": "w", "labels": {"app": "customer-api"}},
            },
            [resource(workloads={"selector": {"matchLabels": {"app": "customer-api"}}})],
        ),
        ("no resource", workload("Deployment"), []),
        (
            "the resource is being deleted",
            workload("Deployment"),
            [
                {
                    **resource(),
                    "metadata": {
                        **resource()["metadata"],
                        "deletionTimestamp": "2026-01-01T00:00:00Z",
                    },
                }
            ],
        ),
        ("an invalid resource", workload("Deployment"), [resource(serviceAccountName="Bad Name")]),
        (
            "labelled already",
            workload("Deployment", labels={USE_LABEL: "true"}),
            [resource()],
        ),
    ],
)
async def test_left_alone(case: str, body: dict[str, Any], resources: list[dict[str, Any]]) -> None:
    assert await admit(body, resources) == body, case


async def test_a_resource_no_policy_allows_labels_nothing() -> None:
    reader = Reader(allowed=False)
    body = workload("Deployment")
    assert await admit(body, [resource()], reader) == body
    assert reader.calls["list_policies"] == 1


async def test_a_namespace_the_operator_does_not_serve_is_not_read() -> None:
    reader = Reader()
    body = workload("Deployment")
    assert await admit(body, [resource()], reader, namespaces=("elsewhere",)) == body
    assert reader.calls["list_policies"] == 0


async def test_a_failure_to_decide_admits_the_workload_unlabelled() -> None:
    body = workload("Deployment")
    failure = TransientError(Reason.KUBERNETES_UNAVAILABLE, "the API server is away")
    assert await admit(body, [resource()], fail=failure) == body
