"""The README's "On AKS" walkthrough, checked without Azure: its shell parses as POSIX sh and bash,
its policy (step 7) allows what its resource (step 8) asks for by the operator's own policy code,
the resource selects the Deployment (step 9), its Helm install (step 5) renders with exactly its
``--set`` values, and it neither locks anyone out of the SQL server nor needs a manual T-SQL step
or GNU-only ``sed -i``. No cluster is needed (helm renders locally).
"""

from __future__ import annotations

import re
import shlex
import shutil
import string
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_harness import (  # type: ignore[import-not-found]
    KUBE_VERSION,
    NAMESPACE,
    OPERATOR,
    documents,
    run,
)
from swi_operator.policy import authorize, parse_policy
from swi_operator.spec import parse_spec

from sandbox.tools import helm_binary

REPO = Path(__file__).resolve().parents[2]
# What a reader's shell would hold after the exports and steps 2 and 6.
ENV = {
    "TENANT": "72f988bf-86f1-41af-91ab-2d7cd011db47",
    "OPERATOR_APP_ID": "0b1a7e2c-3d4f-4a5b-8c6d-7e8f9a0b1c2d",
    "APP_ID": "5e0c1d9a-7b3f-4c2e-9a1d-000000000003",
    "ACR": "myswiregistry",
    "SQL_SERVER": "mysqlserver",
    "SQL_DATABASE": "mydb",
}


def _walkthrough() -> str:
    section = (REPO / "README.md").read_text().split("\n## On AKS\n", 1)[1]
    return section.split("```sh\n", 1)[1].split("\n```", 1)[0]


def _commands() -> list[str]:
    """One string per shell command: continuation lines joined, comments dropped."""
    joined = _walkthrough().replace("\\\n", " ")
    lines = (line.strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _manifests() -> dict[str, dict[str, Any]]:
    """The heredocs applied with ``kubectl apply -f -``, expanded, by kind."""
    bodies = re.findall(r"kubectl apply -f - <<YAML\n(.*?)\nYAML\n", _walkthrough(), re.S)
    loaded = [yaml.safe_load(string.Template(body).substitute(ENV)) for body in bodies]
    return {doc["kind"]: doc for doc in loaded}


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_walkthrough_parses_as_shell(shell: str, tmp_path: Path) -> None:
    path = shutil.which(shell)
    assert path, f"{shell} is not on PATH"
    script = tmp_path / "walkthrough.sh"
    script.write_text(_walkthrough())
    proc = subprocess.run([path, "-n", str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_no_gnu_only_sed_in_readme_or_docs() -> None:
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        # GNU sed takes -i without a suffix, BSD (macOS) sed reads the next word as the suffix.
        assert not re.search(r"\bsed\s+-i(\s|$)", page.read_text()), page.name


def test_policy_allows_what_the_resource_asks() -> None:
    manifests = _manifests()
    policy = parse_policy(manifests["SqlIdentityPolicy"])
    resource = manifests["SqlWorkloadIdentity"]
    spec = parse_spec(resource["spec"])
    assert spec.sql is not None, "step 8's resource must ask for the database user (spec.sql)"
    assert spec.sql.roles, "step 8's spec.sql grants no role"
    decision = authorize(spec.identity, spec.sql, resource["metadata"]["namespace"], {}, [policy])
    assert decision.allowed, decision.message


def test_resource_selects_the_deployment_and_names_its_database() -> None:
    manifests = _manifests()
    resource, deployment = manifests["SqlWorkloadIdentity"], manifests["Deployment"]
    assert deployment["metadata"]["namespace"] == resource["metadata"]["namespace"]
    template = deployment["spec"]["template"]
    wanted = resource["spec"]["workloads"]["selector"]["matchLabels"]
    assert wanted.items() <= template["metadata"]["labels"].items()
    assert template["spec"]["serviceAccountName"] == resource["spec"]["serviceAccountName"]
    (container,) = template["spec"]["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    sql = resource["spec"]["sql"]
    assert (env["AZ_SERVER"], env["AZ_DATABASE"]) == (sql["server"], sql["database"])


def test_sql_admin_is_a_group_and_no_manual_create_user() -> None:
    commands = _commands()
    assert not any("CREATE USER" in c or c.startswith("sqlcmd") for c in commands)
    (admin,) = [c for c in commands if c.startswith("az sql server ad-admin create")]
    object_id = shlex.split(admin)[shlex.split(admin).index("--object-id") + 1]
    # The admin is the group the operator and the reader are added to, never the operator alone
    # (a server has one Entra admin: that would lock the reader out).
    assert object_id != "$OPERATOR_SP_ID"
    members = [c for c in commands if c.startswith("az ad group member add")]
    assert any("$OPERATOR_SP_ID" in c and object_id in c for c in members), members
    assert any("az ad signed-in-user show" in c and object_id in c for c in members), members
    assert any(c.startswith("az sql server firewall-rule create") for c in commands)


def test_helm_install_renders_with_its_values() -> None:
    (install,) = [c for c in _commands() if c.startswith("helm install")]
    argv = [string.Template(arg).substitute(ENV) for arg in shlex.split(install)]
    assert argv[:2] == ["helm", "install"]
    result = run(
        [str(helm_binary()), "template", *argv[2:], "--kube-version", KUBE_VERSION], cwd=REPO
    )
    docs = documents(result.stdout)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    (deployment,) = by_kind["Deployment"]
    (account,) = by_kind["ServiceAccount"]
    (config,) = [c for c in by_kind["ConfigMap"] if c["metadata"]["name"] == OPERATOR]
    # What step 5 waits for, and the subject step 2 federates.
    rollout = next(c for c in _commands() if c.startswith(f"kubectl -n {NAMESPACE} rollout"))
    assert rollout.endswith(f"deploy/{deployment['metadata']['name']}")
    assert deployment["metadata"]["namespace"] == account["metadata"]["namespace"] == NAMESPACE
    subject = f"system:serviceaccount:{NAMESPACE}:{account['metadata']['name']}"
    assert subject in _walkthrough()
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.startswith(f"{ENV['ACR']}.azurecr.io/sql-workload-identity-operator:")
    assert (
        account["metadata"]["annotations"]["azure.workload.identity/client-id"]
        == (ENV["OPERATOR_APP_ID"])
    )
    assert config["data"]["AZURE_TENANT_ID"] == ENV["TENANT"]
    # AKS: the add-on injects the tokens, so the chart renders no injection webhook.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels.get("azure.workload.identity/use") == "true"
    assert not any(
        c["metadata"]["name"].endswith("-injection")
        for c in by_kind.get("MutatingWebhookConfiguration", [])
    )
