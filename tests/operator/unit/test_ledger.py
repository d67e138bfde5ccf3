"""Issue 18, over fakes: the ledger (what the operator made, out of tenants' reach) and the sweep
of database users. The user the operator created is dropped when no live, allowed resource backs
it, whatever status, ``Retain`` or a spec change left behind; a user another live resource still
uses stays; a re-spelled server keeps its user; the identities the operator federated are swept
after a restart."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest
from operator_fakes import (  # type: ignore[import-not-found]
    APP,
    OTHER_APP,
    TENANT,
    FakeKube,
    FakeStore,
    resource,
)
from sql_fakes import FakeDatabase  # type: ignore[import-not-found]
from swi_operator import conditions
from swi_operator.drift import PeeringGate
from swi_operator.errors import PermanentError, Reason, TransientError
from swi_operator.ledger import (
    LEDGER_NAME,
    SHARDS,
    ConfigMapLedgerStore,
    Ledger,
    MemoryLedgerStore,
    UserEntry,
)
from swi_operator.locks import KeyedLocks
from swi_operator.naming import subject_for
from swi_operator.pipeline import Outcome, Pipeline
from swi_operator.runtime import build_pipeline
from swi_operator.spec import ApplicationRef
from swi_operator.sql import SqlTarget
from swi_operator.steps.authorization import AuthorizationStep, KubePolicySource
from swi_operator.steps.database import DatabaseAccessStep
from swi_operator.steps.federation import IssuerSource
from swi_operator.sweep import CredentialSweep
from test_policy_gate import FakePolicyReader, policy_body  # type: ignore[import-not-found]

NS, OTHER_NS = "workload-demo", "other-team"
TARGET = SqlTarget("tcp:localhost,1433", "mydb")
SQL = {"server": TARGET.server, "database": TARGET.database, "roles": ["db_datareader"]}
APP_REF = ApplicationRef(APP)
SQL_GRANT = {"servers": ["localhost"], "databases": ["mydb", "otherdb"]}


class World:
    def __init__(self) -> None:
        self.store = FakeStore()
        self.store.add_identity(APP_REF)
        self.store.add_identity(ApplicationRef(OTHER_APP))
        self.kube = FakeKube()
        self.db = FakeDatabase()
        self.reader = FakePolicyReader()
        self.reader.bodies = [policy_body("demo", {"names": [NS, OTHER_NS]}, sql=SQL_GRANT)]
        self.policies = KubePolicySource(self.reader, True, ttl=0)
        self.ledger_store = MemoryLedgerStore()
        self.ledger = Ledger(self.ledger_store)
        self.step = DatabaseAccessStep(
            self.db, KeyedLocks(), ledger=self.ledger, resources=self.kube
        )
        self.identity_locks = KeyedLocks()
        self.pipeline: Pipeline = build_pipeline(
            self.store,
            self.kube,
            TENANT,
            None,
            (self.step,),
            gate=AuthorizationStep(self.policies, True),
            identity_locks=self.identity_locks,
            ledger=self.ledger,
        )

    def sweep(self, ledger: Ledger | None = None) -> CredentialSweep:
        return CredentialSweep(
            self.kube,
            self.store,
            IssuerSource(self.kube),
            self.policies,
            self.identity_locks,
            PeeringGate(self.kube, None, None),
            namespaces=(),
            require_policy=True,
            interval=3600,
            ledger=ledger or self.ledger,
            users=self.step,
        )

    async def reconcile(self, body: dict[str, Any]) -> dict[str, Any]:
        """Reconcile ``body`` as kopf would and keep it in the API with its new status."""
        outcome = await self.pipeline.reconcile(body)
        ready = conditions.find(outcome.status["conditions"], "Ready")
        assert ready is not None and ready.is_true, outcome.status["conditions"]
        meta = body["metadata"]
        kept = applied(body, outcome)
        self.kube.resources[(meta["namespace"], meta["name"])] = kept
        return kept

    def delete(self, body: dict[str, Any]) -> None:
        """Gone from the API without the operator's clean-up (Retain, or the finalizer removed)."""
        meta = body["metadata"]
        del self.kube.resources[(meta["namespace"], meta["name"])]

    def user_exists(self, name: str = "app-name") -> bool:
        return self.db.user(TARGET, name) is not None


def applied(body: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
    status = {**body.get("status", {}), **outcome.status}
    return {**body, "status": {k: v for k, v in status.items() if v is not None}}


@pytest.fixture
def world() -> World:
    return World()


async def test_the_ledger_records_the_user_and_the_identity_before_and_after(world: World) -> None:
    await world.reconcile(resource("reader", NS, sql=SQL))
    [entry] = await world.ledger.users()
    assert (entry.namespace, entry.resource, entry.user, entry.created) == (
        NS,
        "reader",
        "app-name",
        True,
    )
    assert entry.granted_roles == ("db_datareader",)
    assert await world.ledger.identities() == [APP_REF]
    # Written ahead: the CREATE USER fails, the entry stays (a crash would leave it too).
    world.db.fail["create_user"] = PermanentError(Reason.DATABASE_UNAVAILABLE, "boom")
    other_db = {**SQL, "database": "otherdb"}
    await world.pipeline.reconcile(resource("second", OTHER_NS, sql=other_db, service_account="x"))
    assert {e.resource for e in await world.ledger.users()} == {"reader", "second"}


async def test_retain_then_delete_loses_the_user_once_retain_is_not_allowed(world: World) -> None:
    demo = policy_body("demo", {"names": [NS]}, sql=SQL_GRANT)
    world.reader.bodies = [{**demo, "spec": {**demo["spec"], "allowRetain": True}}]
    body = await world.reconcile(resource("reader", NS, sql=SQL, deletionPolicy="Retain"))
    await world.pipeline.finalize(body)  # Retain: the user stays, its entry too
    world.delete(body)
    await world.sweep().sweep()
    assert world.user_exists()  # allowRetain: what it left stays, while the policy says so
    world.reader.bodies = [demo]  # the platform stops allowing Retain
    removed = await world.sweep().sweep()
    assert not world.user_exists()
    assert [r.subject for r in removed if "dropped the user" in r.name] == [f"{NS}/reader"]
    assert await world.ledger.users() == []


async def test_a_finalizer_stripped_delete_loses_the_user_and_a_live_one_keeps_it(
    world: World,
) -> None:
    kept = await world.reconcile(resource("kept", NS, sql=SQL))
    other_sql = {**SQL, "database": "otherdb"}
    gone = await world.reconcile(resource("gone", NS, sql=other_sql, service_account="gone"))
    world.delete(gone)
    await world.sweep().sweep()
    assert world.user_exists()  # kept's user in mydb
    assert world.db.user(SqlTarget(TARGET.server, "otherdb"), "app-name") is None
    assert [e.resource for e in await world.ledger.users()] == [kept["metadata"]["name"]]


async def test_withdrawing_the_policy_drops_the_user_whatever_status_says(world: World) -> None:
    body = await world.reconcile(resource("reader", NS, sql=SQL))
    # The tenant cannot write status, but even a status that forgot the user does not hide it.
    forged = {**body, "status": {}}
    world.kube.resources[(NS, "reader")] = forged
    world.reader.bodies = []  # the platform withdraws the policy
    await world.sweep().sweep()
    assert not world.user_exists()


async def test_moving_the_spec_to_another_identity_leaves_no_untracked_user(world: World) -> None:
    body = await world.reconcile(resource("reader", NS, sql=SQL))
    moved = {**body, "spec": {**body["spec"], "identity": {"applicationClientId": OTHER_APP}}}
    moved["status"] = {}  # as if the reconcile's release of the old user never ran
    world.kube.resources[(NS, "reader")] = moved
    await world.sweep().sweep()
    assert not world.user_exists()


async def test_a_user_another_live_resource_uses_stays_and_is_handed_over(world: World) -> None:
    first = await world.reconcile(resource("first", NS, sql=SQL))
    await world.reconcile(resource("second", OTHER_NS, sql=SQL, service_account="x"))
    entries = {e.resource: e for e in await world.ledger.users()}
    assert entries["first"].created and not entries["second"].created  # second adopted it
    world.delete(first)
    await world.sweep().sweep()
    assert world.user_exists()
    [heir] = await world.ledger.users()
    assert (heir.resource, heir.created) == ("second", True)


async def test_deleting_one_of_two_users_of_a_shared_identity_keeps_the_user(
    world: World,
) -> None:
    first = await world.reconcile(resource("first", NS, sql=SQL))
    await world.reconcile(resource("second", OTHER_NS, sql=SQL, service_account="x"))
    outcome = await world.pipeline.finalize(first)  # deletionPolicy Delete
    assert "DatabaseUserShared" in [e.reason for e in outcome.events]
    assert world.user_exists()
    [heir] = await world.ledger.users()
    assert (heir.resource, heir.created) == ("second", True)


async def test_a_re_spelled_server_keeps_the_user(world: World) -> None:
    body = await world.reconcile(resource("reader", NS, sql=SQL))
    respelled = {**SQL, "server": "localhost,1433"}
    again = {**body, "spec": {**body["spec"], "sql": respelled}}
    kept = await world.reconcile(again)
    assert world.user_exists()
    assert kept["status"]["databaseUser"]["created"] is True
    await world.sweep().sweep()
    assert world.user_exists()  # the entry under the new spelling is backed


async def test_a_lost_status_does_not_turn_the_created_user_into_an_adopted_one(
    world: World,
) -> None:
    body = await world.reconcile(resource("reader", NS, sql=SQL))
    again = await world.reconcile({**body, "status": {}})
    assert again["status"]["databaseUser"]["created"] is True
    outcome = await world.pipeline.finalize(again)
    assert not world.user_exists()
    assert "DatabaseUserDropped" in [e.reason for e in outcome.events]
    assert await world.ledger.users() == []


async def test_the_sweep_finds_federated_identities_after_a_restart(world: World) -> None:
    body = await world.reconcile(resource("reader", NS, sql=SQL))
    world.delete(body)  # gone (finalizer stripped); no policy or resource names APP any more
    world.reader.bodies = [
        policy_body("other", {"names": [NS]}, identity={"applicationClientId": OTHER_APP})
    ]
    # A new operator process: a fresh sweep, the ledger read back from where it is kept.
    restarted = world.sweep(Ledger(world.ledger_store))
    removed = await restarted.sweep()
    assert world.store.of(APP_REF) == []
    assert subject_for(NS, "workload-demo-service-account") in {r.subject for r in removed}


async def test_the_sweep_of_users_stays_in_the_served_namespaces(world: World) -> None:
    body = await world.reconcile(resource("reader", NS, sql=SQL))
    world.delete(body)
    sweep = CredentialSweep(
        world.kube,
        world.store,
        IssuerSource(world.kube),
        world.policies,
        world.identity_locks,
        PeeringGate(world.kube, None, None),
        namespaces=(OTHER_NS,),
        require_policy=True,
        interval=3600,
        ledger=world.ledger,
        users=world.step,
    )
    await sweep.sweep()
    assert world.user_exists()  # another operator's namespace: not this one's to sweep


def test_entries_round_trip_and_bad_ones_are_ignored() -> None:
    entry = UserEntry(NS, "r", "uid-1", APP, "tcp:h,1433", "db", APP, "u", True, ("b", "a"))
    assert UserEntry.from_json(entry.to_json()) == UserEntry(
        NS, "r", "uid-1", APP, "tcp:h,1433", "db", APP, "u", True, ("a", "b")
    )
    assert entry.key == UserEntry(NS, "r", "uid-1", APP, "h", "db", APP, "v", False).key
    assert UserEntry.from_json("{") is None
    assert UserEntry.from_json(entry.to_json().replace("tcp:h,1433", "h;Trusted=yes")) is None


async def test_onboarding_costs_one_ledger_write_per_identity_and_per_user(world: World) -> None:
    writes: list[dict[str, str | None]] = []
    patch = world.ledger_store.patch_ledger

    async def counting(changes: Any) -> None:
        writes.append(dict(changes))
        await patch(changes)

    world.ledger_store.patch_ledger = counting  # type: ignore[method-assign]
    await world.reconcile(resource("reader", NS, sql=SQL))
    assert [next(iter(w))[:3] for w in writes] == ["id.", "db."]
    again = await world.reconcile(resource("reader", NS, sql=SQL))
    await world.reconcile(again)  # settled: nothing written
    assert len(writes) == 2


async def test_what_a_deleted_retain_resource_left_does_not_keep_anothers_user(
    world: World,
) -> None:
    demo = policy_body("demo", {"names": [NS, OTHER_NS]}, sql=SQL_GRANT)
    world.reader.bodies = [{**demo, "spec": {**demo["spec"], "allowRetain": True}}]
    first = await world.reconcile(resource("first", NS, sql=SQL, deletionPolicy="Retain"))
    await world.pipeline.finalize(first)
    world.delete(first)  # its entry stays (Retain, allowed)
    await world.db.drop_user(TARGET, "app-name")  # a DBA cleans up by hand
    second = await world.reconcile(resource("second", OTHER_NS, sql=SQL, service_account="x"))
    assert second["status"]["databaseUser"]["created"] is True
    outcome = await world.pipeline.finalize(second)
    assert "DatabaseUserDropped" in [e.reason for e in outcome.events]
    assert not world.user_exists()


async def test_a_live_resources_own_revocation_comes_first_then_the_sweep(world: World) -> None:
    """Its status records the user: the revocation drops it and posts DatabaseUserDropped; the
    sweep waits one pass for that, and drops it itself only if it is still there."""
    await world.reconcile(resource("reader", NS, sql=SQL))
    world.reader.bodies = []  # withdrawn; the policy review has not run (yet)
    sweep = world.sweep()
    await sweep.sweep()
    assert world.user_exists()
    await sweep.sweep()
    assert not world.user_exists()


async def test_sharers_deleted_together_still_drop_the_user(world: World) -> None:
    """`kubectl delete sqlworkloadidentities --all`: the first finalizer hands the user over to
    a resource that is deleted a moment later, whose finalizer runs while the hand-over is being
    written. Releases of one user take turns, so the second sees the hand-over and drops it."""
    first = await world.reconcile(resource("first", NS, sql=SQL))
    second = await world.reconcile(resource("second", OTHER_NS, sql=SQL, service_account="x"))
    deleting = "2026-12-04T00:00:00Z"
    world.kube.resources[(NS, "first")]["metadata"]["deletionTimestamp"] = deleting
    real_put = world.ledger.put_user
    tasks: list[Any] = []

    async def put_user(entry: UserEntry) -> None:
        if entry.resource == "second" and not tasks:  # the hand-over to "second"
            world.kube.resources[(OTHER_NS, "second")]["metadata"]["deletionTimestamp"] = deleting
            tasks.append(asyncio.create_task(world.pipeline.finalize(second)))
            for _ in range(50):  # let it run as far as it can before the hand-over lands
                await asyncio.sleep(0)
        await real_put(entry)

    world.ledger.put_user = put_user  # type: ignore[method-assign]
    outcome = await world.pipeline.finalize(first)
    assert "DatabaseUserShared" in [e.reason for e in outcome.events]
    assert tasks, "the hand-over did not happen"
    await tasks[0]
    assert not world.user_exists(), "both released the user and neither dropped it"
    assert await world.ledger.users() == []


class FakeConfigMaps:
    """ConfigMaps in memory, as kube.KubernetesClient reads and merge-patches them; each patch
    is held until ``release`` so that writes can meet while one is in flight."""

    def __init__(self) -> None:
        self.maps: dict[str, dict[str, str]] = {}
        self.patches: list[tuple[str, dict[str, str | None]]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def read_config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        found = self.maps.get(name)
        return None if found is None else dict(found)

    async def patch_config_map(
        self, namespace: str, name: str, changes: Mapping[str, str | None]
    ) -> None:
        self.patches.append((name, dict(changes)))
        await self.gate.wait()
        data = self.maps.setdefault(name, {})
        for key, value in changes.items():
            if value is None:
                data.pop(key, None)
            else:
                data[key] = value


async def test_the_ledger_is_spread_over_sixteen_configmaps_by_key() -> None:
    maps = FakeConfigMaps()
    store = ConfigMapLedgerStore(maps, NS)
    keys = [f"db.{digit}{'0' * 31}" for digit in "0123456789abcdef"] + ["id.ffff", "odd"]
    for key in keys:
        await store.patch_ledger({key: "v"})
    assert set(maps.maps) == {f"{LEDGER_NAME}-{shard}" for shard in SHARDS}
    assert maps.maps[f"{LEDGER_NAME}-f"] == {f"db.f{'0' * 31}": "v", "id.ffff": "v"}
    assert "odd" in maps.maps[f"{LEDGER_NAME}-0"]
    assert await store.read_ledger() == dict.fromkeys(keys, "v")
    await store.patch_ledger({"id.ffff": None})
    assert "id.ffff" not in await ConfigMapLedgerStore(maps, NS).read_ledger()


async def test_writes_that_meet_on_a_shard_go_in_one_patch_and_wait_for_it() -> None:
    maps = FakeConfigMaps()
    store = ConfigMapLedgerStore(maps, NS)
    maps.gate.clear()  # the first patch stays in flight
    first = asyncio.create_task(store.patch_ledger({"db.a1": "1"}))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(store.patch_ledger({f"db.a{i}": str(i)})) for i in range(2, 12)]
    late = asyncio.create_task(store.patch_ledger({"db.a1": "latest"}))
    await asyncio.sleep(0.01)
    assert not any(t.done() for t in [first, *rest, late])  # nobody returns before its patch
    maps.gate.set()
    await asyncio.gather(first, *rest, late)
    assert len(maps.patches) == 2  # the one in flight, then everything that met behind it
    assert maps.maps[f"{LEDGER_NAME}-a"] == {"db.a1": "latest"} | {
        f"db.a{i}": str(i) for i in range(2, 12)
    }


async def test_a_failed_patch_fails_every_write_in_it_and_not_the_next() -> None:
    maps = FakeConfigMaps()
    store = ConfigMapLedgerStore(maps, NS)
    real = maps.patch_config_map
    failures = [TransientError(Reason.KUBERNETES_UNAVAILABLE, "503")]

    async def flaky(namespace: str, name: str, changes: Mapping[str, str | None]) -> None:
        if failures:
            raise failures.pop()
        await real(namespace, name, changes)

    maps.patch_config_map = flaky  # type: ignore[method-assign]
    with pytest.raises(TransientError):
        await store.patch_ledger({"db.b1": "1"})
    await store.patch_ledger({"db.b2": "2"})
    assert maps.maps[f"{LEDGER_NAME}-b"] == {"db.b2": "2"}


async def test_the_single_configmap_of_earlier_versions_moves_into_the_shards() -> None:
    maps = FakeConfigMaps()
    maps.maps[LEDGER_NAME] = {"db.c1": "old", "id.d2": "app"}
    store = ConfigMapLedgerStore(maps, NS)
    assert await store.read_ledger() == {"db.c1": "old", "id.d2": "app"}
    assert maps.maps[LEDGER_NAME] == {}
    assert maps.maps[f"{LEDGER_NAME}-c"] == {"db.c1": "old"}
    assert maps.maps[f"{LEDGER_NAME}-d"] == {"id.d2": "app"}
    assert await ConfigMapLedgerStore(maps, NS).read_ledger() == {"db.c1": "old", "id.d2": "app"}
