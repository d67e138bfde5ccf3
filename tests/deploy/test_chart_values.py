"""The chart's values: its schema, README table and optional objects, by `helm template`/`lint`.

No cluster: helm renders offline (``--kube-version`` as the sandbox's), and the CRD folder check
uses kubectl's ``--local`` mode. What a rendering does on a real API server is test_manifests'.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_harness import (  # type: ignore[import-not-found]
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    OPERATOR,
    OPERATOR_PODS,
    documents,
    render_helm,
    run,
)

from sandbox import install, launcher
from sandbox.tools import helm_binary

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
VALUES_GUID = "11111111-2222-3333-4444-555555555555"
README = (CHART / "README.md").read_text()


def _template(*args: str, check: bool = False, **kw: Any) -> Any:
    argv = [str(helm_binary()), "template", "swi", str(CHART), "--namespace", NAMESPACE]
    return run([*argv, "--kube-version", KUBE_VERSION, *args], check=check, **kw)


def _deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    return deployment


def _leaves(values: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of values.yaml, descending where the schema describes an object's keys."""
    keys = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        assert key in schema.get("properties", {}), f"{path} is not in values.schema.json"
        sub = schema["properties"][key]
        if isinstance(value, dict) and "properties" in sub:
            keys += _leaves(value, sub, f"{path}.")
        else:
            keys.append(path)
    return keys


def _get(values: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        values = values[part]
    return values


def _readme_rows() -> dict[str, str]:
    """`key` -> the default cell of the README's values table."""
    rows = re.findall(r"^\| `([A-Za-z.]+)` \| `([^`]*)` \|", README, re.MULTILINE)
    return dict(rows)


def test_every_value_is_in_the_schema_and_the_readme_with_its_default() -> None:
    leaves = _leaves(VALUES, SCHEMA)
    rows = _readme_rows()
    assert not set(leaves) - set(rows), (
        f"not in the README's values table: {set(leaves) - set(rows)}"
    )
    assert not set(rows) - set(leaves), f"README rows not in values.yaml: {set(rows) - set(leaves)}"
    for key in leaves:
        assert yaml.safe_load(rows[key]) == _get(VALUES, key), f"README default of {key}"


def test_schema_refuses_objects_it_describes_with_unknown_keys() -> None:
    def walk(schema: dict[str, Any], path: str) -> None:
        if "properties" in schema:
            assert schema.get("additionalProperties") is False, path
            for key, sub in schema["properties"].items():
                walk(sub, f"{path}.{key}")
        if isinstance(schema.get("items"), dict):
            walk(schema["items"], f"{path}[]")

    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    walk(SCHEMA, "values")


@pytest.mark.parametrize(
    ("setting", "named", "says"),
    [
        ("replicaCont=2", "'replicaCont'", "additional properties"),
        ("podDisruptionBudget.enable=true", "'enable'", "additional properties"),
        ("identity.mode=azure", "/identity/mode", "'aks', 'projected'"),
        ("injectionWebhook.failurePolicy=fail", "/injectionWebhook/failurePolicy", "'Fail'"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy", "'IfNotPresent'"),
        ("identity.clientId=my-app", "/identity/clientId", "does not match pattern"),
        ("replicaCount=0", "/replicaCount", "minimum"),
        (
            "injectionWebhook.azureEnvironment=AzureCloud",
            "/injectionWebhook/azureEnvironment",
            "'AzureChinaCloud'",
        ),
    ],
)
def test_schema_refuses_a_bad_value_naming_it(setting: str, named: str, says: str) -> None:
    result = _template("-f", str(CHART / "ci" / "aks-values.yaml"), "--set", setting)
    assert result.returncode != 0
    assert "don't meet the specifications of the schema" in result.stderr
    assert named in result.stderr and says in result.stderr, result.stderr


def test_schema_accepts_what_the_sandbox_installs() -> None:
    # chart_values() as the sandbox's install calls it, with the addresses its node would export.
    env = {
        "SANDBOX_POD_SQL_HOST": "sqlserver.database.windows.net",
        "SANDBOX_NODE_HOST_ADDRESS": "10.200.0.1",
        "SANDBOX_POD_HTTPS_PROXY": "http://10.200.0.1:3128",
        "SANDBOX_POD_AZ_SERVER": "10.200.0.1",
        "SANDBOX_SERVICE_CIDR": "10.96.0.0/16",
        "SANDBOX_SUBSCRIPTION_ID": "0b1a7e2c-3d4f-4a5b-8c6d-7e8f9a0b1c2d",
    }
    values = install.chart_values(env)
    result = _template("-f", "-", input=yaml.safe_dump(values), check=True)
    pod = _deployment(documents(result.stdout))["spec"]["template"]["spec"]
    assert pod["hostAliases"] == values["hostAliases"]


@pytest.mark.parametrize("values", ["aks-values.yaml", "generic-values.yaml"])
def test_two_replicas_that_roll_one_by_one_with_a_pdb_by_default(values: str) -> None:
    """Some webhooks fail closed: two pods serve them, a rollout never has fewer than two ready,
    a drain keeps one; the peering object keeps one of them reconciling."""
    docs = render_helm(values)
    deployment = _deployment(docs)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SWI_PEERING"] == OPERATOR
    (peering,) = [d for d in docs if d["kind"] == "ClusterKopfPeering"]
    assert peering["metadata"]["name"] == OPERATOR
    (pdb,) = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["metadata"]["namespace"] == NAMESPACE and pdb["metadata"]["name"] == OPERATOR
    assert pdb["spec"]["minAvailable"] == 1
    selector = pdb["spec"]["selector"]["matchLabels"]
    key, value = OPERATOR_PODS.split("=")
    assert selector == {key: value}
    assert selector == deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


@pytest.mark.parametrize("values", ["aks-values.yaml", "generic-values.yaml"])
def test_readiness_is_the_operators_endpoint_and_liveness_kopfs(values: str) -> None:
    (container,) = _deployment(render_helm(values))["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert (ready["path"], ports[ready["port"]]) == ("/readyz", 8081)
    assert env["SWI_READINESS"] == "http://0.0.0.0:8081/readyz"
    assert (live["path"], ports[live["port"]]) == ("/healthz", 8080)
    assert env["SWI_LIVENESS"] == "http://0.0.0.0:8080/healthz"
    assert container["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}


def test_one_replica_recreates_without_peering_or_pdb() -> None:
    docs = render_helm(
        "aks-values.yaml", set_values=("replicaCount=1", "podDisruptionBudget.enabled=false")
    )
    deployment = _deployment(docs)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "SWI_PEERING" not in {e["name"] for e in container["env"]}
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"PodDisruptionBudget", "ClusterKopfPeering"}


@pytest.mark.parametrize("values", ["aks-values.yaml", "generic-values.yaml"])
def test_no_priority_or_spread_by_default(values: str) -> None:
    pod = _deployment(render_helm(values))["spec"]["template"]["spec"]
    assert "priorityClassName" not in pod and "topologySpreadConstraints" not in pod
    assert "nodeSelector" not in pod


def test_pdb_takes_a_percentage() -> None:
    docs = render_helm(
        "aks-values.yaml",
        set_values=("podDisruptionBudget.enabled=true", "podDisruptionBudget.minAvailable=50%"),
    )
    (pdb,) = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["minAvailable"] == "50%"


def test_pdb_that_would_block_every_drain_is_refused() -> None:
    result = _template("-f", str(CHART / "ci" / "aks-values.yaml"), "--set", "replicaCount=1")
    assert result.returncode != 0
    assert "podDisruptionBudget.minAvailable (1) must be lower than replicaCount (1)" in (
        result.stderr
    )
    assert "one replica: podDisruptionBudget.enabled=false" in result.stderr


def test_priority_class_spread_and_node_selector_reach_the_pod() -> None:
    spread = [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": OPERATOR}},
        }
    ]
    extra = {
        "priorityClassName": "system-cluster-critical",
        "topologySpreadConstraints": spread,
        "nodeSelector": {"kubernetes.io/os": "linux"},
    }
    result = _template(
        "-f", str(CHART / "ci" / "generic-values.yaml"), "-f", "-", input=yaml.safe_dump(extra)
    )
    assert result.returncode == 0, result.stderr
    pod = _deployment(documents(result.stdout))["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["topologySpreadConstraints"] == spread
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}


def test_kube_version_is_what_the_templates_need() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=1.30.0-0"
    rendered = "\n".join(p.read_text() for p in (CHART / "templates").glob("*.yaml"))
    # What makes it 1.30: the v1 ValidatingAdmissionPolicy (GA in 1.30).
    assert (
        "apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingAdmissionPolicy" in rendered
    )
    old = run(
        [
            str(helm_binary()),
            "template",
            "swi",
            str(CHART),
            "--kube-version",
            "1.29.9",
            "-f",
            str(CHART / "ci" / "aks-values.yaml"),
        ],
        check=False,
    )
    assert old.returncode != 0 and "chart requires kubeVersion: >=1.30.0-0" in old.stderr


@pytest.mark.parametrize("values", ["aks-values.yaml", "generic-values.yaml"])
def test_helm_lint_strict_with_the_ci_values(values: str) -> None:
    result = run(
        [
            str(helm_binary()),
            "lint",
            str(CHART),
            "--strict",
            "--kube-version",
            KUBE_VERSION,
            "-f",
            str(CHART / "ci" / values),
        ]
    )
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_readme_crd_step_applies_every_crd_helm_installs() -> None:
    """`kubectl apply -f charts/.../crds/` (the README's upgrade step) reads every CRD the chart
    installs: the folder is flat and kubectl follows its links (``--local``: no server)."""
    command = "kubectl apply -f charts/sql-workload-identity-operator/crds/"
    assert command in README
    folder = Path(CHART / "crds")
    assert all(p.is_file() and p.suffix == ".yaml" for p in folder.iterdir())
    kubectl = launcher.build_controlplane(quiet=True) / "kubectl"
    local = run(
        [
            str(kubectl),
            "--kubeconfig=/dev/null",
            "annotate",
            "--local",
            "-o",
            "name",
            "-f",
            f"{folder}/",
            "checked=true",
        ]
    )
    read = sorted(local.stdout.split())
    crds = [d for d in render_helm("aks-values.yaml") if d["kind"] == "CustomResourceDefinition"]
    helm = sorted(
        f"customresourcedefinition.apiextensions.k8s.io/{d['metadata']['name']}" for d in crds
    )
    assert read == helm and len(read) == 5


def test_azure_environment_reaches_the_operator_only_with_the_injection_webhook() -> None:
    def config_map(*settings: str) -> dict[str, Any]:
        result = _template("-f", str(CHART / "ci" / "generic-values.yaml"), *settings, check=True)
        (found,) = [d for d in documents(result.stdout) if d["kind"] == "ConfigMap"]
        return dict(found["data"])

    china = ("--set", "injectionWebhook.azureEnvironment=AzureChinaCloud")
    assert config_map(*china)["AZURE_ENVIRONMENT"] == "AzureChinaCloud"
    assert "AZURE_ENVIRONMENT" not in config_map()
    assert "AZURE_ENVIRONMENT" not in config_map(*china, "--set", "injectionWebhook.enabled=false")


def _install_check(*settings: str) -> dict[str, Any] | None:
    docs = render_helm("aks-values.yaml", set_values=settings)
    found = [d for d in docs if d["kind"] == "Pod"]
    return found[0] if found else None


def test_the_helm_test_pod_is_no_operator_pod_and_follows_the_options() -> None:
    pod = _install_check()
    assert pod is not None
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    # Not selected by the operator's Services, ReplicaSet or PodDisruptionBudget.
    key, value = OPERATOR_PODS.split("=")
    assert pod["metadata"]["labels"].get(key) != value
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["volumes"][0]["secret"] == {
        "secretName": f"{OPERATOR}-webhook-tls",
        "items": [{"key": "ca.crt", "path": "ca.crt"}],
    }
    (container,) = spec["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    args = container["args"]
    assert f"--webhook-url=https://{OPERATOR}-webhook.{NAMESPACE}.svc:443" in args
    assert "--policy-webhook" in args and "--version=0.1.0" in args
    assert f"--metrics-url=http://{OPERATOR}-metrics.{NAMESPACE}.svc:9090/metrics" in args

    other = _install_check("policyWebhook.enabled=false", "metrics.port=9100", "image.tag=build-7")
    assert other is not None
    args = other["spec"]["containers"][0]["args"]
    assert "--policy-webhook" not in args and not any(a.startswith("--version") for a in args)
    assert f"--metrics-url=http://{OPERATOR}-metrics.{NAMESPACE}.svc:9100/metrics" in args
    provided = _install_check("webhook.tls.secretName=my-tls")
    assert provided is not None
    assert provided["spec"]["volumes"][0]["secret"]["secretName"] == "my-tls"
    assert _install_check("tests.enabled=false") is None


def test_the_image_repository_is_required_with_the_fix_named() -> None:
    """No public image is published: an install without image.repository stops at `helm install`
    saying what to set, instead of pods pulling a name no registry serves."""
    identity = (
        "--set",
        f"identity.tenantId={VALUES_GUID}",
        "--set",
        f"identity.clientId={VALUES_GUID}",
    )
    result = _template(*identity)
    assert result.returncode != 0
    assert "image.repository is required" in result.stderr
    assert "azurecr.io/sql-workload-identity-operator" in result.stderr
    ok = _template(*identity, "--set", "image.repository=example.azurecr.io/swi", check=True)
    (deployment,) = [d for d in documents(ok.stdout) if d["kind"] == "Deployment"]
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "example.azurecr.io/swi:0.1.0"
