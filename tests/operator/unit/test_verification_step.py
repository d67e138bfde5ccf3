"""Verified over in-memory fakes: when the probe runs, and which reason each failure gives."""

from __future__ import annotations

from typing import Any

import pytest
from operator_fakes import APP, ISSUER, TENANT, FakeKube, FakeStore, resource  # type: ignore[import-not-found]
from sql_fakes import FakeDatabase, FakeExchange, FakeTokens, failed  # type: ignore[import-not-found]
from swi_operator import conditions
from swi_operator.errors import Reason, TransientError
from swi_operator.locks import KeyedLocks
from swi_operator.pipeline import Outcome, Pipeline
from swi_operator.runtime import build_pipeline
from swi_operator.spec import ApplicationRef
from swi_operator.steps.database import DatabaseAccessStep
from swi_operator.steps.verification import VerificationStep

SQL = {"server": "tcp:localhost,1433", "database": "mydb", "roles": ["db_datareader"]}
LOGIN_FAILED = "Login failed for user '<token-identified principal>'."


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    def __init__(self, issuer: str = ISSUER) -> None:
        self.store = FakeStore()
        self.store.add_identity(ApplicationRef(APP))
        self.kube = FakeKube()
        self.db = FakeDatabase()
        self.tokens = FakeTokens(issuer)
        self.exchange = FakeExchange()
        self.clock = Clock()
        self.pipeline: Pipeline = build_pipeline(
            self.store,
            self.kube,
            TENANT,
            None,
            (
                DatabaseAccessStep(self.db, KeyedLocks()),
                VerificationStep(
                    self.tokens,
                    self.exchange,
                    self.db,
                    interval=100,
                    propagation_timeout=60,
                    clock=self.clock,
                ),
            ),
        )

    async def run(self, body: dict[str, Any]) -> tuple[Outcome, dict[str, Any]]:
        outcome = await self.pipeline.reconcile(body)
        status = {**body.get("status", {}), **outcome.status}
        if isinstance(status.get("verification"), dict):
            status["verification"] = {
                k: v for k, v in status["verification"].items() if v is not None
            }
        return outcome, {**body, "status": {k: v for k, v in status.items() if v is not None}}


def verified(outcome: Outcome) -> conditions.Condition:
    found = conditions.find(outcome.status["conditions"], "Verified")
    assert found is not None
    return found


@pytest.fixture
def rig() -> Rig:
    return Rig()


async def test_the_probe_goes_token_request_exchange_login(rig):
    outcome, _ = await rig.run(resource(sql=SQL))

    cond = verified(outcome)
    assert (cond.status, cond.reason) == ("True", "Verified")
    assert "logged in to database 'mydb'" in cond.message and "read a table" in cond.message
    ns, sa = "workload-demo", "workload-demo-service-account"
    assert rig.tokens.requests == [(ns, sa, "api://AzureADTokenExchange", 600)]
    assert rig.exchange.calls == [(TENANT, APP, "https://database.windows.net/.default")]
    (target, token, read_table) = rig.db.probes[0]
    assert target.database == "mydb" and read_table is True and token.count(".") == 2
    assert outcome.status["verification"]["lastProbeTime"].endswith("Z")


async def test_without_sql_the_exchange_alone_is_proven(rig):
    outcome, _ = await rig.run(resource())
    assert verified(outcome).is_true
    assert rig.db.probes == []


async def test_reprobed_after_the_interval_or_a_change_not_before(rig):
    _, body = await rig.run(resource(sql=SQL))
    rig.clock.now += 50
    await rig.run(body)
    assert len(rig.exchange.calls) == 1  # settled and recent: no probe

    rig.clock.now += 60
    outcome, body = await rig.run(body)
    assert len(rig.exchange.calls) == 2
    assert outcome.changed  # lastProbeTime moved

    rig.db.users.clear()  # dropped out of band: the repair is followed by a probe at once
    await rig.run(body)
    assert len(rig.exchange.calls) == 3

    _, body = await rig.run({**body, "metadata": {**body["metadata"], "generation": 2}})
    assert len(rig.exchange.calls) == 4


async def test_only_a_first_probe_may_query_on_a_session_of_the_identity(rig):
    """Onboarding many resources of one identity at once, a first probe may run its queries on
    a session another probe of the identity logged in to moments ago (the token exchange is its
    own); a re-probe, which looks for what changed, always logs in itself."""
    rig.db.login_age = 4.2
    outcome, body = await rig.run(resource(sql=SQL))
    cond = verified(outcome)
    assert rig.db.shared == [True] and cond.is_true
    assert "exchanged at Entra" in cond.message
    assert "a session of that identity in database 'mydb' on" in cond.message
    assert "logged in 4s ago by another of its resources' probes" in cond.message
    assert "read a table's columns as app-name" in cond.message

    rig.clock.now += 110  # past the interval: probed again
    outcome, body = await rig.run(body)
    assert rig.db.shared == [True, False]
    assert "which logged in to database 'mydb' on" in verified(outcome).message

    _, body = await rig.run({**body, "metadata": {**body["metadata"], "generation": 2}})
    assert rig.db.shared == [True, False, False]  # a new generation: its own login too


async def test_propagating_then_verified(rig):
    rig.exchange.reject(70021, "No matching federated identity record found", times=2)

    first, body = await rig.run(resource(sql=SQL))
    cond = verified(first)
    assert (cond.status, cond.reason) == ("False", "Propagating")
    assert first.retry is not None and first.retry.reason == Reason.PROPAGATING
    assert body["status"]["verification"]["propagatingSince"]
    assert conditions.find(first.status["conditions"], "Ready").reason == "Propagating"  # type: ignore[union-attr]
    propagating = [e for e in first.events if e.reason == "Propagating"]
    assert propagating and all(e.type == "Normal" for e in propagating)  # expected, not trouble

    rig.clock.now += 10
    second, body = await rig.run(body)
    assert verified(second).reason == "Propagating" and "10s ago" in verified(second).message

    rig.clock.now += 10
    third, body = await rig.run(body)
    assert verified(third).is_true and third.retry is None
    assert third.status["verification"]["propagatingSince"] is None  # removed by the merge patch
    assert "propagatingSince" not in body["status"]["verification"]


async def test_propagation_that_never_ends_is_no_matching_credential(rig):
    rig.exchange.reject(70021, "No matching federated identity record found", times=5)
    _, body = await rig.run(resource(sql=SQL))
    rig.clock.now += 61

    outcome, _ = await rig.run(body)

    cond = verified(outcome)
    assert (cond.status, cond.reason) == ("False", "NoMatchingFederatedCredential")
    assert "61s after it was written" in cond.message and "--propagation-timeout" in cond.message
    assert outcome.retry is None


async def test_a_wrong_issuer_is_named():
    rig = Rig(issuer="https://oidc.example/cluster")  # the tokens' issuer, not the operator's
    rig.exchange.reject(700211, "No matching federated identity record found for issuer")

    outcome, _ = await rig.run(resource(sql=SQL))

    cond = verified(outcome)
    assert cond.reason == "NoMatchingFederatedCredential"
    assert "https://oidc.example/cluster" in cond.message and ISSUER in cond.message
    assert "--issuer" in cond.message


@pytest.mark.parametrize(
    ("code", "reason", "says"),
    [
        (700213, "NoMatchingFederatedCredential", "subject"),
        (7002138, "NoMatchingFederatedCredential", "case included"),
        (700212, "TokenAudienceRejected", "audience"),
        (90061, "IssuerUnreachable", "anonymously"),
        (50166, "IssuerUnreachable", "anonymously"),
        (700024, "LoginFailed", "AADSTS700024"),
    ],
)
async def test_entra_rejections(rig, code, reason, says):
    rig.exchange.reject(code, "Entra's text")
    outcome, _ = await rig.run(resource(sql=SQL))
    cond = verified(outcome)
    assert (cond.status, cond.reason) == ("False", reason)
    assert says in cond.message and f"AADSTS{code}: Entra's text" in cond.message
    assert outcome.retry is None


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (failed(18456, LOGIN_FAILED), "DatabaseUserMissing"),
        (
            failed(18456, f"{LOGIN_FAILED} The server is not currently configured to accept this "),
            "TokenAudienceRejected",
        ),
        (failed(18456, f"{LOGIN_FAILED} Token is expired."), "LoginFailed"),
        (failed(229, "The SELECT permission was denied", "query"), "DatabaseReadDenied"),
        (failed(208, "Invalid object name", "query"), "LoginFailed"),
    ],
)
async def test_sql_failures(rig, failure, reason):
    rig.db.probe_failure = failure
    outcome, _ = await rig.run(resource(sql=SQL))
    cond = verified(outcome)
    assert (cond.status, cond.reason) == ("False", reason)
    assert f"({failure.failure.number})" in cond.message
    assert conditions.find(outcome.status["conditions"], "Ready").reason == reason  # type: ignore[union-attr]


async def test_an_outage_during_the_probe_keeps_verified_true(rig):
    _, body = await rig.run(resource(sql=SQL))
    rig.clock.now += 200
    rig.exchange.error = TransientError(Reason.CLOUD_UNAVAILABLE, "Entra answered 503")

    outcome, _ = await rig.run(body)

    assert verified(outcome).is_true
    assert outcome.retry is not None and outcome.retry.reason == Reason.CLOUD_UNAVAILABLE
