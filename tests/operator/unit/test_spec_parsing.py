"""Spec validation mirrors the CRD: every problem is named by its field, all at once."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from operator_fakes import APP, MI_ID  # type: ignore[import-not-found]
from swi_operator.spec import (
    ApplicationRef,
    ManagedIdentityRef,
    SpecError,
    parse_spec,
)


def spec(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"serviceAccountName": "sa", "identity": {"applicationClientId": APP}}
    base.update(overrides)
    return base


def test_application_identity_with_defaults():
    parsed = parse_spec(spec())
    assert parsed.identity == ApplicationRef(APP)
    assert parsed.audience == "api://AzureADTokenExchange"
    assert parsed.deletion_policy == "Delete" and not parsed.retain_cloud_objects
    assert parsed.workload_selector is None and parsed.sql is None


def test_managed_identity_is_split_into_its_parts():
    parsed = parse_spec(spec(identity={"managedIdentityResourceId": MI_ID}))
    assert isinstance(parsed.identity, ManagedIdentityRef)
    assert parsed.identity.subscription_id == "3b9d2f10-6c1a-4e7b-8d5f-a2c4e6f8b0d1"
    assert parsed.identity.resource_group == "sandbox-rg"
    assert parsed.identity.name == "customer-api-identity"
    # ARM ids are case-insensitive: one identity, one lock key.
    upper = parse_spec(
        spec(
            identity={
                "managedIdentityResourceId": MI_ID.upper().replace("SUBSCRIPTIONS", "subscriptions")
            }
        )
    )
    assert upper.identity.key == parsed.identity.key


def test_client_id_is_normalised_to_lower_case():
    parsed = parse_spec(spec(identity={"applicationClientId": APP.upper()}))
    assert parsed.identity == ApplicationRef(APP)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"serviceAccountName": "Bad_Name"}, "spec.serviceAccountName"),
        ({"serviceAccountName": ""}, "spec.serviceAccountName"),
        ({"identity": {}}, "spec.identity"),
        (
            {"identity": {"applicationClientId": APP, "managedIdentityResourceId": MI_ID}},
            "spec.identity",
        ),
        ({"identity": {"applicationClientId": "nope"}}, "spec.identity.applicationClientId"),
        (
            {"identity": {"managedIdentityResourceId": "/subscriptions/x"}},
            "spec.identity.managedIdentityResourceId",
        ),
        ({"identity": {"applicationClientId": APP, "tenantId": "t"}}, "spec.identity.tenantId"),
        ({"audience": ""}, "spec.audience"),
        ({"deletionPolicy": "Orphan"}, "spec.deletionPolicy"),
        (
            {"workloads": {"selector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}},
            "spec.workloads.selector.matchExpressions[0]",
        ),
        (
            {"workloads": {"selector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}},
            "spec.workloads.selector.matchExpressions[0].operator",
        ),
        ({"sql": {"server": "bad server", "database": "db"}}, "spec.sql.server"),
        (
            {"sql": {"server": "s", "database": "db", "roles": ["db_owner; DROP"]}},
            "spec.sql.roles[0]",
        ),
    ],
)
def test_invalid_fields_are_named(overrides, field):
    with pytest.raises(SpecError) as raised:
        parse_spec(spec(**overrides))
    assert field in [path for path, _ in raised.value.problems]


def test_all_problems_are_reported_together():
    with pytest.raises(SpecError) as raised:
        parse_spec(
            {
                "serviceAccountName": "UPPER",
                "identity": {"applicationClientId": "x"},
                "deletionPolicy": "x",
            }
        )
    assert len(raised.value.problems) == 3


def test_sql_server_forms_odbc_accepts():
    for server in ("myserver.database.windows.net", "tcp:localhost,14330", "localhost,1433"):
        parsed = parse_spec(
            spec(sql={"server": server, "database": "mydb", "roles": ["db_datareader"]})
        )
        assert parsed.sql is not None and parsed.sql.server == server


def test_selector_semantics():
    parsed = parse_spec(
        spec(
            workloads={
                "selector": {
                    "matchLabels": {"app": "api"},
                    "matchExpressions": [
                        {"key": "tier", "operator": "In", "values": ["web", "api"]},
                        {"key": "legacy", "operator": "DoesNotExist"},
                    ],
                }
            }
        )
    )
    selector = parsed.workload_selector
    assert selector is not None
    assert selector.matches({"app": "api", "tier": "web"})
    assert not selector.matches({"app": "api", "tier": "db"})
    assert not selector.matches({"app": "api", "tier": "web", "legacy": "1"})
    assert not selector.matches({"tier": "web"})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=10,
)


@given(
    st.dictionaries(
        st.sampled_from(
            ["serviceAccountName", "identity", "audience", "workloads", "sql", "deletionPolicy"]
        ),
        json_values,
    )
)
def test_arbitrary_input_is_parsed_or_rejected_never_crashes(raw):
    problems: tuple[tuple[str, str], ...] = ()
    try:
        parse_spec(raw)
    except SpecError as err:
        problems = err.problems
    assert all(path.startswith("spec") for path, _ in problems)
