"""DatabaseAccessReady over in-memory fakes, through the whole pipeline: what is created, adopted,
granted and dropped, and what is never touched."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from operator_fakes import APP, TENANT, FakeKube, FakeStore, resource  # type: ignore[import-not-found]
from sql_fakes import FakeDatabase, FakeExchange, FakeTokens  # type: ignore[import-not-found]
from swi_operator import conditions
from swi_operator.cloud import ResolvedIdentity
from swi_operator.errors import Reason, TransientError
from swi_operator.locks import KeyedLocks
from swi_operator.pipeline import Outcome, Pipeline
from swi_operator.runtime import build_pipeline
from swi_operator.spec import ApplicationRef
from swi_operator.sql import SqlTarget, sid_of
from swi_operator.steps.database import DatabaseAccessStep
from swi_operator.steps.verification import VerificationStep

TARGET = SqlTarget("tcp:localhost,1433", "mydb")
SQL = {"server": TARGET.server, "database": TARGET.database, "roles": ["db_datareader"]}
SID = sid_of(APP)


class FakePrincipals:
    async def object_id(self, identity: ResolvedIdentity) -> str:
        return "0b5e0c1d-7b3f-4c2e-9a1d-0000000000b2"


@pytest.fixture
def db() -> FakeDatabase:
    return FakeDatabase()


def make_pipeline(db: FakeDatabase, form: str = "sid") -> Pipeline:
    store = FakeStore()
    store.add_identity(ApplicationRef(APP))
    kube = FakeKube()
    later = (
        DatabaseAccessStep(db, KeyedLocks(), form, FakePrincipals()),  # type: ignore[arg-type]
        VerificationStep(
            FakeTokens(kube.issuer), FakeExchange(), db, interval=3600, propagation_timeout=60
        ),
    )
    return build_pipeline(store, kube, TENANT, None, later)


def applied(body: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
    status = {**body.get("status", {}), **outcome.status}
    return {**body, "status": {k: v for k, v in status.items() if v is not None}}


def condition(outcome: Outcome, type_: str = "DatabaseAccessReady") -> conditions.Condition:
    found = conditions.find(outcome.status["conditions"], type_)
    assert found is not None
    return found


def reasons(outcome: Outcome) -> list[str]:
    return [e.reason for e in outcome.events]


async def test_creates_the_user_with_its_sid_and_grants_the_roles(db):
    outcome = await make_pipeline(db).reconcile(resource(sql=SQL))

    assert db.writes == ["CREATE USER app-name", "ADD db_datareader app-name"]
    user = db.user(TARGET, "app-name")
    assert user is not None and user.sid == SID and user.roles == {"db_datareader"}
    assert condition(outcome).reason == "AccessGranted"
    assert outcome.status["databaseUser"] == {
        "name": "app-name",
        "server": TARGET.server,
        "database": "mydb",
        "clientId": APP,
        "roles": ["db_datareader"],
        "grantedRoles": ["db_datareader"],
        "created": True,
    }
    assert {"DatabaseUserCreated", "DatabaseRoleGranted", "Ready"} <= set(reasons(outcome))
    assert condition(outcome, "Ready").is_true


async def test_a_second_pass_reads_and_writes_nothing(db):
    pipeline = make_pipeline(db)
    body = applied(resource(sql=SQL), await pipeline.reconcile(resource(sql=SQL)))
    db.writes.clear()

    again = await pipeline.reconcile(body)

    assert db.writes == []
    assert not again.changed
    assert again.events == []


async def test_user_name_from_the_spec_is_used(db):
    await make_pipeline(db).reconcile(resource(sql={**SQL, "userName": "reader]; --"}))
    assert db.user(TARGET, "reader]; --") is not None


async def test_object_id_form(db):
    await make_pipeline(db, "object-id").reconcile(resource(sql=SQL))
    assert db.writes[0] == "CREATE USER app-name OBJECT_ID 0b5e0c1d-7b3f-4c2e-9a1d-0000000000b2"


async def test_an_existing_user_with_the_identitys_sid_is_adopted_and_kept_on_delete(db):
    db.add_user(TARGET, "Legacy Reader", SID, {"db_datawriter"})
    pipeline = make_pipeline(db)
    spec = {**SQL, "roles": ["db_datareader", "db_datawriter"]}

    outcome = await pipeline.reconcile(resource(sql=spec))

    assert db.writes == ["ADD db_datareader Legacy Reader"]  # no CREATE; db_datawriter was there
    assert "DatabaseUserAdopted" in reasons(outcome)
    record = outcome.status["databaseUser"]
    assert record["name"] == "Legacy Reader" and record["created"] is False
    assert record["grantedRoles"] == ["db_datareader"]
    assert "it is not named [app-name]" in condition(outcome).message

    body = applied(resource(sql=spec), outcome)
    db.writes.clear()
    finalized = await pipeline.finalize(body)
    assert db.writes == ["DROP db_datareader Legacy Reader"]  # the user and its own role stay
    user = db.user(TARGET, "Legacy Reader")
    assert user is not None and user.roles == {"db_datawriter"}
    assert "DatabaseRoleRevoked" in reasons(finalized)


async def test_a_user_of_that_name_with_another_sid_is_a_conflict(db):
    db.add_user(TARGET, "app-name", sid_of("00000000-0000-0000-0000-000000000009"))

    outcome = await make_pipeline(db).reconcile(resource(sql=SQL))

    cond = condition(outcome)
    assert (cond.status, cond.reason) == ("False", Reason.DATABASE_USER_CONFLICT)
    assert "set spec.sql.userName" in cond.message and "[app-name]" in cond.message
    assert db.writes == []
    assert condition(outcome, "Ready").reason == Reason.DATABASE_USER_CONFLICT


async def test_unknown_roles_grant_nothing(db):
    outcome = await make_pipeline(db).reconcile(
        resource(sql={**SQL, "roles": ["db_datareader", "app_readers"]})
    )
    cond = condition(outcome)
    assert (cond.status, cond.reason) == ("False", Reason.DATABASE_ROLE_NOT_FOUND)
    assert "[app_readers]" in cond.message
    assert db.writes == []


async def test_roles_are_added_and_dropped_but_never_ones_it_did_not_grant(db):
    db.add_user(TARGET, "app-name", SID, {"db_ddladmin"})  # a DBA's grant
    pipeline = make_pipeline(db)
    spec = {**SQL, "roles": ["db_datareader", "db_datawriter", "db_ddladmin"]}
    body = applied(resource(sql=spec), await pipeline.reconcile(resource(sql=spec)))
    assert body["status"]["databaseUser"]["grantedRoles"] == ["db_datareader", "db_datawriter"]
    db.writes.clear()

    narrower = {**SQL, "roles": ["db_datareader"]}
    outcome = await pipeline.reconcile(
        {**body, "spec": {**body["spec"], "sql": narrower}, "metadata": body["metadata"]}
    )

    assert db.writes == ["DROP db_datawriter app-name"]
    user = db.user(TARGET, "app-name")
    assert user is not None and user.roles == {"db_datareader", "db_ddladmin"}
    assert outcome.status["databaseUser"]["grantedRoles"] == ["db_datareader"]


async def test_out_of_band_drop_and_role_removal_are_repaired(db):
    pipeline = make_pipeline(db)
    body = applied(resource(sql=SQL), await pipeline.reconcile(resource(sql=SQL)))
    db.users[TARGET].clear()
    db.writes.clear()

    outcome = await pipeline.reconcile(body)

    assert db.writes == ["CREATE USER app-name", "ADD db_datareader app-name"]
    created = next(e for e in outcome.events if e.reason == "DatabaseUserCreated")
    assert "again" in created.message
    assert outcome.status["databaseUser"]["created"] is True


async def test_delete_drops_the_user_it_created_and_retain_keeps_it(db):
    pipeline = make_pipeline(db)
    body = applied(resource(sql=SQL), await pipeline.reconcile(resource(sql=SQL)))
    retained = {**body, "spec": {**body["spec"], "deletionPolicy": "Retain"}}

    kept = await pipeline.finalize(retained)
    assert db.user(TARGET, "app-name") is not None
    assert "DatabaseUserRetained" in reasons(kept)

    dropped = await pipeline.finalize(body)
    assert db.user(TARGET, "app-name") is None
    assert "DatabaseUserDropped" in reasons(dropped)


async def test_removing_spec_sql_drops_the_user_and_reports_not_requested(db):
    pipeline = make_pipeline(db)
    body = applied(resource(sql=SQL), await pipeline.reconcile(resource(sql=SQL)))
    without = {**body, "spec": {k: v for k, v in body["spec"].items() if k != "sql"}}

    outcome = await pipeline.reconcile(without)

    assert db.user(TARGET, "app-name") is None
    assert outcome.status["databaseUser"] is None
    assert condition(outcome).reason == "NotRequested" and condition(outcome).is_true


async def test_moving_to_another_database_releases_the_old_user(db):
    pipeline = make_pipeline(db)
    body = applied(resource(sql=SQL), await pipeline.reconcile(resource(sql=SQL)))
    moved = {**SQL, "database": "otherdb"}

    await pipeline.reconcile({**body, "spec": {**body["spec"], "sql": moved}})

    assert db.user(TARGET, "app-name") is None
    assert db.user(SqlTarget(TARGET.server, "otherdb"), "app-name") is not None


async def test_a_user_with_another_sid_is_never_dropped(db):
    pipeline = make_pipeline(db)
    body = applied(resource(sql=SQL), await pipeline.reconcile(resource(sql=SQL)))
    db.users[TARGET].clear()  # dropped out of band, then someone else's user took the name
    db.add_user(TARGET, "app-name", sid_of("00000000-0000-0000-0000-000000000009"))

    await pipeline.finalize(body)

    assert db.user(TARGET, "app-name") is not None


async def test_a_transient_failure_keeps_a_true_condition_and_asks_for_a_retry(db):
    pipeline = make_pipeline(db)
    body = applied(resource(sql=SQL), await pipeline.reconcile(resource(sql=SQL)))
    db.fail["role_names"] = TransientError(Reason.DATABASE_UNAVAILABLE, "40613")

    outcome = await pipeline.reconcile(body)

    assert condition(outcome).is_true
    assert outcome.retry is not None and outcome.retry.reason == Reason.DATABASE_UNAVAILABLE


async def test_a_name_sql_cannot_hold_needs_user_name(db):
    store = FakeStore()
    store.add_identity(ApplicationRef(APP))
    step = DatabaseAccessStep(db, KeyedLocks())
    pipeline = build_pipeline(store, FakeKube(), TENANT, None, (step,))
    too_long = {**SQL, "userName": None}
    store_resolve = store.resolve

    async def long_name(ref):  # type: ignore[no-untyped-def]
        found = await store_resolve(ref)
        return ResolvedIdentity(found.ref, found.client_id, found.tenant_id, "x" * 200, "o")

    store.resolve = long_name  # type: ignore[method-assign]
    outcome = await pipeline.reconcile(
        resource(sql={k: v for k, v in too_long.items() if v is not None})
    )
    cond = condition(outcome)
    assert (cond.status, cond.reason) == ("False", Reason.INVALID_SPEC)
    assert "spec.sql.userName" in cond.message


async def test_a_forged_status_cannot_steer_a_drop_at_another_identitys_user(db):
    """status.databaseUser naming another tenant's user (its client id and name) is not obeyed."""
    pipeline = make_pipeline(db)
    body = applied(resource(sql=SQL), await pipeline.reconcile(resource(sql=SQL)))
    victim_client = "00000000-0000-0000-0000-00000000beef"
    db.add_user(TARGET, "victim", sid_of(victim_client))
    forged_record = {**body["status"]["databaseUser"], "clientId": victim_client, "name": "victim"}
    forged = {**body, "status": {**body["status"], "databaseUser": forged_record}}

    outcome = await pipeline.finalize(forged)

    assert db.user(TARGET, "victim") is not None
    assert "DatabaseUserNotRemoved" in reasons(outcome)


async def test_a_database_with_a_ddl_trigger_is_refused_before_any_ddl(db):
    """Issue 18, finding 3: a DDL trigger runs with the operator's admin rights."""
    db.triggers[TARGET] = ["make_me_dbo"]
    outcome = await make_pipeline(db).reconcile(resource(sql=SQL))
    refused = condition(outcome)
    assert (refused.status, refused.reason) == ("False", "DatabaseHasDdlTriggers")
    assert "[make_me_dbo]" in refused.message and "allowDdlTriggers" in refused.message
    assert db.writes == []


async def test_a_ddl_trigger_stops_the_drop_too_and_is_reported(db):
    pipeline = make_pipeline(db)
    body = applied(resource(sql=SQL), await pipeline.reconcile(resource(sql=SQL)))
    db.writes.clear()
    db.triggers[TARGET] = ["on_drop"]
    outcome = await pipeline.finalize(body)
    assert db.writes == []
    assert "DatabaseHasDdlTriggers" in reasons(outcome)


async def test_a_policy_that_allows_ddl_triggers_lets_the_work_through(db):
    from swi_operator.spec import parse_spec
    from swi_operator.steps import Context

    db.triggers[TARGET] = ["audited"]
    step = DatabaseAccessStep(db, KeyedLocks())
    store = FakeStore()
    store.add_identity(ApplicationRef(APP))
    body = resource(sql=SQL)
    ctx = Context(
        pipeline_resource_ref(body), parse_spec(body["spec"]), {}, TENANT, allow_ddl_triggers=True
    )
    ctx.identity = await store.resolve(ApplicationRef(APP))
    result = await step.reconcile(ctx)
    assert result.reason == "AccessGranted"
    assert db.writes == ["CREATE USER app-name", "ADD db_datareader app-name"]


def pipeline_resource_ref(body: dict[str, Any]) -> Any:
    from swi_operator.pipeline import resource_ref

    return resource_ref(body)


async def test_a_forged_server_with_an_odbc_keyword_is_never_used(db):
    """Issue 18, low: status.databaseUser.server reaches ODBC's SERVER=; ';' adds keywords."""
    from swi_operator.errors import PermanentError, Reason

    pipeline = make_pipeline(db)
    body = applied(resource(sql=SQL), await pipeline.reconcile(resource(sql=SQL)))
    forged = {**body["status"]["databaseUser"], "server": "evil;Authentication=x"}
    body["status"]["databaseUser"] = forged
    body["spec"].pop("sql")
    db.writes.clear()
    # Any session to the forged server would show up as this failure, reported as a Warning.
    db.fail["find_principals"] = PermanentError(Reason.DATABASE_REJECTED, "connected")
    outcome = await pipeline.reconcile(body)
    assert "DatabaseUserNotRemoved" not in reasons(outcome), "a session was opened"
    assert db.writes == []


class FakeClusters:
    """Other clusters' issuers federated on the identity (``OtherClusters``)."""

    def __init__(self) -> None:
        self.issuers_now: list[str] = []
        self.asked: list[tuple[str, str]] = []

    async def issuers(self, identity: str, client_id: str) -> list[str]:
        self.asked.append((identity, client_id))
        return list(self.issuers_now)


async def test_a_user_another_cluster_may_use_is_kept_until_the_sweep_finds_it_alone(db):
    """Two clusters federate one identity and share its database user; each operator sees only
    its own resources. The cluster that created the user keeps it, with its ledger entry, while
    another cluster's issuer is federated; the sweep drops it once none is."""
    from swi_operator.ledger import Ledger, MemoryLedgerStore, UserEntry

    store = FakeStore()
    store.add_identity(ApplicationRef(APP))
    kube = FakeKube()
    ledger = Ledger(MemoryLedgerStore())
    clusters = FakeClusters()
    step = DatabaseAccessStep(db, KeyedLocks(), "sid", None, ledger, None, clusters)
    pipeline = build_pipeline(store, kube, TENANT, None, (step,), ledger=ledger)
    body = applied(resource(sql=SQL), await pipeline.reconcile(resource(sql=SQL)))
    assert db.user(TARGET, "app-name") is not None

    clusters.issuers_now = ["https://other-cluster.example"]
    finalized = await pipeline.finalize(body)
    assert db.user(TARGET, "app-name") is not None  # the other cluster's pods still log in
    kept = next(e for e in finalized.events if e.reason == "DatabaseUserKept")
    assert "https://other-cluster.example" in kept.message
    (entry,) = await ledger.users()
    assert entry.created and entry.identity == APP and clusters.asked == [(APP, APP)]
    # Marked for the sweep (which otherwise keeps what policies would let a resource retain).
    assert entry.released and UserEntry.from_json(entry.to_json()) == entry
    assert '"released"' not in dataclasses.replace(entry, released=False).to_json()

    assert await step.release_entry(entry) is None  # the sweep: still federated elsewhere
    assert db.user(TARGET, "app-name") is not None and await ledger.users() == [entry]
    clusters.issuers_now = []  # the other cluster let go
    assert "dropped the user" in (await step.release_entry(entry) or "")
    assert db.user(TARGET, "app-name") is None and await ledger.users() == []


async def test_no_other_cluster_is_asked_about_when_nothing_would_be_undone(db):
    clusters = FakeClusters()
    clusters.issuers_now = ["https://other-cluster.example"]
    db.add_user(TARGET, "app-name", SID, {"db_datareader"})  # there before: adopted as found
    store = FakeStore()
    store.add_identity(ApplicationRef(APP))
    step = DatabaseAccessStep(db, KeyedLocks(), "sid", None, None, None, clusters)
    pipeline = build_pipeline(store, FakeKube(), TENANT, None, (step,))
    body = applied(resource(sql=SQL), await pipeline.reconcile(resource(sql=SQL)))
    await pipeline.finalize(body)
    assert clusters.asked == []
    assert db.user(TARGET, "app-name") is not None


async def test_a_user_another_session_created_meanwhile_is_adopted_never_claimed(db):
    """Two clusters' operators on one identity both find no user and both CREATE it: the one
    that loses (15023) retries, adopts the other's user and never drops it on delete."""
    from swi_operator.sql import UserExists

    pipeline = make_pipeline(db)
    db.fail["create_user"] = UserExists("User 'app-name' already exists (15023)")
    first = await pipeline.reconcile(resource(sql=SQL))
    busy = condition(first)
    assert busy.status == "False" and busy.reason == Reason.DATABASE_BUSY.value
    assert "another session" in busy.message
    db.add_user(TARGET, "app-name", SID)  # what the other cluster's operator made

    second = await pipeline.reconcile(applied(resource(sql=SQL), first))
    assert "DatabaseUserAdopted" in reasons(second)
    assert second.status["databaseUser"]["created"] is False

    db.writes.clear()
    await pipeline.finalize(applied(resource(sql=SQL), second))
    assert db.writes == ["DROP db_datareader app-name"]  # the role it granted, not the user
    assert db.user(TARGET, "app-name") is not None
