"""Every way of installing the operator renders, lints and is accepted by the API server.

Server-side dry-run sends each object through the real API server (schema validation, admission,
RBAC escalation checks) without storing it. The operator's namespace exists for real first, as it
would after `kubectl apply` created it, and so do the CRDs (the base holds a ClusterKopfPeering).
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from deploy_harness import (  # type: ignore[import-not-found]
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    REPO,
    install_generic,
    kubectl,
    remove_webhook_configuration,
    render_helm,
    render_kustomize,
    run,
)

from sandbox.tools import helm_binary

pytestmark = pytest.mark.controlplane

CLUSTER_SCOPED = {
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "ClusterKopfPeering",
}
KUSTOMIZE_UNKNOWN_SCOPE = {
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "ClusterKopfPeering",  # a custom resource: kustomize cannot know its scope
}


def _renderings(sandbox: Any, tmp_path: Any) -> dict[str, list[dict[str, Any]]]:
    return {
        "kustomize base": render_kustomize(sandbox, REPO / "deploy/base"),
        "kustomize aks": render_kustomize(sandbox, REPO / "deploy/overlays/aks"),
        "kustomize generic": render_kustomize(sandbox, REPO / "deploy/overlays/generic"),
        "helm aks": render_helm("aks-values.yaml"),
        "helm generic": render_helm("generic-values.yaml"),
        "helm aks, no policy webhook": render_helm(
            "aks-values.yaml", set_values=("policyWebhook.enabled=false", "requirePolicy=false")
        ),
        "helm generic, provided TLS, 3 replicas": render_helm(
            "generic-values.yaml",
            set_values=("webhook.tls.secretName=webhook-cert", "replicaCount=3"),
        ),
        "helm aks, 1 replica": render_helm(
            "aks-values.yaml", set_values=("replicaCount=1", "podDisruptionBudget.enabled=false")
        ),
    }


def test_every_rendering_applies_with_server_side_dry_run(sandbox: Any, tmp_path: Any) -> None:
    install_generic(sandbox)
    try:
        for name, docs in _renderings(sandbox, tmp_path).items():
            manifest = tmp_path / "manifest.yaml"
            manifest.write_text(yaml.safe_dump_all(docs))
            result = kubectl(sandbox, "apply", "--dry-run=server", "-f", str(manifest), check=False)
            assert result.returncode == 0, f"{name}:\n{result.stderr}"
            # PodSecurity "restricted" on the namespace warns about any pod template it refuses.
            assert "would violate PodSecurity" not in result.stderr, f"{name}:\n{result.stderr}"
            assert len(result.stdout.strip().splitlines()) == len(docs), name
    finally:
        remove_webhook_configuration(sandbox)


def test_namespaced_objects_land_in_the_operator_namespace(sandbox: Any, tmp_path: Any) -> None:
    for name, docs in _renderings(sandbox, tmp_path).items():
        for doc in docs:
            if doc["kind"] in CLUSTER_SCOPED:
                if name.startswith("kustomize") and doc["kind"] in KUSTOMIZE_UNKNOWN_SCOPE:
                    # kustomize's built-in schema predates these kinds, so its namespace
                    # transformer sets one; the API server ignores it on a cluster-scoped kind
                    # (the server-side dry-run above applies them).
                    assert doc["metadata"].get("namespace") in (None, NAMESPACE), name
                    continue
                assert "namespace" not in doc["metadata"], (name, doc["kind"])
            else:
                assert doc["metadata"].get("namespace") == NAMESPACE, (name, doc["kind"])


def test_helm_lint() -> None:
    helm = str(helm_binary())
    for values in ("aks-values.yaml", "generic-values.yaml"):
        result = run([helm, "lint", str(CHART), "--strict", "-f", str(CHART / "ci" / values)])
        assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_helm_refuses_to_render_without_the_operator_identity() -> None:
    result = run(
        [
            str(helm_binary()),
            "template",
            "swi",
            str(CHART),
            "--kube-version",
            KUBE_VERSION,
            "--set",
            "image.repository=example.azurecr.io/sql-workload-identity-operator",
        ],
        check=False,
    )
    assert result.returncode != 0
    assert "identity.clientId is required" in result.stderr


def _name(item: dict[str, Any]) -> str:
    return str(item["name"])


def _by_key(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.mark.parametrize(
    ("overlay", "values"), [("aks", "aks-values.yaml"), ("generic", "generic-values.yaml")]
)
def test_chart_and_kustomize_install_the_same_thing(
    sandbox: Any, overlay: str, values: str
) -> None:
    kustomize = _by_key(render_kustomize(sandbox, REPO / "deploy/overlays" / overlay))
    helm = _by_key(render_helm(values))
    # helm test's pod: deploy/ has no counterpart (test_chart_values checks it).
    assert helm.pop(("Pod", "sql-workload-identity-operator-install-check"))
    generated = {k for k in kustomize if k[0] == "ConfigMap"}  # kustomize adds a hash suffix
    expected = set(kustomize) - generated - {("Namespace", NAMESPACE)}
    assert set(helm) == expected | {("ConfigMap", "sql-workload-identity-operator")}
    for key, k_doc in kustomize.items():
        if key[0] in {"ClusterRole", "Role"}:
            assert helm[key]["rules"] == k_doc["rules"], key
        if key[0] in {"MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}:
            assert helm[key]["webhooks"] == k_doc["webhooks"], key
        if key[0] == "CustomResourceDefinition":
            assert helm[key]["spec"] == k_doc["spec"], key
        if key[0] == "ServiceAccount":
            assert (
                helm[key]["metadata"].get("annotations", {}).keys()
                == k_doc["metadata"].get("annotations", {}).keys()
            )
        if key[0] == "PodDisruptionBudget":
            assert helm[key]["spec"] == k_doc["spec"], key
    k_spec = kustomize[("Deployment", "sql-workload-identity-operator")]["spec"]
    h_spec = helm[("Deployment", "sql-workload-identity-operator")]["spec"]
    for field in ("replicas", "strategy"):  # two replicas that roll one by one (HA)
        assert h_spec[field] == k_spec[field], field
    k_pod, h_pod = k_spec["template"], h_spec["template"]
    assert h_pod["metadata"]["labels"] == k_pod["metadata"]["labels"]
    assert h_pod["spec"]["securityContext"] == k_pod["spec"]["securityContext"]
    assert sorted(h_pod["spec"]["volumes"], key=_name) == sorted(
        k_pod["spec"]["volumes"], key=_name
    )
    (k_container,), (h_container,) = k_pod["spec"]["containers"], h_pod["spec"]["containers"]
    for field in ("securityContext", "resources", "livenessProbe", "readinessProbe", "lifecycle"):
        assert h_container[field] == k_container[field], field
    assert sorted(h_container["ports"], key=_name) == sorted(k_container["ports"], key=_name)
    assert sorted(h_container["env"], key=_name) == sorted(k_container["env"], key=_name)
    assert sorted(h_container["volumeMounts"], key=_name) == sorted(
        k_container["volumeMounts"], key=_name
    )


def test_crds_kustomization_lists_every_crd() -> None:
    listed = yaml.safe_load((REPO / "crds/kustomization.yaml").read_text())["resources"]
    on_disk = sorted(
        p.name for p in (REPO / "crds").glob("*.yaml") if p.name != "kustomization.yaml"
    )
    assert sorted(listed) == on_disk
    linked = sorted(p.resolve() for p in (CHART / "crds").iterdir())
    assert [p for p in linked if p.parent == REPO / "crds"] == [REPO / "crds" / n for n in on_disk]
