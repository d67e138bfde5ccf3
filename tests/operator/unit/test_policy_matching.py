"""SqlIdentityPolicy matching (``swi_operator.policy``), pure: examples of each rule, then
properties over generated policies and resources (Hypothesis)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from swi_operator.policy import (
    DEFAULT_ROLES,
    Policy,
    PolicyMemo,
    ServerKey,
    authorize,
    parse_policies,
    parse_policy,
    server_key,
)
from swi_operator.spec import ApplicationRef, SpecError, SqlSpec, parse_managed_identity_id

APP = "5e0c1d9a-7b3f-4c2e-9a1d-000000000002"
OTHER_APP = "5e0c1d9a-7b3f-4c2e-9a1d-000000000003"
MI = (
    "/subscriptions/3b9d2f10-6c1a-4e7b-8d5f-a2c4e6f8b0d1/resourceGroups/sandbox-rg/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/customer-api-identity"
)
SERVER = "sandbox-sql.database.windows.net"
APP_REF = ApplicationRef(APP)
MI_REF = parse_managed_identity_id(MI)
assert MI_REF is not None


def policy(name: str = "p", identity: dict[str, str] | None = None, **spec: Any) -> Policy:
    body = {
        "metadata": {"name": name, "generation": 1},
        "spec": {
            "identity": identity or {"applicationClientId": APP},
            "namespaces": spec.pop("namespaces", {"names": ["team-a"]}),
            **spec,
        },
    }
    return parse_policy(body)


def sql(*roles: str, server: str = SERVER, database: str = "mydb") -> SqlSpec:
    return SqlSpec(server=server, database=database, roles=tuple(roles))


SQL_GRANT = {"servers": [SERVER], "databases": ["mydb"]}


# --- examples -----------------------------------------------------------------------------------


def test_no_policy_refuses_and_names_the_identity_and_namespace() -> None:
    decision = authorize(APP_REF, None, "team-a", {}, [])
    assert not decision.allowed
    assert f"application {APP}" in decision.message and "team-a" in decision.message


def test_require_policy_off_lets_unmentioned_identities_through_but_not_mentioned_ones() -> None:
    assert authorize(APP_REF, None, "team-a", {}, [], require_policy=False).allowed
    other = policy(identity={"applicationClientId": OTHER_APP})
    assert authorize(APP_REF, None, "team-a", {}, [other], require_policy=False).allowed
    mine = policy(namespaces={"names": ["team-b"]})
    decision = authorize(APP_REF, None, "team-a", {}, [mine], require_policy=False)
    assert not decision.allowed and "none includes namespace team-a" in decision.message


def test_policy_by_name_and_by_label() -> None:
    by_name = policy("by-name")
    assert authorize(APP_REF, None, "team-a", {}, [by_name]).governing == ("by-name",)
    assert not authorize(APP_REF, None, "team-b", {}, [by_name]).allowed
    by_label = policy("by-label", namespaces={"selector": {"matchLabels": {"tier": "prod"}}})
    assert authorize(APP_REF, None, "x", {"tier": "prod"}, [by_label]).allowed
    assert not authorize(APP_REF, None, "x", {"tier": "dev"}, [by_label]).allowed


def test_managed_identity_ids_compare_case_insensitively() -> None:
    p = policy(
        identity={"managedIdentityResourceId": MI.upper().replace("SUBSCRIPTIONS", "subscriptions")}
    )
    assert authorize(MI_REF, None, "team-a", {}, [p]).allowed
    assert not authorize(APP_REF, None, "team-a", {}, [p]).allowed


def test_sql_needs_the_server_database_and_every_role() -> None:
    p = policy(sql=SQL_GRANT)  # roles default to reader and writer
    assert authorize(APP_REF, sql("db_datareader", "DB_DATAWRITER"), "team-a", {}, [p]).allowed
    assert authorize(APP_REF, sql(server=f"tcp:{SERVER.upper()},1433"), "team-a", {}, [p]).allowed
    refusals = {
        "server other.database.windows.net": sql(server="other.database.windows.net"),
        f"server tcp:{SERVER},1444": sql(server=f"tcp:{SERVER},1444"),
        "database otherdb": sql(database="otherdb"),
        "role db_owner": sql("db_owner"),
        "roles db_ddladmin, Db_Owner": sql("db_ddladmin", "Db_Owner"),
    }
    for missing, wanted in refusals.items():
        decision = authorize(APP_REF, wanted, "team-a", {}, [p])
        assert not decision.allowed, missing
        assert f"does not allow {missing}" in decision.message, decision.message


def test_db_owner_only_when_listed_explicitly() -> None:
    p = policy(sql={**SQL_GRANT, "roles": ["db_datareader", "db_owner"]})
    assert authorize(APP_REF, sql("db_owner"), "team-a", {}, [p]).allowed
    assert not authorize(APP_REF, sql("db_datawriter"), "team-a", {}, [p]).allowed


def test_no_sql_section_grants_no_database_access() -> None:
    decision = authorize(APP_REF, sql("db_datareader"), "team-a", {}, [policy()])
    assert not decision.allowed and "grants no database access" in decision.message


def test_narrower_policy_wins_in_both_directions() -> None:
    everyone_reads = policy(
        "everyone-reads", namespaces={"selector": {}}, sql={**SQL_GRANT, "roles": ["db_datareader"]}
    )
    team_a_writes = policy(
        "team-a-writes", sql={**SQL_GRANT, "roles": ["db_datareader", "db_datawriter"]}
    )
    both = [everyone_reads, team_a_writes]
    # team-a is listed by name: its own policy governs, even where it grants more...
    assert authorize(APP_REF, sql("db_datawriter"), "team-a", {}, both).governing == (
        "team-a-writes",
    )
    # ...and where it grants less.
    narrow_nothing = policy("team-a-no-sql")
    decision = authorize(
        APP_REF, sql("db_datareader"), "team-a", {}, [everyone_reads, narrow_nothing]
    )
    assert not decision.allowed
    assert "narrower policy wins over everyone-reads" in decision.message
    # Other namespaces fall back to the broad one.
    assert authorize(APP_REF, sql("db_datareader"), "team-b", {}, both).governing == (
        "everyone-reads",
    )
    assert not authorize(APP_REF, sql("db_datawriter"), "team-b", {}, both).allowed


def test_equally_narrow_policies_must_all_allow() -> None:
    reads = policy("reads", sql={**SQL_GRANT, "roles": ["db_datareader"]})
    writes = policy("writes", sql={**SQL_GRANT, "roles": ["db_datareader", "db_datawriter"]})
    assert authorize(APP_REF, sql("db_datareader"), "team-a", {}, [reads, writes]).governing == (
        "reads",
        "writes",
    )
    decision = authorize(APP_REF, sql("db_datawriter"), "team-a", {}, [reads, writes])
    assert not decision.allowed and "SqlIdentityPolicy reads does not allow" in decision.message


def test_label_selector_is_narrower_than_every_namespace() -> None:
    broad = policy("broad", namespaces={"selector": {}}, sql=SQL_GRANT)
    labelled = policy("labelled", namespaces={"selector": {"matchLabels": {"tier": "prod"}}})
    decision = authorize(APP_REF, sql("db_datareader"), "x", {"tier": "prod"}, [broad, labelled])
    assert not decision.allowed and decision.governing == ("labelled",)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({}, "spec.identity"),
        ({"identity": {}, "namespaces": {"names": ["a"]}}, "spec.identity"),
        (
            {
                "identity": {"applicationClientId": APP, "managedIdentityResourceId": MI},
                "namespaces": {"names": ["a"]},
            },
            "spec.identity",
        ),
        (
            {"identity": {"applicationClientId": "nope"}, "namespaces": {"names": ["a"]}},
            "spec.identity.applicationClientId",
        ),
        ({"identity": {"applicationClientId": APP}, "namespaces": {}}, "spec.namespaces"),
        (
            {"identity": {"applicationClientId": APP}, "namespaces": {"names": ["A_B"]}},
            "spec.namespaces.names[0]",
        ),
        (
            {
                "identity": {"applicationClientId": APP},
                "namespaces": {"names": ["a"]},
                "sql": {"servers": [], "databases": ["d"]},
            },
            "spec.sql.servers",
        ),
        (
            {
                "identity": {"applicationClientId": APP},
                "namespaces": {"names": ["a"]},
                "sql": {**SQL_GRANT, "roles": ["db_owner]; DROP USER x; --"]},
            },
            "spec.sql.roles[0]",
        ),
        (
            {
                "identity": {"applicationClientId": APP},
                "namespaces": {"selector": {"matchExpressions": [{"key": "k", "operator": "In"}]}},
            },
            "spec.namespaces.selector.matchExpressions[0]",
        ),
    ],
)
def test_invalid_policy_names_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as refused:
        parse_policy({"metadata": {"name": "bad"}, "spec": spec})
    assert field in [path for path, _ in refused.value.problems], refused.value.problems


def test_an_invalid_policy_grants_nothing() -> None:
    parsed = parse_policies(
        [
            {"metadata": {"name": "bad"}, "spec": {"identity": {"applicationClientId": APP}}},
            {
                "metadata": {"name": "good"},
                "spec": {
                    "identity": {"applicationClientId": APP},
                    "namespaces": {"names": ["team-a"]},
                },
            },
        ]
    )
    assert [p.name for p in parsed.valid] == ["good"] and set(parsed.invalid) == {"bad"}
    assert not authorize(APP_REF, None, "team-b", {}, parsed.valid).allowed


def test_a_memo_parses_each_policy_once_per_generation() -> None:
    def body(name: str, uid: str, generation: int, names: list[str]) -> dict[str, Any]:
        return {
            "metadata": {"name": name, "uid": uid, "generation": generation},
            "spec": {"identity": {"applicationClientId": APP}, "namespaces": {"names": names}},
        }

    bad = {"metadata": {"name": "bad", "uid": "u-bad", "generation": 1}, "spec": {}}
    memo = PolicyMemo()
    first = parse_policies([body("a", "u-a", 1, ["team-a"]), bad], memo)
    again = parse_policies([body("a", "u-a", 1, ["team-a"]), bad], memo)
    assert again.valid[0] is first.valid[0]  # not parsed again
    assert again.invalid["bad"] is first.invalid["bad"]
    # A status write leaves the generation; a spec change raises it and is parsed afresh.
    changed = parse_policies([body("a", "u-a", 2, ["team-b"])], memo)
    assert changed.valid[0].namespaces.names == frozenset({"team-b"})
    assert set(memo.known) == {("u-a", 2)}  # the deleted and the older ones are forgotten
    # Deleted and created again under the same name: another uid, parsed afresh.
    recreated = parse_policies([body("a", "u-a2", 1, ["team-c"])], memo)
    assert recreated.valid[0].namespaces.names == frozenset({"team-c"})


def test_server_keys() -> None:
    assert server_key("tcp:Host.Example.COM,1433") == ServerKey("host.example.com")
    assert server_key("host,1444") == ServerKey("host", 1444)
    assert server_key("host;Authentication=x") is None
    assert server_key("host,99999") is None


# --- properties ---------------------------------------------------------------------------------

label_keys = st.sampled_from(["tier", "team", "env", "kubernetes.io/metadata.name"])
label_values = st.sampled_from(["a", "b", "prod", "dev", "team-a", "team-b"])
labels = st.dictionaries(label_keys, label_values, max_size=3)
namespaces = st.sampled_from(["team-a", "team-b", "team-c", "kube-system"])
identities = st.sampled_from(
    [
        {"applicationClientId": APP},
        {"applicationClientId": OTHER_APP},
        {"managedIdentityResourceId": MI},
    ]
)
roles = st.sampled_from(
    ["db_datareader", "db_datawriter", "db_ddladmin", "db_owner", "DB_OWNER", "app_role"]
)
selectors = st.one_of(
    st.just({}),
    st.builds(lambda ls: {"matchLabels": ls}, labels),
    st.builds(
        lambda k, op, vs: {
            "matchExpressions": [
                {"key": k, "operator": op, **({"values": vs} if op in ("In", "NotIn") else {})}
            ]
        },
        label_keys,
        st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]),
        st.lists(label_values, min_size=1, max_size=2),
    ),
)
scopes = st.one_of(
    st.builds(lambda ns: {"names": ns}, st.lists(namespaces, min_size=1, max_size=2, unique=True)),
    st.builds(lambda sel: {"selector": sel}, selectors),
    st.builds(
        lambda ns, sel: {"names": ns, "selector": sel},
        st.lists(namespaces, min_size=1, max_size=2, unique=True),
        selectors,
    ),
)
grants = st.one_of(
    st.none(),
    st.builds(
        lambda rs, dbs: {
            "servers": [SERVER],
            "databases": dbs,
            **({"roles": rs} if rs is not None else {}),
        },
        st.one_of(st.none(), st.lists(roles, max_size=3, unique=True)),
        st.lists(st.sampled_from(["mydb", "MyDB", "other"]), min_size=1, max_size=2, unique=True),
    ),
)
policy_specs = st.builds(
    lambda i, n, g: {"identity": i, "namespaces": n, **({"sql": g} if g is not None else {})},
    identities,
    scopes,
    grants,
)
policy_lists = st.lists(policy_specs, max_size=4).map(
    lambda specs: [
        parse_policy({"metadata": {"name": f"p{i}"}, "spec": s}) for i, s in enumerate(specs)
    ]
)
sql_specs = st.one_of(
    st.none(),
    st.builds(
        lambda rs, db: SqlSpec(SERVER, db, tuple(rs)),
        st.lists(roles, max_size=3, unique=True),
        st.sampled_from(["mydb", "other"]),
    ),
)
identity_refs = st.sampled_from([APP_REF, ApplicationRef(OTHER_APP), MI_REF])
IDENTITY_OF = {
    APP_REF.key: {"applicationClientId": APP},
    ApplicationRef(OTHER_APP).key: {"applicationClientId": OTHER_APP},
    MI_REF.key: {"managedIdentityResourceId": MI},
}
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(identity_refs, sql_specs, namespaces, labels, policy_lists, st.booleans())
def test_only_policies_about_the_identity_matter(
    ref, wanted, ns, ns_labels, policies, require
) -> None:
    about = [p for p in policies if p.identity_key == ref.key]
    assert authorize(ref, wanted, ns, ns_labels, policies, require) == authorize(
        ref, wanted, ns, ns_labels, about, require
    )


@FAST
@given(identity_refs, sql_specs, namespaces, labels, policy_lists, st.booleans())
def test_allowed_only_through_a_policy_that_includes_the_namespace(
    ref, wanted, ns, ns_labels, policies, require
) -> None:
    decision = authorize(ref, wanted, ns, ns_labels, policies, require)
    if decision.allowed and decision.checked_identity:
        governing = [p for p in policies if p.name in decision.governing]
        assert governing and all(p.identity_key == ref.key for p in governing)
        assert all(p.namespaces.rank(ns, ns_labels) is not None for p in governing)
    if not decision.checked_identity:
        assert not require and not any(p.identity_key == ref.key for p in policies)
    if not decision.allowed:
        assert decision.message


@FAST
@given(
    identity_refs,
    st.lists(roles, min_size=1, max_size=3, unique=True),
    namespaces,
    labels,
    policy_lists,
    st.booleans(),
)
def test_a_role_is_granted_only_if_the_deciding_policies_list_it(
    ref, wanted_roles, ns, ns_labels, policies, require
) -> None:
    wanted = SqlSpec(SERVER, "mydb", tuple(wanted_roles))
    decision = authorize(ref, wanted, ns, ns_labels, policies, require)
    if decision.allowed and decision.checked_identity:
        for p in policies:
            if p.name in decision.governing:
                assert p.sql is not None
                allowed = p.sql.roles
                assert all(r.casefold() in allowed for r in wanted_roles)
                if "db_owner" in {r.casefold() for r in wanted_roles}:
                    assert "db_owner" in {r.casefold() for r in p.sql.role_names}


@FAST
@given(identity_refs, sql_specs, namespaces, labels, policy_lists, st.booleans())
def test_a_broader_policy_never_changes_a_decision_made_by_name(
    ref, wanted, ns, ns_labels, policies, require
) -> None:
    by_name = [p for p in policies if ns in p.namespaces.names and p.identity_key == ref.key]
    if not by_name:
        return
    broad = policy(
        "zz-broad",
        identity=IDENTITY_OF[ref.key],
        namespaces={"selector": {}},
        sql={**SQL_GRANT, "roles": ["db_owner"]},
    )
    assert broad.identity_key == ref.key
    before = authorize(ref, wanted, ns, ns_labels, policies, require)
    after = authorize(ref, wanted, ns, ns_labels, [*policies, broad], require)
    assert (before.allowed, before.governing) == (after.allowed, after.governing)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)


@FAST
@given(
    st.dictionaries(
        st.sampled_from(["identity", "namespaces", "sql", "x"]), json_values, max_size=4
    )
)
def test_arbitrary_policy_input_never_crashes(spec: dict[str, Any]) -> None:
    problems: tuple[tuple[str, str], ...] = ()
    try:
        parse_policy({"metadata": {"name": "fuzz"}, "spec": spec})
    except SpecError as err:
        problems = err.problems
        assert problems
    assert all(path.startswith("spec") for path, _ in problems)


def test_default_roles_are_reader_and_writer_only() -> None:
    assert DEFAULT_ROLES == ("db_datareader", "db_datawriter")


# --- the CRD and the examples -------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[3]


def _walk(schema: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, child in (schema.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")


def test_policy_crd_is_cluster_scoped_structural_and_documented() -> None:
    crd = yaml.safe_load((ROOT / "crds" / "sqlidentity.io_sqlidentitypolicies.yaml").read_text())
    assert crd["spec"]["scope"] == "Cluster"
    assert crd["spec"]["names"]["shortNames"] == ["sip"]
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    assert [p for p, s in _walk(schema, "") if p and "type" not in s] == []
    spec = schema["properties"]["spec"]
    undocumented = [p for p, s in _walk(spec, "spec") if "description" not in s and "[]" not in p]
    assert undocumented == []
    rules = [v["rule"] for v in spec["properties"]["identity"]["x-kubernetes-validations"]]
    assert "self == oldSelf" in rules  # the identity of a policy never changes
    assert spec["properties"]["sql"]["properties"]["roles"]["default"] == list(DEFAULT_ROLES)


def test_example_policies_parse_and_admit_the_examples() -> None:
    from swi_operator.spec import parse_spec

    docs = [
        doc
        for path in sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    parsed = parse_policies([d for d in docs if d["kind"] == "SqlIdentityPolicy"])
    assert parsed.valid and not parsed.invalid
    decisions = {
        d["metadata"]["name"]: authorize(
            (spec := parse_spec(d["spec"])).identity,
            spec.sql,
            d["metadata"]["namespace"],
            {},
            parsed.valid,
        )
        for d in docs
        if d["kind"] == "SqlWorkloadIdentity"
    }
    assert not decisions.pop("finance-reports").allowed  # the deliberate mistake
    assert all(d.allowed for d in decisions.values()), decisions
