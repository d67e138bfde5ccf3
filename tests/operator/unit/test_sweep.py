"""Issue 18, over fakes: revocation and deletion are decided by live, allowed resources' specs,
never by a service account annotation; the sweep deletes this cluster's credentials that nothing
allowed backs, whatever status, finalizers or ``deletionPolicy`` say, and only those."""

from __future__ import annotations

from typing import Any

import pytest
from operator_fakes import (  # type: ignore[import-not-found]
    APP,
    ISSUER,
    OTHER_APP,
    TENANT,
    FakeKube,
    FakeStore,
    resource,
)
from swi_operator.backing import Backing, Grant, backed_grants, parse_subject
from swi_operator.cloud import FederatedCredential
from swi_operator.drift import PeeringGate
from swi_operator.locks import KeyedLocks
from swi_operator.naming import credential_name, subject_for
from swi_operator.pipeline import Outcome
from swi_operator.runtime import build_pipeline
from swi_operator.spec import ApplicationRef
from swi_operator.steps.authorization import AuthorizationStep, KubePolicySource
from swi_operator.steps.federation import IssuerSource
from swi_operator.steps.service_account import OWNER
from swi_operator.sweep import CredentialSweep
from test_policy_gate import FakePolicyReader, policy_body  # type: ignore[import-not-found]

NS, OTHER_NS = "workload-demo", "other-team"
APP_REF, OTHER_REF = ApplicationRef(APP), ApplicationRef(OTHER_APP)


def credential(namespace: str, sa: str, issuer: str = ISSUER) -> FederatedCredential:
    return FederatedCredential(
        name=credential_name(issuer, namespace, sa),
        issuer=issuer,
        subject=subject_for(namespace, sa),
        audiences=("api://AzureADTokenExchange",),
    )


class World:
    def __init__(self) -> None:
        self.store = FakeStore()
        self.store.add_identity(APP_REF)
        self.store.add_identity(OTHER_REF)
        self.kube = FakeKube()
        self.reader = FakePolicyReader()
        self.reader.bodies = [policy_body("demo", {"names": [NS]})]
        self.policies = KubePolicySource(self.reader, True, ttl=0)
        self.locks = KeyedLocks()

    def sweep(self, namespaces: tuple[str, ...] = ()) -> CredentialSweep:
        return CredentialSweep(
            self.kube,
            self.store,
            IssuerSource(self.kube),
            self.policies,
            self.locks,
            PeeringGate(self.kube, None, None),
            namespaces=namespaces,
            require_policy=True,
            interval=3600,
        )

    def add(self, body: dict[str, Any]) -> dict[str, Any]:
        meta = body["metadata"]
        self.kube.resources[(meta["namespace"], meta["name"])] = body
        return body

    def names(self, ref: ApplicationRef = APP_REF) -> set[str]:
        return {c.subject for c in self.store.of(ref)}


@pytest.fixture
def world() -> World:
    return World()


def test_parse_subject_accepts_only_service_account_subjects() -> None:
    assert parse_subject("system:serviceaccount:ns:sa") == ("ns", "sa")
    for bad in ("system:serviceaccount:ns", "system:serviceaccount:ns:sa:x", "repo:x:y", ""):
        assert parse_subject(bad) is None


async def test_the_sweep_removes_what_no_live_allowed_resource_backs(world: World) -> None:
    world.add(resource("kept", NS, service_account="kept"))
    gone = credential(NS, "retained-then-deleted")  # Retain then delete: no resource any more
    deleting = world.add(resource("deleting", NS, service_account="deleting"))
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    deleting["metadata"]["finalizers"] = []  # the finalizer removed by the tenant
    unallowed = world.add(resource("db-owner", NS, service_account="db-owner"))
    unallowed["spec"]["sql"] = {"server": "s.database.windows.net", "database": "d"}
    moved = world.add(resource("moved", NS, service_account="moved", identity=None))
    moved["spec"]["identity"] = {"applicationClientId": OTHER_APP}  # its old credential: APP
    for sa in ("kept", "deleting", "db-owner", "moved"):
        world.store.put(APP_REF, credential(NS, sa))
    world.store.put(APP_REF, gone)
    foreign_issuer = credential(NS, "elsewhere", issuer="https://other.example")
    world.store.put(APP_REF, foreign_issuer)

    removed = await world.sweep().sweep()

    assert world.names() == {subject_for(NS, "kept"), foreign_issuer.subject}
    assert {r.subject for r in removed} == {
        subject_for(NS, sa) for sa in ("retained-then-deleted", "deleting", "db-owner", "moved")
    }


async def test_a_withdrawn_policy_is_swept_even_with_no_resource_left(world: World) -> None:
    world.add(resource("reader", NS, service_account="reader"))
    world.store.put(APP_REF, credential(NS, "reader"))
    sweep = world.sweep()
    assert await sweep.sweep() == []  # allowed and backed: nothing to do
    world.reader.bodies = []  # the platform withdraws the policy
    world.kube.resources.clear()  # and the tenant had deleted the resource with Retain
    removed = await sweep.sweep()
    assert [r.subject for r in removed] == [subject_for(NS, "reader")]
    assert world.store.of(APP_REF) == []


async def test_the_sweep_stays_in_the_served_namespaces(world: World) -> None:
    world.store.put(APP_REF, credential(OTHER_NS, "theirs"))
    world.store.put(APP_REF, credential(NS, "mine"))
    world.reader.bodies = [policy_body("demo", {"names": [NS, OTHER_NS]})]
    await world.sweep(namespaces=(NS,)).sweep()
    assert world.names() == {subject_for(OTHER_NS, "theirs")}


async def test_backing_ignores_status_annotations_and_the_resource_itself(world: World) -> None:
    me = world.add(resource("me", NS, service_account="shared"))
    policies = KubePolicySource(world.reader, True, ttl=0)
    grant = Grant(APP_REF.key, NS, "shared")
    assert grant in await backed_grants([me], policies, True)
    assert not await Backing(world.kube, policies).elsewhere(grant, me["metadata"]["uid"])
    other = world.add(resource("other", NS, service_account="shared"))
    assert await Backing(world.kube, policies).elsewhere(grant, me["metadata"]["uid"])
    other["spec"]["identity"] = {"applicationClientId": OTHER_APP}  # not the same identity
    assert not await Backing(world.kube, policies).elsewhere(grant, me["metadata"]["uid"])


def applied(body: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
    status = {**body.get("status", {}), **outcome.status}
    return {**body, "status": {k: v for k, v in status.items() if v is not None}}


@pytest.mark.parametrize("when", ["revocation", "deletion"])
async def test_an_owner_annotation_naming_another_resource_saves_no_credential(
    world: World, when: str
) -> None:
    """Finding 1: the tenant annotates its own service account with another resource's name."""
    gate = AuthorizationStep(world.policies, require_policy=True)
    pipeline = build_pipeline(
        world.store,
        world.kube,
        TENANT,
        None,
        gate=gate,
        backing=Backing(world.kube, world.policies),
    )
    body = world.add(resource("reader", NS, service_account="reader"))
    decoy = world.add(resource("decoy", NS, service_account="decoy"))
    body = applied(body, await pipeline.reconcile(body))
    world.kube.resources[(NS, "reader")] = body
    assert world.names() == {subject_for(NS, "reader")}
    world.kube.service_accounts[(NS, "reader")][OWNER] = decoy["metadata"]["name"]

    if when == "revocation":
        world.reader.bodies = []
        outcome = await pipeline.reconcile(body)
        assert any(e.reason == "AccessRevoked" for e in outcome.events)
    else:
        body["spec"]["deletionPolicy"] = "Delete"
        await pipeline.finalize(body)
    assert world.names() == set()


async def test_what_a_retain_resource_left_stays_only_while_a_policy_allows_retain(
    world: World,
) -> None:
    world.store.put(APP_REF, credential(NS, "retained"))
    world.reader.bodies = [policy_body("demo", {"names": [NS]}, allowRetain=True)]
    sweep = world.sweep()
    assert await sweep.sweep() == []
    world.reader.bodies = [policy_body("demo", {"names": [NS]})]  # allowRetain withdrawn
    assert [r.subject for r in await sweep.sweep()] == [subject_for(NS, "retained")]


async def test_a_resource_may_not_federate_the_operators_own_identity(world: World) -> None:
    pipeline = build_pipeline(world.store, world.kube, TENANT, None, operator_client_id=APP)
    outcome = await pipeline.reconcile(resource("borrow", NS, service_account="borrow"))
    federation = next(c for c in outcome.status["conditions"] if c["type"] != "Ready")
    assert (
        federation["reason"] == "InvalidSpec"
        and "operator's own identity" in (federation["message"])
    )
    assert world.store.of(APP_REF) == [] and world.store.writes["upsert"] == 0


class _Pools:
    def __init__(self, bodies: list[dict[str, Any]]) -> None:
        self.bodies = bodies

    async def list_pools(self) -> list[dict[str, Any]]:
        return self.bodies


async def test_the_sweep_keeps_a_pool_resource_s_credential_on_any_member_and_only_while_allowed(
    world: World,
) -> None:
    """Issue 21: a resource on a pool backs its subject on every member of the pool (its status,
    which names one member, decides nothing); a policy naming the pool allows it; a member that
    left the pool and a pool withdrawn leave nothing backed."""
    from swi_operator.pool import PoolSource

    members = [{"applicationClientId": APP}, {"applicationClientId": OTHER_APP}]
    pools = _Pools([{"metadata": {"name": "readers"}, "spec": {"members": members}}])
    world.reader.bodies = [policy_body("pool", {"names": [NS]}, identity={"poolName": "readers"})]
    world.add(resource("on-pool", NS, service_account="on-pool", identity={"poolName": "readers"}))
    world.store.put(APP_REF, credential(NS, "on-pool"))
    world.store.put(OTHER_REF, credential(NS, "on-pool"))  # a copy on another member: backed too
    world.store.put(OTHER_REF, credential(NS, "nobody"))
    source = PoolSource(pools, ttl=0)
    sweep = CredentialSweep(
        world.kube,
        world.store,
        IssuerSource(world.kube),
        world.policies,
        world.locks,
        PeeringGate(world.kube, None, None),
        namespaces=(),
        require_policy=True,
        interval=3600,
        pools=source,
    )

    removed = await sweep.sweep()

    assert {r.subject for r in removed} == {subject_for(NS, "nobody")}
    assert world.names(APP_REF) == world.names(OTHER_REF) == {subject_for(NS, "on-pool")}
    pools.bodies[0]["spec"]["members"] = members[1:]  # APP leaves the pool
    await sweep.sweep()
    assert world.names(APP_REF) == set() and world.names(OTHER_REF) == {subject_for(NS, "on-pool")}
    world.reader.bodies = []  # the policy naming the pool withdrawn: revoked
    await sweep.sweep()
    assert world.names(OTHER_REF) == set()
