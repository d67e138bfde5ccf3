"""The webhook stays up while it runs: its certificate is renewed, its configuration restored.

deploy/overlays/generic installed for real; the webhook as its own ``kopf run`` process under the
deployed ServiceAccount, self-managed TLS with a 30-second certificate renewed when under 15 s
are left (SWI_WEBHOOK_CERT_VALIDITY / SWI_WEBHOOK_CERT_RENEW_BEFORE). Admission goes through the
sandbox's API server (server-side dry-run creates of a labelled pod), which calls the webhook
over TLS and checks its certificate against the configuration's caBundle.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from deploy_harness import (  # type: ignore[import-not-found]
    CONFIGURATION,
    NAMESPACE,
    REPO,
    install_generic,
    kubectl,
    operator_kubeconfig,
    render_kustomize,
    wait_for,
)
from webhook_harness import (  # type: ignore[import-not-found]
    configuration_client_config,
    dry_run_injected,
    webhook_process,
)

pytestmark = pytest.mark.controlplane

SECRET = "sql-workload-identity-operator-webhook-tls"
VALIDITY_S = 30
PROBE_SA = "probe"


def _core(kube: Any) -> Any:
    from kubernetes import client

    return client.CoreV1Api(kube)


def _delete_secret(kube: Any) -> None:
    from kubernetes import client

    with contextlib.suppress(client.ApiException):
        _core(kube).delete_namespaced_secret(SECRET, NAMESPACE)


def served_certificate(port: int) -> x509.Certificate:
    """The certificate the webhook presents to a new TLS 1.3 connection right now."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def _secret_serial(kube: Any) -> int:
    secret = _core(kube).read_namespaced_secret(SECRET, NAMESPACE)
    return x509.load_pem_x509_certificate(base64.b64decode(secret.data["tls.crt"])).serial_number


@pytest.fixture(scope="module")
def upkeep_webhook(
    sandbox: Any, kube: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[int, str]]:
    """The webhook with a short-lived self-managed certificate; yields (port, probe namespace)."""
    from kubernetes import client

    install_generic(sandbox)
    _delete_secret(kube)  # a year-long certificate from another test would not be renewed soon
    tmp = tmp_path_factory.mktemp("upkeep")
    probe_ns = f"upkeep-{uuid.uuid4().hex[:8]}"
    _core(kube).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=probe_ns)))
    _core(kube).create_namespaced_service_account(
        probe_ns,
        client.V1ServiceAccount(
            metadata=client.V1ObjectMeta(
                name=PROBE_SA,
                annotations={"azure.workload.identity/client-id": str(uuid.uuid4())},
            )
        ),
    )
    kubeconfig = operator_kubeconfig(sandbox, kube, tmp / "operator.kubeconfig")
    env = {
        "SWI_WEBHOOK_NAMESPACE": NAMESPACE,
        "SWI_WEBHOOK_CERT_VALIDITY": f"{VALIDITY_S}s",
        "SWI_WEBHOOK_CERT_RENEW_BEFORE": f"{VALIDITY_S // 2}s",
    }
    try:
        with webhook_process(
            kube, kubeconfig, tmp / "webhook.log", env, (probe_ns, PROBE_SA)
        ) as port:
            yield port, probe_ns
    finally:
        _core(kube).delete_namespace(probe_ns)
        _delete_secret(kube)  # the next webhook starts with a certificate of its own settings


def test_admissions_keep_being_allowed_across_certificate_renewals(
    kube: Any, upkeep_webhook: tuple[int, str]
) -> None:
    port, probe_ns = upkeep_webhook
    first = served_certificate(port)
    lifetime = first.not_valid_after_utc - first.not_valid_before_utc
    # issue_bundle back-dates not-before by five minutes (clock skew); the rest is the setting.
    assert lifetime.total_seconds() == 300 + VALIDITY_S
    serials = [first.serial_number]
    refused = []
    admissions = 0
    deadline = time.monotonic() + VALIDITY_S * 1.5  # at least one renewal, likely two
    while time.monotonic() < deadline:
        if not dry_run_injected(kube, probe_ns, PROBE_SA):
            refused.append(time.monotonic())
        admissions += 1
        serial = served_certificate(port).serial_number
        if serial != serials[-1]:
            serials.append(serial)
        time.sleep(0.25)
    assert not refused, f"{len(refused)} of {admissions} admissions refused"
    assert admissions > 60
    assert len(serials) >= 2, "the certificate was not renewed"
    # The renewed certificate is the one in the shared Secret (other replicas serve it too) ...
    # read together: a renewal may land between the loop's last look and this one.
    for _ in range(20):
        in_secret, in_use = _secret_serial(kube), served_certificate(port).serial_number
        if in_secret == in_use:
            break
        time.sleep(0.25)
    assert in_secret == in_use, "the served certificate is not the shared Secret's"
    # ... and issued by the CA the configuration trusts: renewals keep the CA, so no patch.
    ca = base64.b64decode(configuration_client_config(kube)["ca_bundle"])
    served = served_certificate(port)
    served.verify_directly_issued_by(x509.load_pem_x509_certificate(ca))
    assert served.not_valid_after_utc > served.not_valid_before_utc


def _manifest_configuration(sandbox: Any) -> dict[str, Any]:
    docs = render_kustomize(sandbox, REPO / "deploy/overlays/generic")
    found: dict[str, Any] = next(
        d
        for d in docs
        if d["kind"] == "MutatingWebhookConfiguration" and d["metadata"]["name"] == CONFIGURATION
    )
    for hook in found["webhooks"]:
        assert "caBundle" not in hook["clientConfig"]  # as shipped: the operator fills it in
    return found


def test_a_recreated_configuration_gets_its_ca_bundle_back_within_seconds(
    sandbox: Any, kube: Any, upkeep_webhook: tuple[int, str], tmp_path: Path
) -> None:
    from kubernetes import client

    port, probe_ns = upkeep_webhook
    url = f"https://localhost:{port}/inject-workload-identity"
    admission: Any = client.AdmissionregistrationV1Api(kube)
    before = admission.read_mutating_webhook_configuration(CONFIGURATION)

    # In line, it is left unwritten: read every 5 s, never patched (renewals keep the CA).
    time.sleep(11)
    assert (
        admission.read_mutating_webhook_configuration(CONFIGURATION).metadata.resource_version
        == before.metadata.resource_version
    )

    manifest = tmp_path / "configuration.yaml"
    manifest.write_text(yaml.safe_dump(_manifest_configuration(sandbox)))
    kubectl(sandbox, "delete", "mutatingwebhookconfiguration", CONFIGURATION)
    kubectl(sandbox, "apply", "-f", str(manifest))
    recreated = time.monotonic()
    bare = admission.read_mutating_webhook_configuration(CONFIGURATION)
    assert bare.metadata.uid != before.metadata.uid
    assert not bare.webhooks[0].client_config.ca_bundle

    def restored() -> bool:
        config = configuration_client_config(kube)
        return bool(config.get("ca_bundle")) and config.get("url") == url

    wait_for("the client config to be restored", restored, timeout=15)
    took = time.monotonic() - recreated
    assert took < 8, f"restored after {took:.1f} s"
    config = configuration_client_config(kube)
    assert config["service"] is None  # the sandbox points the API server at the URL instead
    secret = _core(kube).read_namespaced_secret(SECRET, NAMESPACE)
    assert config["ca_bundle"] == secret.data["ca.crt"]
    assert wait_for(
        "a labelled pod to be admitted",
        lambda: dry_run_injected(kube, probe_ns, PROBE_SA),
        timeout=10,
    )
