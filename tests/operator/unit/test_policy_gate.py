"""The Authorized gate in the pipeline, revocation, the policy source, the policy review and the
validating webhook, over in-memory fakes: what is called (nothing, for a refused resource), what
is taken back, and what each says."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import kopf
import pytest
from operator_fakes import APP, ISSUER, MI_ID, TENANT, FakeKube, FakeStore, resource  # type: ignore[import-not-found]
from swi_operator import conditions, peers
from swi_operator.cloud import FederatedCredential, ResolvedIdentity
from swi_operator.errors import PermanentError, Reason, TransientError
from swi_operator.naming import credential_name, subject_for
from swi_operator.pipeline import Outcome, Pipeline
from swi_operator.policy import parse_policies
from swi_operator.policy_review import PolicyReview
from swi_operator.runtime import build_pipeline
from swi_operator.spec import ApplicationRef, IdentityRef, parse_managed_identity_id
from swi_operator.steps.authorization import AuthorizationStep, KubePolicySource

NS, SA = "workload-demo", "workload-demo-service-account"
APP_REF = ApplicationRef(APP)
MI_REF = parse_managed_identity_id(MI_ID)
assert MI_REF is not None


def policy_body(
    name: str = "demo", namespaces: Mapping[str, Any] | None = None, **spec: Any
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "generation": 1},
        "spec": {
            "identity": spec.pop("identity", {"applicationClientId": APP}),
            "namespaces": dict(namespaces or {"names": [NS]}),
            **spec,
        },
    }


class FakePolicyReader:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] | None = []
        self.labels: dict[str, dict[str, str]] = {}
        self.calls: Counter[str] = Counter()
        self.status: dict[str, Mapping[str, Any]] = {}

    async def list_policies(self) -> list[dict[str, Any]] | None:
        self.calls["list_policies"] += 1
        return None if self.bodies is None else list(self.bodies)

    async def namespace_labels(self, namespace: str) -> dict[str, str]:
        self.calls["namespace_labels"] += 1
        return self.labels.get(namespace, {})

    async def patch_policy_status(self, name: str, status: Mapping[str, Any]) -> None:
        self.status[name] = status


class CountingStore(FakeStore):  # type: ignore[misc]
    """Every call counted, reads included: a refused resource must cost none."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    async def resolve(self, ref: IdentityRef) -> ResolvedIdentity:
        self.calls["resolve"] += 1
        return await super().resolve(ref)

    async def list(self, identity: ResolvedIdentity) -> list[FederatedCredential]:
        self.calls["list"] += 1
        return await super().list(identity)


@pytest.fixture
def store() -> CountingStore:
    s = CountingStore()
    s.add_identity(APP_REF)
    s.add_identity(MI_REF)
    return s


@pytest.fixture
def kube() -> FakeKube:
    return FakeKube()


@pytest.fixture
def reader() -> FakePolicyReader:
    return FakePolicyReader()


@pytest.fixture
def pipeline(store: CountingStore, kube: FakeKube, reader: FakePolicyReader) -> Pipeline:
    gate = AuthorizationStep(KubePolicySource(reader, True, ttl=0), require_policy=True)
    return build_pipeline(store, kube, TENANT, None, gate=gate)


def applied(body: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
    """``body`` after its status merge patch (None removes a field)."""
    status = {**body.get("status", {}), **outcome.status}
    return {**body, "status": {k: v for k, v in status.items() if v is not None}}


def condition(outcome: Outcome, type_: str) -> conditions.Condition:
    found = conditions.find(outcome.status["conditions"], type_)
    assert found is not None, type_
    return found


async def test_refused_without_policy_and_nothing_called(pipeline, store, kube):
    outcome = await pipeline.reconcile(resource())

    ready = condition(outcome, "Ready")
    assert (ready.status, ready.reason) == ("False", "NotAuthorized")
    assert f"no SqlIdentityPolicy allows application {APP}" in ready.message
    assert not store.calls and not store.writes and not kube.writes
    assert condition(outcome, "FederatedCredentialReady").status == "Unknown"
    assert outcome.retry is None  # permanent: the policy review or drift check re-decides
    assert [e.reason for e in outcome.events] == ["NotAuthorized"]


async def test_retain_only_where_a_policy_allows_it(pipeline, store, reader):
    reader.bodies = [policy_body()]
    outcome = await pipeline.reconcile(resource(deletionPolicy="Retain"))
    ready = condition(outcome, "Ready")
    assert ready.reason == "NotAuthorized"
    assert "does not allow deletionPolicy: Retain" in ready.message
    assert "allowRetain" in ready.message
    assert not store.calls and store.of(APP_REF) == []


async def test_allowed_by_policy_then_revoked_whatever_the_deletion_policy(
    pipeline, store, kube, reader
):
    reader.bodies = [policy_body(allowRetain=True)]
    body = resource(deletionPolicy="Retain")
    first = await pipeline.reconcile(body)
    authorized = condition(first, "Authorized")
    assert (authorized.status, authorized.reason) == ("True", "PolicyAllows")
    assert "SqlIdentityPolicy demo allows" in authorized.message
    assert len(store.of(APP_REF)) == 1

    reader.bodies = []
    body = applied(body, first)
    second = await pipeline.reconcile(body)

    assert store.of(APP_REF) == []
    assert condition(second, "Ready").reason == "NotAuthorized"
    federation = condition(second, "FederatedCredentialReady")
    assert (federation.status, federation.reason) == ("False", "NotAuthorized")
    assert federation.message.startswith("access revoked: the federated credential of application")
    assert second.status["federatedCredential"] is None
    assert "AccessRevoked" in [e.reason for e in second.events]
    assert condition(second, "ServiceAccountReady").is_true  # Kubernetes objects stay as they are

    store.calls.clear()
    store.writes.clear()
    third = await pipeline.reconcile(applied(body, second))
    assert not store.calls and not store.writes, "nothing left to revoke: no call"
    assert not third.changed


async def test_a_transient_failure_while_revoking_is_retried(pipeline, store, reader):
    reader.bodies = [policy_body()]
    body = resource()
    body = applied(body, await pipeline.reconcile(body))
    reader.bodies = []
    store.fail_next("delete", TransientError(Reason.THROTTLED, "slow down", 3.0))

    outcome = await pipeline.reconcile(body)

    assert outcome.retry is not None and outcome.retry.delay == 3.0
    assert len(store.of(APP_REF)) == 1
    assert condition(outcome, "FederatedCredentialReady").is_true  # not revoked yet
    assert "federatedCredential" not in outcome.status


async def test_a_recorded_subject_of_another_namespace_is_never_acted_on(pipeline, store, reader):
    """A forged status (a tenant able to write the status subresource) cannot make the operator
    delete another namespace's credential, neither on revocation nor after a spec change."""
    victim = FederatedCredential(
        credential_name(ISSUER, "victim-ns", "app"),
        ISSUER,
        subject_for("victim-ns", "app"),
        ("api://AzureADTokenExchange",),
    )
    store.put(APP_REF, victim)
    forged = {
        "subject": victim.subject,
        "federatedCredential": {"name": victim.name, "identity": APP, "id": "x"},
    }
    reader.bodies = [policy_body()]
    allowed = await pipeline.reconcile(resource(status=forged))  # spec "moved" from the forged one
    assert condition(allowed, "Ready").is_true
    reader.bodies = []
    await pipeline.reconcile(resource(status=forged))  # revocation
    await pipeline.finalize(resource(status=forged))  # deletion

    assert victim in store.of(APP_REF)


async def test_requirepolicy_off_lets_unmentioned_identities_through(store, kube, reader):
    gate = AuthorizationStep(KubePolicySource(reader, False, ttl=0), require_policy=False)
    pipeline = build_pipeline(store, kube, TENANT, None, gate=gate)
    reader.bodies = None  # the policy CRD is not even installed
    outcome = await pipeline.reconcile(resource())
    assert condition(outcome, "Authorized").reason == "PolicyNotRequired"
    assert condition(outcome, "Ready").is_true


async def test_without_the_crd_and_with_requirepolicy_nothing_is_allowed(pipeline, reader):
    reader.bodies = None
    outcome = await pipeline.reconcile(resource())
    ready = condition(outcome, "Ready")
    assert ready.reason == "NotAuthorized" and "CRD is not installed" in ready.message


async def test_policy_source_caches_briefly_and_forgets_on_change(reader):
    source = KubePolicySource(reader, True, ttl=60)
    await source.policies()
    await source.policies()
    assert reader.calls["list_policies"] == 1
    source.invalidate()
    await source.policies()
    assert reader.calls["list_policies"] == 2


async def test_namespace_labels_read_only_when_a_policy_selects_by_label(pipeline, reader):
    reader.bodies = [policy_body()]
    await pipeline.reconcile(resource())
    assert reader.calls["namespace_labels"] == 0
    reader.bodies = [policy_body(namespaces={"selector": {"matchLabels": {"team": "a"}}})]
    reader.labels[NS] = {"team": "a"}
    outcome = await pipeline.reconcile(resource())
    assert reader.calls["namespace_labels"] == 1
    assert condition(outcome, "Ready").is_true


class RecordingDrift:
    def __init__(self) -> None:
        self.checked: list[str] = []

    async def check(self, listed: Mapping[str, Any]) -> None:
        self.checked.append(listed["metadata"]["name"])


class AlwaysActive:
    drain = peers.Drain()

    async def active(self, namespace: str | None) -> bool:
        return True


def with_authorized(body: dict[str, Any], status: str) -> dict[str, Any]:
    cond = {"type": "Authorized", "status": status, "reason": "x", "message": "x"}
    return {**body, "status": {"conditions": [cond]}}


async def test_policy_review_counts_and_rechecks_only_flipped_resources(reader):
    kube = SimpleNamespace(
        list_policies=reader.list_policies,
        namespace_labels=reader.namespace_labels,
        patch_policy_status=reader.patch_policy_status,
    )
    kept = with_authorized(resource("kept"), "True")
    lost = with_authorized(resource("lost", identity={"managedIdentityResourceId": MI_ID}), "True")
    gained = with_authorized(resource("gained", namespace="other"), "False")
    never = resource("never", namespace="other", identity={"managedIdentityResourceId": MI_ID})

    async def list_resources(_: Any) -> list[dict[str, Any]]:
        return [kept, lost, gained, never]

    kube.list_resources = list_resources
    reader.bodies = [
        policy_body("demo", {"names": [NS, "other"]}),
        policy_body("broken", {"names": []}),  # no names, no selector: grants nothing
    ]
    drift = RecordingDrift()
    review = PolicyReview(
        kube, drift, AlwaysActive(), namespaces=(), require_policy=True, interval=60
    )  # type: ignore[arg-type]

    await review.review()

    assert sorted(drift.checked) == ["gained", "lost"]
    assert reader.status["demo"]["admitted"] == 2
    assert reader.status["demo"]["message"] == "admits 2 SqlWorkloadIdentities"
    assert reader.status["broken"]["admitted"] == 0
    assert "invalid, grants nothing: spec.namespaces" in reader.status["broken"]["message"]


def idle_review() -> PolicyReview:
    """A review with no cluster behind it, its interval an hour: tests replace ``review``."""
    return PolicyReview(
        SimpleNamespace(),
        RecordingDrift(),
        AlwaysActive(),
        namespaces=(),
        require_policy=True,
        interval=3600,
    )  # type: ignore[arg-type]


async def test_policy_review_runs_after_a_change_without_waiting_for_the_interval(reader):
    reviewed = asyncio.Event()
    review = idle_review()

    async def fake_review() -> None:
        reviewed.set()

    review.review = fake_review  # type: ignore[method-assign]
    task = asyncio.create_task(review.run())
    review.changed()
    await asyncio.wait_for(reviewed.wait(), 5)
    task.cancel()


# --- the validating webhook ---------------------------------------------------------------------


def admission(
    body: dict[str, Any],
    reader: FakePolicyReader,
    others: list[dict[str, Any]] = [],  # noqa: B006
    failure: Exception | None = None,
):
    """The validating webhook on ``body``; its list of the namespace returns ``others`` or
    raises ``failure``."""
    from swi_operator import policy_webhook

    async def list_resources(_: Any) -> list[dict[str, Any]]:
        if failure is not None:
            raise failure
        return others

    runtime = SimpleNamespace(
        policies=KubePolicySource(reader, True, ttl=0),
        config=SimpleNamespace(require_policy=True),
        kube=SimpleNamespace(list_resources=list_resources),
    )
    return policy_webhook.validate(
        body=kopf.Body(body), memo=kopf.Memo(runtime=runtime), operation="CREATE"
    )


async def test_webhook_refuses_with_the_reconcile_message(pipeline, reader):
    body = resource()
    with pytest.raises(kopf.AdmissionError) as refused:
        await admission(body, reader)
    reconciled = condition(await pipeline.reconcile(body), "Authorized")
    assert str(refused.value) == f"NotAuthorized: {reconciled.message}"
    assert refused.value.code == 403


async def test_webhook_admits_an_allowed_resource_and_refuses_a_second_claimant(reader):
    reader.bodies = [policy_body()]
    await admission(resource(), reader)
    other = resource("first-claimant")
    with pytest.raises(kopf.AdmissionError) as refused:
        await admission(resource(), reader, [other])
    assert "ServiceAccountConflict" in str(refused.value) and "first-claimant" in str(refused.value)


async def test_webhook_lets_kopf_patches_and_deletions_through(reader):
    from swi_operator import policy_webhook

    body = resource()
    same = {"spec": body["spec"]}
    await policy_webhook.validate(
        body=kopf.Body(body), memo=kopf.Memo(), operation="UPDATE", old=same, new=same
    )


async def test_webhook_refuses_an_invalid_spec_with_its_fields(reader):
    body = resource()
    body["spec"]["serviceAccountName"] = "Not Valid"
    with pytest.raises(kopf.AdmissionError) as refused:
        await admission(body, reader)
    assert "spec.serviceAccountName" in str(refused.value)


def test_parse_policies_keeps_valid_ones_only():
    parsed = parse_policies([policy_body("ok"), {"metadata": {"name": "bad"}, "spec": {}}])
    assert [p.name for p in parsed.valid] == ["ok"]
    assert isinstance(parsed.invalid["bad"], ValueError)


def test_errors_are_what_the_pipeline_expects():
    assert issubclass(type(PermanentError(Reason.NOT_AUTHORIZED, "x")), PermanentError)


def test_a_namespace_label_change_is_told_from_the_watchs_first_listing() -> None:
    from swi_operator.policy_review import NamespaceLabels

    def event(kind: str, labels: dict[str, str] | None) -> dict[str, Any]:
        return {"type": kind, "object": {"metadata": {"name": NS, "labels": labels}}}

    watch = NamespaceLabels()
    assert not watch.changed(event("ADDED", {"team": "a"}))  # first sight: no change
    assert not watch.changed(event("MODIFIED", {"team": "a"}))  # an annotation, say
    assert watch.changed(event("MODIFIED", {}))  # the label went: review now
    assert watch.changed(event("MODIFIED", {"team": "b"}))
    assert not watch.changed(event("DELETED", None))
    assert not watch.changed(event("ADDED", {"team": "c"}))  # re-created: first sight again
    assert not watch.changed({"type": "MODIFIED", "object": None})


def test_only_a_policys_spec_creation_or_deletion_is_a_change() -> None:
    """The review's own status writes come back as events: they must not start another review."""
    from swi_operator.policy_review import PolicySpecs

    def event(kind: str, generation: int, uid: str = "u1", **meta: Any) -> dict[str, Any]:
        body = {"metadata": {"name": "demo", "uid": uid, "generation": generation, **meta}}
        return {"type": kind, "object": {**body, "status": {"admitted": generation}}}

    specs = PolicySpecs()
    assert specs.changed(event("ADDED", 1))  # first sight (also the watch's first listing)
    assert not specs.changed(event("MODIFIED", 1))  # its status written
    assert specs.changed(event("MODIFIED", 2))  # its spec changed
    assert specs.changed(event("MODIFIED", 2, deletionTimestamp="2026-12-04T00:00:00Z"))
    assert specs.changed(event("DELETED", 2))
    assert specs.changed(event("ADDED", 1, uid="u2"))  # re-created under the same name
    assert specs.changed({"type": "MODIFIED", "object": None})  # unreadable: review anyway


def test_admission_changed_only_when_authorized_flips() -> None:
    from swi_operator.policy_review import admission_changed

    allowed = with_authorized({}, "True")["status"]
    refused = with_authorized({}, "False")["status"]
    assert admission_changed({}, allowed)  # its first decision
    assert admission_changed(allowed, refused) and admission_changed(refused, allowed)
    assert not admission_changed(allowed, allowed)
    assert not admission_changed(allowed, {"conditions": []})  # not decided in this pass


def recording_review(
    monkeypatch: pytest.MonkeyPatch, **timings: float
) -> tuple[PolicyReview, list[float]]:
    """An idle review whose runs only record when they happen, with no debounce and the
    ``periodic`` recount timings given (``RECOUNT_MIN_S=...``)."""
    from swi_operator import periodic

    monkeypatch.setattr(periodic, "DEBOUNCE_S", 0.0)
    for name, value in timings.items():
        monkeypatch.setattr(periodic, name, value)
    runs: list[float] = []
    review = idle_review()

    async def record() -> None:
        runs.append(asyncio.get_running_loop().time())

    review.review = record  # type: ignore[method-assign]
    return review, runs


async def test_recounts_run_at_most_every_recount_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    review, runs = recording_review(
        monkeypatch, RECOUNT_MIN_S=0.3, RECOUNT_QUIET_S=0.1, RECOUNT_MAX_S=0.3
    )
    task = asyncio.create_task(review.run())
    try:
        for _ in range(20):  # a burst of resources admitted over 0.6 s
            review.recount()
            await asyncio.sleep(0.03)
        await asyncio.sleep(0.5)
    finally:
        task.cancel()
    assert 2 <= len(runs) <= 4, runs  # not one per resource
    assert all(b - a >= 0.29 for a, b in itertools.pairwise(runs)), runs


async def test_a_recount_waits_for_a_burst_to_pause_but_not_forever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A single change is counted once changes pause (not at once, not after the limit); a
    burst that does not pause is counted every RECOUNT_MAX_S, not after each change."""
    review, runs = recording_review(
        monkeypatch, RECOUNT_QUIET_S=0.3, RECOUNT_MIN_S=0.1, RECOUNT_MAX_S=0.6
    )
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(review.run())
    try:
        asked = loop.time()
        review.recount()
        await asyncio.sleep(1.0)
        assert len(runs) == 1 and 0.29 <= runs[0] - asked <= 0.9, runs

        runs.clear()
        burst = loop.time()
        while loop.time() - burst < 1.5:  # a change every 30 ms, never pausing 0.3 s
            review.recount()
            ended = loop.time()
            await asyncio.sleep(0.03)
        await asyncio.sleep(0.8)
    finally:
        task.cancel()
    during = [t for t in runs if t < ended]
    assert 2 <= len(during) <= 3, runs  # every 0.6 s, not every 30 ms
    assert all(b - a >= 0.55 for a, b in itertools.pairwise(during)), runs
    assert runs[-1] - ended >= 0.29, runs  # and once more after the burst paused


def test_the_gate_reads_namespace_labels_from_the_watch_and_live_only_when_unseen(
    reader: FakePolicyReader,
) -> None:
    """Onboarding read the Namespace once per resource; the namespace watch already holds its
    labels. A namespace the watch has not seen yet is read live; a label the watch saw go
    decides at once."""
    from swi_operator.policy_review import NamespaceLabels

    label = {"team": "demo"}
    reader.bodies = [policy_body(namespaces={"selector": {"matchLabels": label}})]
    reader.labels[NS] = dict(label)
    watch = NamespaceLabels()
    source = KubePolicySource(reader, True, ttl=0, watched=watch)
    gate = AuthorizationStep(source, require_policy=True)

    def allowed() -> bool:
        ctx = SimpleNamespace(
            spec=SimpleNamespace(identity=APP_REF, sql=None, retain_cloud_objects=False),
            resource=SimpleNamespace(namespace=NS),
            allow_ddl_triggers=False,
        )
        try:
            asyncio.run(gate.reconcile(ctx))  # type: ignore[arg-type]
        except PermanentError as err:
            if err.reason is not Reason.NOT_AUTHORIZED:
                raise
            return False
        return True

    assert allowed()
    assert reader.calls["namespace_labels"] == 1  # not seen by the watch: read live
    watch.changed({"type": "ADDED", "object": {"metadata": {"name": NS, "labels": label}}})
    assert allowed() and allowed()
    assert reader.calls["namespace_labels"] == 1  # seen: no more reads
    watch.changed({"type": "MODIFIED", "object": {"metadata": {"name": NS, "labels": {}}}})
    assert not allowed()  # the watch saw the label go: refused without a read
    assert reader.calls["namespace_labels"] == 1
    watch.changed({"type": "DELETED", "object": {"metadata": {"name": NS}}})
    assert allowed()  # forgotten with the namespace: read live again (still labelled there)
    assert reader.calls["namespace_labels"] == 2


async def test_webhook_admits_without_the_claim_check_when_its_own_token_is_refused(reader):
    """A replica whose pod was force-deleted still gets admissions for a moment, and the API
    server refuses its token (401): the policy still decides; only the claim check, which the
    reconcile repeats, is skipped. Any other failure of the list still refuses the request."""
    from swi_operator.errors import kubernetes_error

    failure = kubernetes_error(401, "Unauthorized", "list SqlWorkloadIdentities")

    def validate(body: dict[str, Any]) -> Any:
        return admission(body, reader, failure=failure)

    with pytest.raises(kopf.AdmissionError) as refused:
        await validate(resource())  # no policy: still refused
    assert str(refused.value).startswith("NotAuthorized")
    reader.bodies = [policy_body()]
    await validate(resource())  # allowed, claim check skipped
    failure = kubernetes_error(503, "Service Unavailable", "list SqlWorkloadIdentities")
    with pytest.raises(kopf.AdmissionError) as unavailable:
        await validate(resource())
    assert "KubernetesUnavailable" in str(unavailable.value)
