"""The CRD: structural, documented for `kubectl explain`, validating what the operator validates,
with the printer columns `kubectl get swi` shows. The examples satisfy it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from swi_operator.spec import parse_spec

ROOT = Path(__file__).resolve().parents[3]
CRD = yaml.safe_load((ROOT / "crds" / "sqlidentity.io_sqlworkloadidentities.yaml").read_text())
VERSION = CRD["spec"]["versions"][0]
SCHEMA = (
    VERSION["openAPIV3Schema"]
    if "openAPIV3Schema" in VERSION
    else VERSION["schema"]["openAPIV3Schema"]
)
SPEC = SCHEMA["properties"]["spec"]


def walk(schema: dict[str, Any], path: str):
    yield path, schema
    for name, child in (schema.get("properties") or {}).items():
        yield from walk(child, f"{path}.{name}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")


def test_names_and_subresources():
    assert CRD["spec"]["group"] == "sqlidentity.io"
    assert CRD["spec"]["names"]["shortNames"] == ["swi"]
    assert CRD["spec"]["scope"] == "Namespaced"
    assert VERSION["subresources"] == {"status": {}}


def test_printer_columns():
    columns = [c["name"] for c in VERSION["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Service Account", "Identity", "Database", "Ready", "Reason", "Age"]


def test_every_spec_field_is_documented():
    undocumented = [
        p for p, s in walk(SPEC, "spec") if "description" not in s and not p.endswith("[]")
    ]
    assert undocumented == []


def test_structural_every_node_has_a_type():
    untyped = [p for p, s in walk(SCHEMA, "") if "type" not in s and p]
    assert untyped == []


def test_no_field_names_another_namespace():
    assert not [p for p, _ in walk(SPEC, "spec") if "namespace" in p.lower()]


def pattern(path: str) -> re.Pattern[str]:
    node = SPEC
    for part in path.split("."):
        node = node["properties"][part]
    return re.compile(node["pattern"])


@pytest.mark.parametrize(
    ("path", "good", "bad"),
    [
        ("serviceAccountName", ["sa", "a.b-c"], ["Sa", "-a", "a_b"]),
        (
            "identity.applicationClientId",
            ["5e0c1d9a-7b3f-4c2e-9a1d-000000000002"],
            ["x", "5e0c1d9a7b3f4c2e9a1d000000000002"],
        ),
        (
            "identity.managedIdentityResourceId",
            [
                "/subscriptions/3b9d2f10-6c1a-4e7b-8d5f-a2c4e6f8b0d1/resourceGroups/sandbox-rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/customer-api-identity",
                "/subscriptions/3b9d2f10-6c1a-4e7b-8d5f-a2c4e6f8b0d1/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/abc",
            ],
            [
                "/subscriptions/x/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/abc",
                "/subscriptions/3b9d2f10-6c1a-4e7b-8d5f-a2c4e6f8b0d1/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/abc",
            ],
        ),
        (
            "sql.server",
            ["a.database.windows.net", "tcp:localhost,1433", "host,1433"],
            ["a b", "x;y"],
        ),
    ],
)
def test_schema_patterns_agree_with_the_operator(path, good, bad):
    regex = pattern(path)
    for value in good:
        assert regex.match(value), value
    for value in bad:
        assert not regex.match(value), value


def test_exactly_one_identity_rule_is_declared():
    rules = [v["rule"] for v in SPEC["properties"]["identity"]["x-kubernetes-validations"]]
    assert rules == [
        "[has(self.applicationClientId), has(self.managedIdentityResourceId), "
        "has(self.poolName)].filter(x, x).size() == 1"
    ]
    # A pool gives each member a user named after it: userName is refused with poolName.
    assert [v["rule"] for v in SPEC["x-kubernetes-validations"]] == [
        "!has(self.identity.poolName) || !has(self.sql) || !has(self.sql.userName)"
    ]


@pytest.mark.parametrize(
    "example", sorted((ROOT / "deploy" / "examples").glob("*.yaml")), ids=lambda p: p.name
)
def test_examples_are_valid(example):
    for doc in yaml.safe_load_all(example.read_text()):
        if doc and doc.get("kind") == "SqlWorkloadIdentity":
            parse_spec(doc["spec"])
