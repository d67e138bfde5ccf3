"""The reconcile pipeline and its steps over in-memory fakes: what gets written, when, and what the
status and Events say."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
from operator_fakes import (  # type: ignore[import-not-found]
    APP,
    ISSUER,
    MI_ID,
    OTHER_APP,
    TENANT,
    FakeKube,
    FakeStore,
    resource,
)
from swi_operator import conditions
from swi_operator.cloud import FederatedCredential
from swi_operator.errors import PermanentError, Reason, TransientError
from swi_operator.kube import Pod
from swi_operator.naming import credential_name, subject_for
from swi_operator.pipeline import Outcome, Pipeline
from swi_operator.runtime import build_pipeline
from swi_operator.spec import ApplicationRef, parse_managed_identity_id
from swi_operator.steps.service_account import CLIENT_ID, CREATED_BY, MANAGED, OWNER, TENANT_ID
from swi_operator.steps.workloads import LABELLED_BY, USE_LABEL

NS, SA = "workload-demo", "workload-demo-service-account"
APP_REF = ApplicationRef(APP)
MI_REF = parse_managed_identity_id(MI_ID)
assert MI_REF is not None


@pytest.fixture
def store() -> FakeStore:
    s = FakeStore()
    for ref in (APP_REF, ApplicationRef(OTHER_APP), MI_REF):
        s.add_identity(ref)
    return s


@pytest.fixture
def kube() -> FakeKube:
    return FakeKube()


@pytest.fixture
def pipeline(store: FakeStore, kube: FakeKube) -> Pipeline:
    return build_pipeline(store, kube, TENANT, None)


def applied(body: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
    """``body`` after its status patch, as the next reconcile would read it."""
    return {**body, "status": {**body.get("status", {}), **outcome.status}}


def condition(outcome: Outcome, type_: str) -> conditions.Condition:
    found = conditions.find(outcome.status["conditions"], type_)
    assert found is not None, type_
    return found


def reasons(outcome: Outcome) -> list[str]:
    return [e.reason for e in outcome.events]


async def test_create_makes_credential_service_account_and_is_ready(pipeline, store, kube):
    outcome = await pipeline.reconcile(resource())

    (credential,) = store.of(APP_REF)
    assert credential.name == credential_name(ISSUER, NS, SA)
    assert credential.subject == subject_for(NS, SA) == f"system:serviceaccount:{NS}:{SA}"
    assert credential.audiences == ("api://AzureADTokenExchange",)
    assert "SqlWorkloadIdentity workload-demo/customer-reader" in (credential.description or "")
    annotations = kube.service_accounts[(NS, SA)]
    assert annotations[CLIENT_ID] == APP
    assert annotations[TENANT_ID] == TENANT
    assert annotations[OWNER] == "customer-reader"
    assert annotations[CREATED_BY] == "customer-reader"
    for type_ in ("Ready", "FederatedCredentialReady", "ServiceAccountReady", "WorkloadsReady"):
        assert condition(outcome, type_).is_true, type_
    assert outcome.status["issuer"] == ISSUER
    assert outcome.status["federatedCredential"]["name"] == credential.name
    assert outcome.status["identity"]["clientId"] == APP
    assert outcome.status["observedGeneration"] == 1
    assert outcome.retry is None
    assert {"CredentialCreated", "ServiceAccountCreated", "Ready"} <= set(reasons(outcome))


async def test_second_reconcile_writes_nothing(pipeline, store, kube):
    body = resource()
    first = await pipeline.reconcile(body)
    store.writes.clear()
    kube.writes.clear()

    second = await pipeline.reconcile(applied(body, first))

    assert not store.writes and not kube.writes
    assert not second.changed
    assert second.events == []


async def test_conditions_keep_transition_time_when_nothing_changes(pipeline):
    body = resource()
    first = await pipeline.reconcile(body)
    body = applied(body, first)
    for cond in body["status"]["conditions"]:
        cond["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    second = await pipeline.reconcile(body)
    assert {c["lastTransitionTime"] for c in second.status["conditions"]} == {
        "2020-01-01T00:00:00Z"
    }


async def test_existing_credential_with_same_issuer_and_subject_is_adopted(pipeline, store):
    by_hand = FederatedCredential(
        "made-by-azwi", ISSUER, subject_for(NS, SA), ("api://AzureADTokenExchange",)
    )
    store.put(APP_REF, by_hand)

    outcome = await pipeline.reconcile(resource())

    (credential,) = store.of(APP_REF)
    assert credential.name == "made-by-azwi"
    assert "Managed by sql-workload-identity-operator" in (credential.description or "")
    assert outcome.status["federatedCredential"]["name"] == "made-by-azwi"
    assert "CredentialAdopted" in reasons(outcome)


async def test_audience_edited_out_of_band_is_repaired(pipeline, store):
    body = resource()
    body = applied(body, await pipeline.reconcile(body))
    (credential,) = store.of(APP_REF)
    store.put(
        APP_REF,
        FederatedCredential(credential.name, ISSUER, credential.subject, ("wrong",), "edited"),
    )

    outcome = await pipeline.reconcile(body)

    (repaired,) = store.of(APP_REF)
    assert repaired.audiences == ("api://AzureADTokenExchange",)
    assert "CredentialUpdated" in reasons(outcome)


async def test_credentials_of_other_issuers_are_never_touched(pipeline, store):
    other_cluster = FederatedCredential(
        credential_name("https://other.example", NS, SA),
        "https://other.example",
        subject_for(NS, SA),
        ("api://AzureADTokenExchange",),
        "theirs",
    )
    store.put(APP_REF, other_cluster)
    body = resource()
    body = applied(body, await pipeline.reconcile(body))
    await pipeline.finalize(body)
    assert store.of(APP_REF) == [other_cluster]


async def test_twenty_first_credential_is_a_permanent_condition(pipeline, store):
    for i in range(20):
        store.put(
            APP_REF,
            FederatedCredential(f"other-{i}", f"https://cluster-{i}.example", "s", ("a",)),
        )
    store.writes.clear()

    outcome = await pipeline.reconcile(resource())

    cred = condition(outcome, "FederatedCredentialReady")
    assert (cred.status, cred.reason) == ("False", "CredentialLimitReached")
    assert "20 federated credentials (0 from this cluster, 20 from other issuers)" in cred.message
    assert condition(outcome, "Ready").reason == "CredentialLimitReached"
    assert outcome.retry is None
    assert not store.writes
    assert condition(outcome, "ServiceAccountReady").reason == "Waiting"
    assert [e.type for e in outcome.events if e.reason == "CredentialLimitReached"] == ["Warning"]


async def test_same_permanent_failure_is_reported_once(pipeline, store):
    store.fail_next("resolve", PermanentError(Reason.PERMISSION_DENIED, "no"), times=2)
    body = resource()
    first = await pipeline.reconcile(body)
    second = await pipeline.reconcile(applied(body, first))
    assert "PermissionDenied" in reasons(first)
    assert "PermissionDenied" not in reasons(second)


async def test_transient_failure_before_ready_sets_condition_and_asks_for_retry(pipeline, store):
    store.fail_next("upsert", TransientError(Reason.THROTTLED, "slow down", 7))
    outcome = await pipeline.reconcile(resource())
    cred = condition(outcome, "FederatedCredentialReady")
    assert (cred.status, cred.reason) == ("False", "Throttled")
    assert outcome.retry is not None and outcome.retry.delay == 7
    # one Warning says it (with "retrying"), not one for the failure and one for the condition
    throttled = [e for e in outcome.events if e.reason == "Throttled"]
    assert [e.type for e in throttled] == ["Warning"] and "retrying" in throttled[0].message


async def test_transient_failure_after_ready_keeps_ready(pipeline, store):
    body = resource()
    body = applied(body, await pipeline.reconcile(body))
    store.fail_next("list", TransientError(Reason.CLOUD_UNAVAILABLE, "503"))

    outcome = await pipeline.reconcile(body)

    assert condition(outcome, "Ready").is_true
    assert condition(outcome, "FederatedCredentialReady").is_true
    assert outcome.retry is not None
    assert [e.type for e in outcome.events] == ["Warning"]


async def test_service_account_change_moves_credential_and_releases_old_account(
    pipeline, store, kube
):
    body = resource()
    body = applied(body, await pipeline.reconcile(body))
    assert (NS, SA) in kube.service_accounts

    body["spec"]["serviceAccountName"] = "renamed"
    body["metadata"]["generation"] = 2
    outcome = await pipeline.reconcile(body)

    (credential,) = store.of(APP_REF)
    assert credential.subject == subject_for(NS, "renamed")
    assert (NS, SA) not in kube.service_accounts  # it created that one, so it deleted it
    assert kube.service_accounts[(NS, "renamed")][CLIENT_ID] == APP
    assert {"CredentialCreated", "CredentialDeleted", "ServiceAccountDeleted"} <= set(
        reasons(outcome)
    )


async def test_identity_change_removes_credential_from_old_identity(pipeline, store):
    body = resource()
    body = applied(body, await pipeline.reconcile(body))
    body["spec"]["identity"] = {"managedIdentityResourceId": MI_ID}
    body["metadata"]["generation"] = 2

    outcome = await pipeline.reconcile(body)

    assert store.of(APP_REF) == []
    (credential,) = store.of(MI_REF)
    assert credential.description is None  # ARM credentials have none
    assert outcome.status["federatedCredential"]["identity"] == MI_ID
    assert outcome.status["identity"]["kind"] == "ManagedIdentity"
    assert condition(outcome, "Ready").is_true


async def test_managed_identity_second_reconcile_writes_nothing(pipeline, store):
    body = resource(identity={"managedIdentityResourceId": MI_ID})
    body = applied(body, await pipeline.reconcile(body))
    store.writes.clear()
    await pipeline.reconcile(body)
    assert not store.writes


async def test_existing_service_account_keeps_its_annotations(pipeline, kube):
    kube.service_accounts[(NS, SA)] = {"team": "payments", CLIENT_ID: APP}
    body = resource()
    body = applied(body, await pipeline.reconcile(body))
    annotations = kube.service_accounts[(NS, SA)]
    assert annotations["team"] == "payments"
    assert annotations[MANAGED] == TENANT_ID  # client-id was already there: not the operator's

    await pipeline.finalize(body)

    assert kube.service_accounts[(NS, SA)] == {"team": "payments", CLIENT_ID: APP}


async def test_foreign_client_id_on_service_account_is_a_conflict(pipeline, kube, store):
    kube.service_accounts[(NS, SA)] = {CLIENT_ID: OTHER_APP}
    outcome = await pipeline.reconcile(resource())
    sa = condition(outcome, "ServiceAccountReady")
    assert (sa.status, sa.reason) == ("False", "ServiceAccountConflict")
    assert OTHER_APP in sa.message
    assert kube.service_accounts[(NS, SA)] == {CLIENT_ID: OTHER_APP}


async def test_service_account_claimed_by_another_resource(pipeline, kube, store):
    first = resource("first")
    kube.resources[(NS, "first")] = first
    await pipeline.reconcile(first)
    store.writes.clear()

    outcome = await pipeline.reconcile(
        resource("second", identity={"applicationClientId": OTHER_APP})
    )

    cred = condition(outcome, "FederatedCredentialReady")
    assert (cred.status, cred.reason) == ("False", "ServiceAccountConflict")
    assert "workload-demo/first" in cred.message
    assert not store.writes
    # Deleting the loser must not touch the winner's credential or service account.
    await pipeline.finalize(resource("second", identity={"applicationClientId": OTHER_APP}))
    assert len(store.of(APP_REF)) == 1
    assert kube.service_accounts[(NS, SA)][OWNER] == "first"


async def test_removed_annotations_are_restored(pipeline, kube):
    body = resource()
    body = applied(body, await pipeline.reconcile(body))
    del kube.service_accounts[(NS, SA)][CLIENT_ID]
    outcome = await pipeline.reconcile(body)
    assert kube.service_accounts[(NS, SA)][CLIENT_ID] == APP
    assert "ServiceAccountAnnotated" in reasons(outcome)


async def test_deleted_credential_is_recreated(pipeline, store):
    body = resource()
    body = applied(body, await pipeline.reconcile(body))
    store.credentials[APP_REF.key].clear()
    outcome = await pipeline.reconcile(body)
    assert len(store.of(APP_REF)) == 1
    assert "CredentialCreated" in reasons(outcome)


async def test_workloads_running_as_the_account_are_labelled(pipeline, kube):
    kube.add_workload(NS, "Deployment", "api", SA)
    kube.add_workload(NS, "CronJob", "nightly", SA)
    kube.add_workload(NS, "Deployment", "unrelated", "default")
    kube.add_workload(NS, "StatefulSet", "db", SA, template_labels={USE_LABEL: "true"})
    kube.pods[NS] = [Pod("api-1", SA, active=True, has_token=False), Pod("done", SA, False, False)]

    outcome = await pipeline.reconcile(resource())

    assert kube.template_labels(NS, "Deployment", "api")[USE_LABEL] == "true"
    assert kube.template_labels(NS, "CronJob", "nightly")[USE_LABEL] == "true"
    assert USE_LABEL not in kube.template_labels(NS, "Deployment", "unrelated")
    assert kube.workloads[(NS, "StatefulSet", "db")]["annotations"] == {}  # label was not ours
    work = outcome.status["workloads"]
    assert (work["matched"], work["labelled"], work["podsWithoutToken"]) == (3, 3, 1)
    assert work["podsWithoutTokenNames"] == ["api-1"]
    ready = condition(outcome, "WorkloadsReady")
    assert ready.reason == "WorkloadsLabelled" and "api-1" in ready.message


async def test_a_workload_the_cache_has_not_seen_yet_is_found_by_a_live_list(pipeline, kube):
    kube.add_workload(NS, "Deployment", "api", SA)
    kube.add_workload(NS, "Deployment", "unrelated", "default")
    kube.not_cached_yet.add((NS, "Deployment", "api"))  # created a moment before its resource

    outcome = await pipeline.reconcile(resource())

    assert kube.workload_lists == ["cached", "live"]
    assert kube.template_labels(NS, "Deployment", "api")[USE_LABEL] == "true"
    assert condition(outcome, "WorkloadsReady").reason == "WorkloadsLabelled"
    kube.workload_lists.clear()
    kube.not_cached_yet.clear()
    await pipeline.reconcile(resource())
    assert kube.workload_lists == ["cached"]  # found in the cache: no live list


async def test_selector_narrows_workloads_and_unlabels_those_left_out(pipeline, kube):
    kube.add_workload(NS, "Deployment", "api", SA, template_labels={"app": "customer-api"})
    kube.add_workload(NS, "Deployment", "worker", SA, template_labels={"app": "worker"})
    body = resource()
    body = applied(body, await pipeline.reconcile(body))
    body["spec"]["workloads"] = {"selector": {"matchLabels": {"app": "customer-api"}}}

    outcome = await pipeline.reconcile(body)

    assert kube.template_labels(NS, "Deployment", "api")[USE_LABEL] == "true"
    assert USE_LABEL not in kube.template_labels(NS, "Deployment", "worker")
    assert LABELLED_BY not in kube.workloads[(NS, "Deployment", "worker")]["annotations"]
    assert "WorkloadUnlabelled" in reasons(outcome)


async def test_selector_matches_the_pod_template_labels_not_the_workload_metadata(pipeline, kube):
    # The README's Deployment: `app` on its pod template only.
    kube.add_workload(NS, "Deployment", "customer-api", SA, template_labels={"app": "customer-api"})
    kube.add_workload(NS, "Deployment", "decoy", SA, labels={"app": "customer-api"})
    body = resource(workloads={"selector": {"matchLabels": {"app": "customer-api"}}})

    outcome = await pipeline.reconcile(body)

    assert kube.template_labels(NS, "Deployment", "customer-api")[USE_LABEL] == "true"
    assert USE_LABEL not in kube.template_labels(NS, "Deployment", "decoy")
    assert outcome.status["workloads"]["matched"] == 1
    assert condition(outcome, "WorkloadsReady").reason == "WorkloadsLabelled"


async def test_selector_matching_none_of_the_accounts_workloads_is_reported(pipeline, kube):
    kube.add_workload(NS, "Deployment", "customer-api", SA, template_labels={"app": "api"})
    kube.add_workload(NS, "Deployment", "other", "default", template_labels={"app": "e1"})
    body = resource(workloads={"selector": {"matchLabels": {"app": "e1"}}})

    outcome = await pipeline.reconcile(body)

    ready = condition(outcome, "WorkloadsReady")
    assert (ready.status, ready.reason) == ("False", "SelectorMatchesNothing")
    assert "Deployment/customer-api" in ready.message and "Deployment/other" not in ready.message
    assert condition(outcome, "Ready").status == "False"
    assert not kube.writes["patch_workload"]


async def test_no_workloads_at_all_is_not_a_failure(pipeline, kube):
    body = resource(workloads={"selector": {"matchLabels": {"app": "e1"}}})
    ready = condition(await pipeline.reconcile(body), "WorkloadsReady")
    assert (ready.status, ready.reason) == ("True", "NoWorkloads")


def _pod(name: str, age_s: float, **kwargs: Any) -> Pod:
    created = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age_s)
    return Pod(name, kwargs.pop("sa", SA), True, kwargs.pop("token", False), created, **kwargs)


async def test_pods_without_token_past_the_grace_turn_ready_false_naming_them(pipeline, kube):
    kube.add_workload(NS, "Deployment", "api", SA, template_labels={USE_LABEL: "true"})
    kube.pods[NS] = [
        _pod("api-old", 600),  # created before the label
        _pod("api-bare", 600, labels={USE_LABEL: "true"}),  # labelled: no webhook injected it
        _pod(
            "api-skip",
            600,
            labels={USE_LABEL: "true"},
            annotations={"azure.workload.identity/skip-containers": "app"},
        ),
        _pod("api-ok", 600, token=True, labels={USE_LABEL: "true"}),
        _pod("other", 600, sa="default"),
    ]

    outcome = await pipeline.reconcile(resource())

    ready = condition(outcome, "WorkloadsReady")
    assert (ready.status, ready.reason) == ("False", "PodsWithoutToken")
    assert "3 pod(s)" in ready.message
    assert "api-old: created before" in ready.message
    assert "api-bare: labelled, yet no workload identity webhook" in ready.message
    assert "api-skip: its azure.workload.identity/skip-containers" in ready.message
    assert "api-ok" not in ready.message and "other" not in ready.message
    ready_all = condition(outcome, "Ready")
    assert (ready_all.status, ready_all.reason) == ("False", "PodsWithoutToken")
    assert "api-old" in ready_all.message
    assert outcome.status["workloads"]["podsWithoutTokenNames"] == [
        "api-bare",
        "api-old",
        "api-skip",
    ]


async def test_pods_within_the_grace_are_named_and_rechecked_not_failed(pipeline, kube):
    kube.add_workload(NS, "Deployment", "api", SA, template_labels={USE_LABEL: "true"})
    kube.pods[NS] = [_pod("api-new", 5, labels={USE_LABEL: "true"})]

    outcome = await pipeline.reconcile(resource())

    ready = condition(outcome, "WorkloadsReady")
    assert (ready.status, ready.reason) == ("True", "WorkloadsLabelled")
    assert "api-new" in ready.message and "grace" in ready.message
    assert outcome.retry is not None and outcome.retry.delay is not None
    assert 100 < outcome.retry.delay <= 116  # the default 120 s grace, less the pod's 5 s


async def test_the_grace_counts_from_the_last_labelling_of_an_old_pod(store, kube):
    pipeline = build_pipeline(store, kube, TENANT, None, pod_token_grace=30)
    kube.add_workload(NS, "Deployment", "api", SA)
    kube.pods[NS] = [_pod("api-old", 3600)]
    body = resource()

    first = await pipeline.reconcile(body)  # labels the template: the rollout starts now

    assert condition(first, "WorkloadsReady").status == "True"
    assert "lastLabelled" in first.status["workloads"]
    stale = {**first.status["workloads"], "lastLabelled": "2020-01-01T00:00:00+00:00"}
    later = await pipeline.reconcile({**body, "status": {**first.status, "workloads": stale}})
    assert condition(later, "WorkloadsReady").reason == "PodsWithoutToken"


async def test_pods_outside_the_selector_do_not_count(pipeline, kube):
    kube.add_workload(NS, "Deployment", "api", SA, template_labels={"app": "api"})
    kube.pods[NS] = [_pod("worker-1", 600, labels={"app": "worker"})]
    body = resource(workloads={"selector": {"matchLabels": {"app": "api"}}})
    ready = condition(await pipeline.reconcile(body), "WorkloadsReady")
    assert (ready.status, ready.reason) == ("True", "WorkloadsLabelled")


async def test_immutable_job_is_reported(pipeline, kube):
    kube.add_workload(NS, "Job", "migrate", SA, immutable=True)
    outcome = await pipeline.reconcile(resource())
    ready = condition(outcome, "WorkloadsReady")
    assert (ready.status, ready.reason) == ("False", "WorkloadNotLabelled")
    assert "Job/migrate" in ready.message
    assert outcome.status["workloads"]["notLabelled"] == ["Job/migrate"]
    assert condition(outcome, "Ready").reason == "WorkloadNotLabelled"


async def test_finalize_removes_everything_it_made(pipeline, store, kube):
    kube.add_workload(NS, "Deployment", "api", SA)
    body = resource()
    body = applied(body, await pipeline.reconcile(body))

    outcome = await pipeline.finalize(body)

    assert store.of(APP_REF) == []
    assert (NS, SA) not in kube.service_accounts
    assert USE_LABEL not in kube.template_labels(NS, "Deployment", "api")
    assert outcome.retry is None
    assert {"CredentialDeleted", "ServiceAccountDeleted", "WorkloadUnlabelled"} <= set(
        reasons(outcome)
    )


async def test_finalize_with_retain_keeps_the_credential(pipeline, store, kube):
    body = resource(deletionPolicy="Retain")
    body = applied(body, await pipeline.reconcile(body))
    outcome = await pipeline.finalize(body)
    assert len(store.of(APP_REF)) == 1
    assert (NS, SA) not in kube.service_accounts
    assert "CredentialRetained" in reasons(outcome)


async def test_finalize_tolerates_a_missing_identity_and_reports_permanent_errors(pipeline, store):
    body = resource()
    body = applied(body, await pipeline.reconcile(body))
    store.fail_next("delete", PermanentError(Reason.PERMISSION_DENIED, "denied"))
    outcome = await pipeline.finalize(body)
    assert outcome.retry is None
    assert [e.type for e in outcome.events if e.reason == "PermissionDenied"] == ["Warning"]

    store.known.clear()  # the identity was deleted: nothing left to clean
    assert (await pipeline.finalize(body)).retry is None


async def test_finalize_returns_transient_failures_for_retry(pipeline, store):
    body = resource()
    body = applied(body, await pipeline.reconcile(body))
    store.fail_next("list", TransientError(Reason.THROTTLED, "slow", 3))
    outcome = await pipeline.finalize(body)
    assert outcome.retry is not None and outcome.retry.delay == 3


async def test_other_tenant_is_not_managed(pipeline, store):
    other = "2c4e6a8b-1d3f-4a5b-9c7d-e1f2a3b4c5d6"
    outcome = await pipeline.reconcile(
        resource(identity={"applicationClientId": APP, "tenantId": other})
    )
    cred = condition(outcome, "FederatedCredentialReady")
    assert cred.reason == "TenantNotManaged" and other in cred.message
    assert not store.writes


async def test_invalid_spec_is_reported_on_ready(pipeline, store):
    outcome = await pipeline.reconcile(resource(identity={"applicationClientId": "not-a-guid"}))
    ready = condition(outcome, "Ready")
    assert (ready.status, ready.reason) == ("False", "InvalidSpec")
    assert "spec.identity.applicationClientId" in ready.message
    assert not store.writes


async def test_issuer_discovery_failure_is_transient(pipeline, kube):
    from swi_operator.errors import kubernetes_error

    kube.fail_next("discover_issuer", kubernetes_error(503, "unavailable", "discover"))
    outcome = await pipeline.reconcile(resource())
    assert condition(outcome, "FederatedCredentialReady").reason == "IssuerUnavailable"
    assert outcome.retry is not None


class LaggingStore(FakeStore):
    """Graph under read-after-write lag: lists miss what was written; an upsert of a name that
    exists answers as Graph's 204 does (no body, so no id)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: set[str] = set()

    async def list(self, identity: Any) -> list[FederatedCredential]:
        return [c for c in await super().list(identity) if c.name not in self.hidden]

    async def upsert(self, identity: Any, credential: FederatedCredential) -> FederatedCredential:
        existed = credential.name in self.credentials[identity.ref.key]
        written = await super().upsert(identity, credential)
        self.hidden.add(credential.name)
        return dataclasses.replace(written, id=None) if existed else written


async def test_a_lagging_list_neither_duplicates_nor_claims_a_second_creation(kube):
    store = LaggingStore()
    store.add_identity(APP_REF)
    lagging = build_pipeline(store, kube, TENANT, None)
    body = resource()
    first = await lagging.reconcile(body)
    recorded = first.status["federatedCredential"]

    # The next drift cycle's list does not show the credential yet: the upsert is repeated (it
    # is idempotent by name) but nothing is created, claimed or changed in status.
    second = await lagging.reconcile(applied(body, first))

    assert len(store.of(APP_REF)) == 1
    assert "CredentialCreated" not in reasons(second)
    assert second.status.get("federatedCredential", recorded) == recorded
    assert condition(second, "Ready").is_true


class ListCountingStore(FakeStore):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.lists = 0

    async def list(self, identity: Any) -> list[FederatedCredential]:
        self.lists += 1
        return await super().list(identity)


@pytest.fixture
def counting() -> ListCountingStore:
    s = ListCountingStore()
    s.add_identity(APP_REF)
    return s


def reader(n: int) -> dict[str, Any]:
    return resource(f"reader-{n}", service_account=f"sa-{n}")


async def test_first_passes_on_one_identity_list_its_credentials_once(counting, kube):
    """Onboarding listed the identity's credentials once per resource; within RECENT_LIST_S a
    first pass decides "create" on the list this process read and wrote."""
    pipeline = build_pipeline(counting, kube, TENANT, None)
    for n in range(5):
        outcome = await pipeline.reconcile(reader(n))
        assert "CredentialCreated" in reasons(outcome)
    assert counting.lists == 1
    assert len(counting.of(APP_REF)) == 5
    # A later pass (the credential recorded in status) always lists live: drift is seen.
    body = reader(0)
    first = await pipeline.reconcile(body)
    counting.credentials[APP_REF.key].clear()
    again = await pipeline.reconcile(applied(body, first))
    assert counting.lists == 3 and "CredentialCreated" in reasons(again)


async def test_a_credential_written_by_someone_else_since_is_adopted_not_duplicated(counting, kube):
    """The remembered list misses a credential for the same subject written since (another
    process, a person): Entra refuses the second one, and the pass decides again live."""
    pipeline = build_pipeline(counting, kube, TENANT, None)
    await pipeline.reconcile(reader(0))
    theirs = FederatedCredential(
        "by-hand", ISSUER, subject_for(NS, "sa-1"), ("api://AzureADTokenExchange",), None, "x"
    )
    counting.credentials[APP_REF.key]["by-hand"] = theirs
    outcome = await pipeline.reconcile(reader(1))
    assert "CredentialAdopted" in reasons(outcome)
    assert [c.name for c in counting.of(APP_REF) if c.subject == theirs.subject] == ["by-hand"]
    assert counting.lists == 2


async def test_the_budget_spent_since_the_remembered_list_is_reported_from_a_live_one(
    counting, kube
):
    pipeline = build_pipeline(counting, kube, TENANT, None)
    await pipeline.reconcile(reader(0))
    for n in range(19):  # another cluster fills the identity meanwhile
        subject = f"system:serviceaccount:other:sa-{n}"
        counting.credentials[APP_REF.key][f"other-{n}"] = FederatedCredential(
            f"other-{n}", "https://other.example", subject, ("api://AzureADTokenExchange",)
        )
    outcome = await pipeline.reconcile(reader(1))
    refused = condition(outcome, "FederatedCredentialReady")
    assert refused.reason == Reason.CREDENTIAL_LIMIT_REACHED
    assert "1 from this cluster, 19 from other issuers" in refused.message
    assert counting.lists == 2


def test_a_remembered_list_expires() -> None:
    from swi_operator.steps.federation import RecentLists

    now = [0.0]
    recent = RecentLists(ttl=10, clock=lambda: now[0])
    credential = FederatedCredential("a", ISSUER, "s", ("aud",))
    recent.put("k", [])
    recent.wrote("k", credential)
    assert recent.get("k") == [credential]
    recent.wrote("other", credential)  # nothing remembered there: nothing invented
    assert recent.get("other") is None
    now[0] = 10.5
    assert recent.get("k") is None
