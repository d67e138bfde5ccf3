"""Identity pools (issue 21) over in-memory fakes: which member a service account gets, that it
stays there, when it moves and what it says, a full pool, and what a pool resource backs."""

from __future__ import annotations

import asyncio
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
from swi_operator.backing import Grant, backed_grants
from swi_operator.cloud import FederatedCredential
from swi_operator.naming import subject_for
from swi_operator.pipeline import Outcome, Pipeline
from swi_operator.pool import Pool, PoolSource, choose_member, parse_pool
from swi_operator.runtime import build_pipeline
from swi_operator.spec import ApplicationRef, ManagedIdentityRef, PoolRef, SpecError, parse_spec

THIRD_APP = "33333333-3333-3333-3333-333333333333"
MEMBERS = [APP, OTHER_APP, THIRD_APP]


def pool_body(name: str = "readers", members: list[str] | None = None, **spec: Any) -> dict:
    return {
        "metadata": {"name": name, "generation": 1},
        "spec": {
            "members": [{"applicationClientId": m} for m in (members or MEMBERS)],
            **spec,
        },
    }


class Pools:
    def __init__(self, *bodies: dict) -> None:
        self.bodies = list(bodies)
        self.lists = 0

    async def list_pools(self) -> list[dict]:
        self.lists += 1
        return self.bodies


@pytest.fixture
def store() -> FakeStore:
    s = FakeStore()
    for client in MEMBERS:
        s.add_identity(ApplicationRef(client))
    return s


@pytest.fixture
def pools() -> Pools:
    return Pools(pool_body())


@pytest.fixture
def pipeline(store: FakeStore, pools: Pools) -> Pipeline:
    return build_pipeline(store, FakeKube(), TENANT, None, pools=PoolSource(pools, ttl=0))


def on_pool(name: str, namespace: str = "team-a", pool: str = "readers", **kw: Any) -> dict:
    return resource(
        name, namespace, service_account=f"{name}-sa", identity={"poolName": pool}, **kw
    )


def applied(body: dict[str, Any], outcome: Outcome) -> dict[str, Any]:
    return {**body, "status": {**body.get("status", {}), **outcome.status}}


def fill(store: FakeStore, client: str, n: int, issuer: str = "https://other.example") -> None:
    for i in range(n):
        store.put(
            ApplicationRef(client),
            FederatedCredential(f"{client[:4]}-x-{i}", issuer, f"subject-{i}", ("a",)),
        )


def cond(outcome: Outcome, type_: str) -> dict[str, Any]:
    return next(c for c in outcome.status["conditions"] if c["type"] == type_)


def test_a_pool_and_its_errors_are_parsed() -> None:
    pool = parse_pool(pool_body(reservedPerMember=2))
    assert pool.capacity == 18
    assert [m.key for m in pool.members] == [f"app:{m}" for m in MEMBERS]
    with pytest.raises(SpecError) as err:
        parse_pool(pool_body(members=[APP, APP.upper()], reservedPerMember=20))
    assert "spec.members[1]: Duplicate value" in str(err.value)
    assert "spec.reservedPerMember" in str(err.value)
    with pytest.raises(SpecError, match=r"spec.members: Required value"):
        parse_pool({"metadata": {"name": "p"}, "spec": {"members": []}})
    # People list up to 100 members; growth may take a pool to 500 (10,000 credentials).
    assert parse_pool(pool_body(growth={"maxMembers": 500})).max_members == 500
    with pytest.raises(SpecError, match=r"spec.growth.maxMembers: Invalid value 501: 0 to 500"):
        parse_pool(pool_body(growth={"maxMembers": 501}))
    many = [f"{i:08d}-0000-4000-8000-000000000000" for i in range(101)]
    with pytest.raises(SpecError, match=r"spec.members: Too many: 101, at most 100"):
        parse_pool(pool_body(members=many))


def test_a_resource_names_a_pool_or_one_identity_never_both() -> None:
    spec = parse_spec({"serviceAccountName": "sa", "identity": {"poolName": "readers"}})
    assert spec.identity == PoolRef("readers")
    with pytest.raises(SpecError, match="set exactly one of"):
        parse_spec(
            {"serviceAccountName": "sa", "identity": {"poolName": "p", "applicationClientId": APP}}
        )
    with pytest.raises(SpecError, match=r"spec.sql.userName: not allowed with"):
        parse_spec(
            {
                "serviceAccountName": "sa",
                "identity": {"poolName": "p"},
                "sql": {"server": "s", "database": "d", "userName": "u"},
            }
        )


def test_the_choice_adopts_first_then_fills_in_order() -> None:
    pool = Pool("p", tuple(ApplicationRef(m) for m in MEMBERS), reserved=1)
    ids = [_resolved(m) for m in MEMBERS]
    full = [FederatedCredential(f"c{i}", "i", f"s{i}", ("a",)) for i in range(19)]
    mine = FederatedCredential("mine", ISSUER, "me", ("a",))
    assert choose_member(pool, [(ids[0], full), (ids[1], []), (ids[2], [])], ISSUER, "me") is ids[1]
    assert (
        choose_member(pool, [(ids[0], full), (ids[1], []), (ids[2], [mine])], ISSUER, "me")
        is ids[2]
    )
    assert choose_member(pool, [(ids[0], full), (ids[1], full)], ISSUER, "me") is None


def _resolved(client: str) -> Any:
    from swi_operator.cloud import ResolvedIdentity

    return ResolvedIdentity(ApplicationRef(client), client, TENANT, f"name-{client[:4]}", "obj")


async def test_service_accounts_fill_the_first_member_then_the_next(pipeline, store):
    fill(store, APP, 18)  # another cluster's, or a person's: they count
    placed = []
    for i in range(4):
        outcome = await pipeline.reconcile(on_pool(f"r{i}"))
        assert cond(outcome, "Ready")["status"] == "True", outcome.status
        placed.append(outcome.status["identity"]["clientId"])
        assert outcome.status["identity"]["pool"] == "readers"
    assert placed == [APP, APP, OTHER_APP, OTHER_APP]
    assert len(store.of(ApplicationRef(APP))) == 20
    assert {c.subject for c in store.of(ApplicationRef(OTHER_APP))} == {
        subject_for("team-a", "r2-sa"),
        subject_for("team-a", "r3-sa"),
    }


async def test_a_placed_service_account_stays_even_when_an_earlier_member_frees_up(pipeline, store):
    fill(store, APP, 20)
    body = on_pool("r")
    first = await pipeline.reconcile(body)
    assert first.status["identity"]["clientId"] == OTHER_APP
    store.credentials[f"app:{APP}"].clear()  # room again on the first member
    again = await pipeline.reconcile(applied(body, first))
    assert again.status["identity"]["clientId"] == OTHER_APP
    assert not any(e.reason == "PoolMemberChanged" for e in again.events)
    assert store.of(ApplicationRef(APP)) == []


async def test_a_member_removed_from_the_pool_moves_its_accounts_and_says_so(
    pipeline, store, pools
):
    body = on_pool("r")
    first = await pipeline.reconcile(body)
    assert first.status["identity"]["clientId"] == APP
    pools.bodies = [pool_body(members=[OTHER_APP, THIRD_APP])]
    moved = await pipeline.reconcile(applied(body, first))
    assert moved.status["identity"]["clientId"] == OTHER_APP
    event = next(e for e in moved.events if e.reason == "PoolMemberChanged")
    assert event.type == "Warning" and "no longer a member of pool readers" in event.message
    assert store.of(ApplicationRef(APP)) == []  # the old credential was removed
    assert [c.subject for c in store.of(ApplicationRef(OTHER_APP))] == [
        subject_for("team-a", "r-sa")
    ]


async def test_a_full_pool_is_a_clear_condition_and_writes_nothing(pipeline, store, pools):
    pools.bodies = [pool_body(reservedPerMember=5)]
    for client in MEMBERS:
        fill(store, client, 15)
    store.writes.clear()
    outcome = await pipeline.reconcile(on_pool("r"))
    c = cond(outcome, "FederatedCredentialReady")
    assert (c["status"], c["reason"]) == ("False", "PoolExhausted")
    assert "every member of SqlIdentityPool readers is full" in c["message"]
    assert f"application {APP} 15/20" in c["message"] and "5 of each reserved" in c["message"]
    assert "spec.members" in c["message"]
    assert not store.writes and outcome.retry is None


async def test_a_missing_pool_is_named(pipeline):
    outcome = await pipeline.reconcile(on_pool("r", pool="nope"))
    c = cond(outcome, "FederatedCredentialReady")
    assert (c["status"], c["reason"]) == ("False", "PoolNotFound")
    assert "no SqlIdentityPool named nope" in c["message"]


async def test_deleting_a_pool_resource_removes_its_credential_from_every_member(pipeline, store):
    body = on_pool("r")
    first = await pipeline.reconcile(body)
    # A stray copy on another member (a move interrupted before its clean-up): found too, whatever
    # the status says.
    store.put(
        ApplicationRef(THIRD_APP),
        FederatedCredential("stray", ISSUER, subject_for("team-a", "r-sa"), ("a",)),
    )
    await pipeline.finalize(applied(body, first))
    assert all(store.of(ApplicationRef(m)) == [] for m in MEMBERS)


async def test_a_pool_resource_backs_its_subject_on_every_member_and_nothing_else():
    body = on_pool("r")
    grants = await backed_grants(
        [body], None, True, pools={"readers": frozenset({"app:a", "app:b"})}
    )
    subject = (body["metadata"]["namespace"], body["spec"]["serviceAccountName"])
    assert Grant("app:a", *subject) in grants
    assert Grant("app:b", *subject) in grants
    assert Grant("app:c", *subject) not in grants  # not a member
    assert Grant("app:a", subject[0], "another-sa") not in grants
    assert Grant("app:a", "another-namespace", subject[1]) not in grants
    # held once for the pool, not once per member (5,000 resources on 250 members: 1.25 million)
    assert grants.direct == set() and len(grants.pooled) == 1
    assert Grant("app:a", *subject) not in await backed_grants([body], None, True, pools={})


def test_a_policy_naming_the_pool_governs_its_resources_and_nothing_else() -> None:
    from swi_operator.policy import authorize, parse_policy

    policy = parse_policy(
        {
            "metadata": {"name": "p"},
            "spec": {"identity": {"poolName": "readers"}, "namespaces": {"names": ["team-a"]}},
        }
    )
    assert policy.identity_key == "pool:readers"
    pool, member = PoolRef("readers"), ApplicationRef(APP)
    assert authorize(pool, None, "team-a", {}, [policy], True).allowed
    assert not authorize(pool, None, "team-b", {}, [policy], True).allowed
    # The pool's policy does not let a namespace name a member directly.
    refused = authorize(member, None, "team-a", {}, [policy], True)
    assert not refused.allowed and f"application {APP}" in refused.message


async def test_a_remembered_list_never_fills_a_member_past_its_reserve(store, pools, pipeline):
    """Entra refuses only a 21st credential, so a member chosen on the list this process
    remembers (first passes reuse it for 10 s) is listed live before a write under the reserve."""
    pools.bodies = [pool_body(reservedPerMember=18)]  # two credentials a member
    first = await pipeline.reconcile(on_pool("r0"))
    assert first.status["identity"]["clientId"] == APP
    fill(store, APP, 1, issuer="https://another-cluster.example")  # its last slot, meanwhile
    second = await pipeline.reconcile(on_pool("r1"))
    assert second.status["identity"]["clientId"] == OTHER_APP
    assert len(store.of(ApplicationRef(APP))) == 2


class FakeApps:
    """The Graph side of growth: makes (or finds by name) an app the store then knows."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.made: dict[str, str] = {}

    async def ensure(self, display_name: str) -> str:
        if display_name not in self.made:
            client = f"{len(self.made) + 7:08d}-aaaa-4aaa-8aaa-{len(self.made):012d}"
            self.made[display_name] = client
            self.store.add_identity(ApplicationRef(client))
        return self.made[display_name]


class StatusWriter:
    def __init__(self, pools: Pools) -> None:
        self.pools = pools

    async def patch_pool_status(self, name: str, status: dict[str, Any]) -> None:
        for body in self.pools.bodies:
            if body["metadata"]["name"] == name:
                body.setdefault("status", {}).update(status)


async def test_a_full_pool_grows_up_to_its_maximum_then_says_so(store, pools):
    from swi_operator.pool import PoolGrowth

    pools.bodies = [
        pool_body(
            members=[APP],
            reservedPerMember=19,
            growth={"maxMembers": 2, "displayNamePrefix": "grow"},
        )
    ]
    source = PoolSource(pools, ttl=0)
    apps = FakeApps(store)
    pipeline = build_pipeline(
        store,
        FakeKube(),
        TENANT,
        None,
        pools=source,
        growth=PoolGrowth(apps, StatusWriter(pools), source),
    )
    first = await pipeline.reconcile(on_pool("r0"))
    assert first.status["identity"]["clientId"] == APP
    second = await pipeline.reconcile(on_pool("r1"))
    grown = apps.made["grow-1"]
    assert second.status["identity"]["clientId"] == grown
    event = next(e for e in second.events if e.reason == "PoolGrown")
    assert f"created application app-name ({grown}), member 2 of at most 2" in event.message
    assert pools.bodies[0]["status"]["grown"] == [{"applicationClientId": grown, "name": "grow-1"}]
    assert parse_pool(pools.bodies[0]).members[-1] == ApplicationRef(grown)
    third = await pipeline.reconcile(on_pool("r2"))
    c = cond(third, "FederatedCredentialReady")
    assert c["reason"] == "PoolExhausted" and "maxMembers (2)" in c["message"]
    assert list(apps.made) == ["grow-1"]  # no third member


async def test_a_resource_switched_from_one_identity_to_a_pool_is_no_move(pipeline, store):
    body = resource(
        "r",
        "team-a",
        service_account="r-sa",
        identity={"applicationClientId": "44444444-4444-4444-4444-444444444444"},
    )
    store.add_identity(ApplicationRef("44444444-4444-4444-4444-444444444444"))
    first = await pipeline.reconcile(body)
    switched = applied(body, first)
    switched["spec"]["identity"] = {"poolName": "readers"}
    second = await pipeline.reconcile(switched)
    assert second.status["identity"]["pool"] == "readers"
    assert second.status["identity"]["clientId"] == APP
    assert not any(e.reason == "PoolMemberChanged" for e in second.events)
    assert any(
        "CredentialDeleted" in e.message or e.reason == "CredentialDeleted" for e in second.events
    )


class SlowApps(FakeApps):
    """Graph takes a moment to create an app: other reconciles run meanwhile."""

    async def ensure(self, display_name: str) -> str:
        await asyncio.sleep(0.01)
        return await super().ensure(display_name)


async def test_resources_waiting_on_a_growing_pool_see_its_new_member(store, pools):
    """Two resources on a full pool at once: the one that waited for the pool's lock reads the
    pool the growth left (never a copy from before it), so it grows the next member rather than
    the same one again, and the pool's status keeps both."""
    from swi_operator.pool import PoolGrowth

    pools.bodies = [
        pool_body(
            members=[APP],
            reservedPerMember=19,
            growth={"maxMembers": 3, "displayNamePrefix": "grow"},
        )
    ]
    source = PoolSource(pools, ttl=60)  # a cache that would outlive the growth
    apps = SlowApps(store)
    pipeline = build_pipeline(
        store,
        FakeKube(),
        TENANT,
        None,
        pools=source,
        growth=PoolGrowth(apps, StatusWriter(pools), source),
    )
    await pipeline.reconcile(on_pool("r0"))  # fills APP (capacity 1)
    one, two = await asyncio.gather(
        pipeline.reconcile(on_pool("r1")), pipeline.reconcile(on_pool("r2"))
    )
    assert list(apps.made) == ["grow-1", "grow-2"]
    placed = {one.status["identity"]["clientId"], two.status["identity"]["clientId"]}
    assert placed == set(apps.made.values())
    assert [g["name"] for g in pools.bodies[0]["status"]["grown"]] == ["grow-1", "grow-2"]


async def test_a_pool_list_an_invalidation_overtook_is_not_kept():
    """A list that was under way when the pools changed may predate the change: its caller gets
    it, the next reader lists again."""
    gate = asyncio.Event()

    class Held(Pools):
        async def list_pools(self) -> list[dict]:
            self.lists += 1
            if self.lists == 1:
                await gate.wait()
            return self.bodies

    held = Held(pool_body())
    source = PoolSource(held, ttl=60)
    reading = asyncio.ensure_future(source.all())
    await asyncio.sleep(0)
    source.invalidate()  # e.g. a growth wrote status.grown meanwhile
    gate.set()
    assert "readers" in await reading
    await source.all()
    assert held.lists == 2
    await source.all()
    assert held.lists == 2  # the fresh list is kept


async def test_resources_on_one_pool_write_to_its_members_at_once(store, pools):
    """The pool's lock covers the choice, not the credential write: resources on a pool of
    one-slot members write to different members concurrently, and none is sent to a member a
    choice before it already took (no refusal, no retry)."""

    writing = 0
    most = 0
    original = store.upsert

    async def slow_upsert(identity: Any, credential: Any) -> Any:
        nonlocal writing, most
        writing += 1
        most = max(most, writing)
        await asyncio.sleep(0.02)
        try:
            return await original(identity, credential)
        finally:
            writing -= 1

    store.upsert = slow_upsert  # type: ignore[method-assign]
    pools.bodies = [pool_body(reservedPerMember=19)]  # one credential a member
    pipeline = build_pipeline(store, FakeKube(), TENANT, None, pools=PoolSource(pools, ttl=0))
    outcomes = await asyncio.gather(*(pipeline.reconcile(on_pool(f"r{i}")) for i in range(3)))
    placed = sorted(o.status["identity"]["clientId"] for o in outcomes)
    assert placed == sorted(MEMBERS)
    assert most == 3  # the three writes overlapped
    assert store.writes["upsert"] == 3  # one each: no member was chosen twice


SUB = "0b5e0c1d-7b3f-4c2e-9a1d-00000000c0de"
GROUP_ID = f"/subscriptions/{SUB}/resourceGroups/pool-rg"


def test_growth_by_managed_identities_is_parsed_and_its_errors_named() -> None:
    growth = {
        "maxMembers": 3,
        "displayNamePrefix": "readers",
        "managedIdentity": {"resourceGroupId": GROUP_ID, "location": "eastus"},
    }
    pool = parse_pool(pool_body(growth=growth))
    assert (pool.identity_group, pool.location) == (GROUP_ID, "eastus")
    with pytest.raises(SpecError) as err:
        parse_pool(
            pool_body(
                name="a.b",  # the default prefix swi-pool-a.b is no managed identity name
                growth={"maxMembers": 3, "managedIdentity": {"resourceGroupId": "/rg"}},
            )
        )
    text = str(err.value)
    assert "spec.growth.managedIdentity.resourceGroupId: Invalid value '/rg'" in text
    assert "spec.growth.managedIdentity.location: Required value" in text
    assert "spec.growth.displayNamePrefix: Invalid value 'swi-pool-a.b'" in text


class FakeIdentities:
    """ARM's side of growth: a PUT by name that adopts an identity of that name."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.made: list[str] = []

    async def ensure_identity(self, resource_group_id: str, name: str, location: str) -> str:
        from swi_operator.spec import parse_managed_identity_id

        resource_id = (
            f"{resource_group_id}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
        )
        if resource_id not in self.made:
            self.made.append(resource_id)
            self.store.add_identity(parse_managed_identity_id(resource_id))
        return resource_id


async def test_a_pool_grows_by_a_managed_identity_and_records_it(store, pools):
    from swi_operator.pool import PoolGrowth

    pools.bodies = [
        pool_body(
            members=[APP],
            reservedPerMember=19,
            growth={
                "maxMembers": 2,
                "displayNamePrefix": "grow",
                "managedIdentity": {"resourceGroupId": GROUP_ID, "location": "eastus"},
            },
        )
    ]
    source = PoolSource(pools, ttl=0)
    identities = FakeIdentities(store)
    pipeline = build_pipeline(
        store,
        FakeKube(),
        TENANT,
        None,
        pools=source,
        growth=PoolGrowth(FakeApps(store), StatusWriter(pools), source, identities),
    )
    await pipeline.reconcile(on_pool("r0"))
    second = await pipeline.reconcile(on_pool("r1"))
    (made,) = identities.made
    assert made.endswith("/userAssignedIdentities/grow-1")
    assert second.status["identity"]["kind"] == "ManagedIdentity"
    event = next(e for e in second.events if e.reason == "PoolGrown")
    assert "created managed identity" in event.message
    assert pools.bodies[0]["status"]["grown"] == [
        {"managedIdentityResourceId": made, "name": "grow-1"}
    ]
    grown = parse_pool(pools.bodies[0]).members[-1]
    assert grown.key == parse_pool(pools.bodies[0]).grown[0][0].key
    assert isinstance(grown, ManagedIdentityRef) and grown.name == "grow-1"


async def test_a_growing_pool_lists_its_members_about_once_per_growth(store, pools):
    """200 resources at once on a pool that grows from one member to ten: every one placed, and
    the members listed about once per growth, not once per waiting resource (a choice that found
    the pool full used to give the lock up before choosing on live lists, so every waiter listed
    every member live after the growth it waited for)."""
    from swi_operator.pool import PoolGrowth

    lists = 0
    listing = store.list

    async def counted(identity: Any) -> Any:
        nonlocal lists
        lists += 1
        await asyncio.sleep(0.001)
        return await listing(identity)

    writing = store.upsert

    async def slow(identity: Any, credential: Any) -> Any:
        await asyncio.sleep(0.005)
        return await writing(identity, credential)

    store.list = counted  # type: ignore[method-assign]
    store.upsert = slow  # type: ignore[method-assign]
    pools.bodies = [pool_body(members=[APP], growth={"maxMembers": 10, "displayNamePrefix": "g"})]
    source = PoolSource(pools, ttl=2)
    apps = SlowApps(store)
    pipeline = build_pipeline(
        store,
        FakeKube(),
        TENANT,
        None,
        pools=source,
        growth=PoolGrowth(apps, StatusWriter(pools), source),
    )
    outcomes = await asyncio.gather(
        *(pipeline.reconcile(on_pool(f"r{i}", namespace=f"ns-{i}")) for i in range(200))
    )
    assert all(o.status.get("identity") for o in outcomes)
    assert len(apps.made) == 9
    assert lists <= 100, lists  # 64 when measured; 1,000 and more before


async def test_a_member_filled_by_another_cluster_meanwhile_is_a_retry_never_a_stop(
    store, pipeline
):
    """Entra refuses the write because another cluster took the last slot since the choice: the
    resource chooses again on live lists; refused every time, it retries later (ConcurrentWrite,
    transient), never stops as CredentialLimitReached while the pool has other members."""
    from swi_operator.errors import PermanentError, Reason

    full = PermanentError(Reason.CREDENTIAL_LIMIT_REACHED, "maximum of 20 reached")
    store.fail_next("upsert", full)
    placed = await pipeline.reconcile(on_pool("r0"))
    assert placed.status["identity"]["clientId"] in MEMBERS
    assert cond(placed, "FederatedCredentialReady")["status"] == "True"

    store.fail_next("upsert", full, times=6)  # two writes an attempt: remembered, then live
    retried = await pipeline.reconcile(on_pool("r1"))
    c = cond(retried, "FederatedCredentialReady")
    assert c["reason"] == "ConcurrentWrite", c
    assert "filled by others" in c["message"]


async def test_a_refused_member_is_passed_over_without_listing_every_member(store, pipeline):
    """Entra refuses the write on the chosen member (another cluster filled it): the choice moves
    to the next member on the lists it remembers, listing only the refused one again (a live list
    of every member, under the pool's lock, stalled every other choice on the pool)."""
    from swi_operator.errors import PermanentError, Reason

    placed = await pipeline.reconcile(on_pool("r0"))
    assert placed.status["identity"]["clientId"] == APP
    lists = 0
    listing = store.list

    async def counted(identity: Any) -> Any:
        nonlocal lists
        lists += 1
        return await listing(identity)

    store.list = counted  # type: ignore[method-assign]
    full = PermanentError(Reason.CREDENTIAL_LIMIT_REACHED, "maximum of 20 reached")
    store.fail_next("upsert", full, times=2)  # the remembered list's write, then the live one's
    moved = await pipeline.reconcile(on_pool("r1"))
    assert moved.status["identity"]["clientId"] == OTHER_APP
    assert cond(moved, "FederatedCredentialReady")["status"] == "True"
    assert lists == 1  # the refused member's, after its refusal; the others remembered


async def test_members_refused_as_full_yet_listed_with_room_neither_grow_nor_exhaust(store, pools):
    """Entra's reads lag behind its writes: every member refused a write as full while its list
    still shows room. That is a retry (ConcurrentWrite), never a new member nor PoolExhausted."""
    from swi_operator.errors import PermanentError, Reason
    from swi_operator.pool import PoolGrowth

    pools.bodies = [
        pool_body(members=[APP, OTHER_APP], growth={"maxMembers": 5, "displayNamePrefix": "g"})
    ]
    source = PoolSource(pools, ttl=0)
    apps = FakeApps(store)
    pipeline = build_pipeline(
        store,
        FakeKube(),
        TENANT,
        None,
        pools=source,
        growth=PoolGrowth(apps, StatusWriter(pools), source),
    )
    full = PermanentError(Reason.CREDENTIAL_LIMIT_REACHED, "maximum of 20 reached")
    store.fail_next("upsert", full, times=4)  # two writes on each member
    retried = await pipeline.reconcile(on_pool("r0"))
    c = cond(retried, "FederatedCredentialReady")
    assert c["reason"] == "ConcurrentWrite", c
    assert "still shows room" in c["message"] and APP in c["message"]
    assert not apps.made
    again = await pipeline.reconcile(applied(on_pool("r0"), retried))
    assert again.status["identity"]["clientId"] == APP
