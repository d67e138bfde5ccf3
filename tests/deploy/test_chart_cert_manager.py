"""The chart's cert-manager option (``webhook.tls.certManager``), by `helm template`.

Rendered only: cert-manager is not installed in the sandbox (its controller and CRDs are not part
of it), so what is checked is that the objects name each other consistently -- the Certificate
covers the Service's names, its Secret is what the Deployment mounts at SWI_WEBHOOK_TLS_DIR, the
webhook configurations' ``cert-manager.io/inject-ca-from`` names that Certificate -- and that the
self-managed certificate's objects are gone. The operator's side of provided certificates (renewed
files served without a restart) is tests/operator/unit/test_webhook_certificates.py's.
"""

from __future__ import annotations

from typing import Any

import pytest
from deploy_harness import (  # type: ignore[import-not-found]
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    OPERATOR,
    render_helm,
    run,
)

from sandbox.tools import helm_binary

CONFIGURATIONS = {"MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}
ALL_WEBHOOKS = ("injectionWebhook.enabled=true", "policyWebhook.enabled=true")


def _of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in _of_kind(docs, kind) if d["metadata"]["name"] == name]
    return found


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = _of_kind(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = container
    return found


def _volumes(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = _of_kind(docs, "Deployment")
    return {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}


def test_off_by_default_the_operator_keeps_its_own_certificate() -> None:
    docs = render_helm("generic-values.yaml", set_values=ALL_WEBHOOKS)
    assert not _of_kind(docs, "Certificate") and not _of_kind(docs, "Issuer")
    for configuration in (d for d in docs if d["kind"] in CONFIGURATIONS):
        annotations = configuration["metadata"].get("annotations") or {}
        assert "cert-manager.io/inject-ca-from" not in annotations
    env = {e["name"]: e.get("value") for e in _container(docs)["env"]}
    assert env["SWI_WEBHOOK_SECRET"] == f"{OPERATOR}-webhook-tls"
    assert "SWI_WEBHOOK_TLS_DIR" not in env
    assert _named(docs, "Role", f"{OPERATOR}-webhook-tls")  # the self-managed Secret's Role


def test_own_ca_issuer_certificate_mounted_and_injected() -> None:
    docs = render_helm(
        "generic-values.yaml",
        set_values=(
            *ALL_WEBHOOKS,
            "webhook.tls.certManager.enabled=true",
            "policyWebhook.annotations.example\\.com/keep=yes",
        ),
    )
    # A self-signed root, a CA from it, and that CA's Issuer signing the serving certificate.
    assert _named(docs, "Issuer", f"{OPERATOR}-selfsigned")["spec"] == {"selfSigned": {}}
    ca = _named(docs, "Certificate", f"{OPERATOR}-webhook-ca")
    assert ca["spec"]["isCA"] is True
    assert ca["spec"]["issuerRef"]["name"] == f"{OPERATOR}-selfsigned"
    ca_issuer = _named(docs, "Issuer", f"{OPERATOR}-webhook-ca")
    assert ca_issuer["spec"]["ca"]["secretName"] == ca["spec"]["secretName"]

    serving = _named(docs, "Certificate", f"{OPERATOR}-webhook")
    assert serving["metadata"]["namespace"] == NAMESPACE
    assert serving["spec"]["issuerRef"] == {
        "name": f"{OPERATOR}-webhook-ca",
        "kind": "Issuer",
        "group": "cert-manager.io",
    }
    assert (serving["spec"]["duration"], serving["spec"]["renewBefore"]) == ("2160h", "720h")
    assert "server auth" in serving["spec"]["usages"]
    service = _named(docs, "Service", f"{OPERATOR}-webhook")
    svc = f"{service['metadata']['name']}.{NAMESPACE}.svc"
    assert serving["spec"]["dnsNames"] == [svc, f"{svc}.cluster.local"]

    # The Deployment serves the Certificate's Secret from SWI_WEBHOOK_TLS_DIR.
    container = _container(docs)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "SWI_WEBHOOK_SECRET" not in env
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "webhook-tls"]
    assert mount["mountPath"] == env["SWI_WEBHOOK_TLS_DIR"] and mount["readOnly"] is True
    secret = _volumes(docs)["webhook-tls"]["secret"]["secretName"]
    assert secret == serving["spec"]["secretName"] == f"{OPERATOR}-webhook-cert"
    assert not [d for d in _of_kind(docs, "Role") if d["metadata"]["name"].endswith("-tls")]

    # Every configuration asks cert-manager's CA injector for that Certificate's CA; the
    # configuration's own annotations stay.
    configurations = [d for d in docs if d["kind"] in CONFIGURATIONS]
    assert len(configurations) == 3  # policy check, workload labelling, injection
    for configuration in configurations:
        annotations = configuration["metadata"]["annotations"]
        assert annotations["cert-manager.io/inject-ca-from"] == f"{NAMESPACE}/{OPERATOR}-webhook"
    policy = _named(docs, "ValidatingWebhookConfiguration", f"{OPERATOR}-policy")
    assert policy["metadata"]["annotations"]["example.com/keep"] == "yes"


def test_an_existing_cluster_issuer_and_secret_name() -> None:
    docs = render_helm(
        "generic-values.yaml",
        set_values=(
            *ALL_WEBHOOKS,
            "webhook.tls.certManager.enabled=true",
            "webhook.tls.certManager.issuerRef.name=company-ca",
            "webhook.tls.certManager.issuerRef.kind=ClusterIssuer",
            "webhook.tls.certManager.duration=720h",
            "webhook.tls.certManager.renewBefore=240h",
            "webhook.tls.secretName=my-webhook-tls",
        ),
    )
    assert not _of_kind(docs, "Issuer")  # nothing of the chart's own
    (serving,) = _of_kind(docs, "Certificate")
    assert serving["spec"]["issuerRef"] == {
        "name": "company-ca",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }
    assert (serving["spec"]["duration"], serving["spec"]["renewBefore"]) == ("720h", "240h")
    assert serving["spec"]["secretName"] == "my-webhook-tls"
    assert _volumes(docs)["webhook-tls"]["secret"]["secretName"] == "my-webhook-tls"


@pytest.mark.parametrize(
    ("setting", "named", "says"),
    [
        (
            "webhook.tls.certManager.issuerRef.kind=Vault",
            "/webhook/tls/certManager/issuerRef/kind",
            "'Issuer'",
        ),
        ("webhook.tls.certManager.duration=90d", "/webhook/tls/certManager/duration", "pattern"),
        ("webhook.tls.certManager.enable=true", "'enable'", "additional properties"),
    ],
)
def test_schema_refuses_bad_cert_manager_values(setting: str, named: str, says: str) -> None:
    argv = [str(helm_binary()), "template", "swi", str(CHART), "--namespace", NAMESPACE]
    result = run(
        [
            *argv,
            "--kube-version",
            KUBE_VERSION,
            "-f",
            str(CHART / "ci" / "generic-values.yaml"),
            "--set",
            setting,
        ],
        check=False,
    )
    assert result.returncode != 0
    assert named in result.stderr and says in result.stderr, result.stderr
