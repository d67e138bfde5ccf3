"""Credential names: deterministic, valid for Graph and ARM, distinct per (issuer, subject)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from swi_operator.naming import (
    Owner,
    credential_description,
    credential_name,
    is_valid_credential_name,
    short_hash,
    subject_for,
)

label = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True)
subdomain = st.lists(label, min_size=1, max_size=5).map(".".join).filter(lambda s: len(s) <= 253)
issuer = st.from_regex(
    r"https://[a-z0-9.-]{1,40}(:[0-9]{1,5})?(/[A-Za-z0-9/-]{0,60})?", fullmatch=True
)


def test_subject_is_built_from_namespace_and_service_account_only():
    assert subject_for("workload-demo", "sa") == "system:serviceaccount:workload-demo:sa"


def test_name_shape_and_issuer_hash():
    name = credential_name(
        "https://127.0.0.1:6443", "workload-demo", "workload-demo-service-account"
    )
    assert (
        name
        == f"swi-workload-demo_workload-demo-service-account-{short_hash('https://127.0.0.1:6443')}"
    )


def test_clusters_sharing_an_identity_get_different_names():
    assert credential_name("https://a.example/", "ns", "sa") != credential_name(
        "https://b.example/", "ns", "sa"
    )


def test_separator_keeps_namespace_and_account_apart():
    assert credential_name("https://x", "a-b", "c") != credential_name("https://x", "a", "b-c")
    assert credential_name("https://x", "a", "b.c") != credential_name("https://x", "a", "b-c")


@given(issuer, label, subdomain)
def test_names_are_always_valid_and_deterministic(iss, namespace, account):
    name = credential_name(iss, namespace, account)
    assert is_valid_credential_name(name), name
    assert 3 <= len(name) <= 120
    assert name == credential_name(iss, namespace, account)
    assert name.endswith(short_hash(iss))


@given(issuer, label, subdomain, subdomain)
def test_long_names_stay_distinct(iss, namespace, first, second):
    if first != second:
        assert credential_name(iss, namespace, first) != credential_name(iss, namespace, second)


def test_description_names_operator_issuer_and_resource():
    text = credential_description(
        "https://127.0.0.1:6443", Owner("workload-demo", "customer-reader")
    )
    assert "sql-workload-identity-operator" in text
    assert "https://127.0.0.1:6443" in text
    assert "workload-demo/customer-reader" in text
    assert len(text) <= 600
