"""The pod injection webhook: kopf's admission server wired to ``injection.plan``.

Optional, and off on AKS, where the workload identity add-on already injects the token. On other
clusters the operator enables it (``--injection-webhook`` / ``SWI_INJECTION_WEBHOOK=true``), which
imports this module; ``kopf run -m swi_operator.webhooks`` runs the webhook alone.

The flow of one admission request: the API server calls
``https://<service or host>:<port>/inject-workload-identity`` for a pod being created with the label
``azure.workload.identity/use: "true"`` (the MutatingWebhookConfiguration's objectSelector; its
namespaceSelector leaves out kube-system and the operator's namespace), kopf decodes the review
and calls ``inject``, which finds the pod's service account (``WebhookState.find_service_account``:
from the watch-fed ``service_account_cache`` when it holds the account with its client-id
annotation, else one live GET: a miss, an account without the client id, or a cache not following
the API server; the operator annotates a service account just before it labels the workloads, so
an answer without the annotation is never taken from the cache), asks ``injection.plan`` for the
JSONPatch and ``injection.admission_warnings`` for warnings, and hands both back to kopf, which
answers the API server. An invalid annotation (token expiration, the proxy sidecar) rejects the
pod with its reason and fix; a webhook that cannot be reached is the configuration's
``failurePolicy`` (deploy/: ``Fail``). The cache's first list is part of readiness.

TLS 1.3 only (as azure-workload-identity's webhook), one of two ways (docs/deploy.md):

* provided: ``SWI_WEBHOOK_TLS_DIR`` holds ``tls.crt``, ``tls.key`` and, if the issuer is not the
  certificate itself, ``ca.crt`` (a cert-manager Certificate's Secret, mounted). The files are
  re-read every 10 s; changed ones are served from the next handshake on, and ``ca.crt`` (else
  ``tls.crt``) is the configurations' caBundle.
* self-managed (default): the operator keeps a CA and a serving certificate in the Secret
  ``SWI_WEBHOOK_SECRET`` of its own namespace, creates it on first start and re-issues the serving
  certificate from the same CA when it has less than ``SWI_WEBHOOK_CERT_RENEW_BEFORE`` (30 days)
  of its ``SWI_WEBHOOK_CERT_VALIDITY`` (365 days) left -- at start, and while running: the Secret
  is read every quarter of the renewal window (at most a minute apart). Replicas share it (the
  first one to create it or renew it wins, by resourceVersion; the others serve what it wrote).
  A new CA (when the old one has less than a certificate's validity left) keeps the old CA in
  ``ca.crt`` while it is valid, so replicas still serving a certificate of the old one stay trusted.

A renewed certificate is served without a restart (``ServedCertificate``): a fresh SSL context is
built and the listening one's ``sni_callback`` hands it to each new connection; the port never
closes. (kopf's own watch of the files restarts its server, closing the port for a moment; it is
turned off.)

Either way the operator then writes the CA bundle into its MutatingWebhookConfiguration
(``SWI_WEBHOOK_CONFIGURATION``, shipped in deploy/), and the policy one into its
ValidatingWebhookConfiguration: a strategic-merge patch of each one webhook entry's
``clientConfig``, leaving rules, selectors and failurePolicy to the manifest. Outside a cluster
(the sandbox), ``SWI_WEBHOOK_URL_HOST`` makes that patch point the API server at
``https://<host>:<port>/...`` instead of the Service. While the server runs
(``InjectionServer.maintain``), each configuration is read every 5 s -- with an empty patch, as the
RBAC rules grant ``patch`` and not ``get`` -- and patched again when it is out of line, so one
re-created without a caBundle (``kubectl apply`` of deploy/, a ``helm upgrade``) has it back
within seconds. A periodic read rather than a watch: no RBAC verb beyond ``patch`` on the named
configurations, no watch to re-establish, one request per configuration per 5 s, and nothing
written while it is in line. A caBundle that is not ours but trusts the served certificate (a
newer CA next to ours, written by another replica or cert-manager's CA injector) is left alone,
so replicas do not take turns overwriting each other during a CA rollover.

The same server answers the SqlIdentityPolicy check (``swi_operator.policy_webhook``, a
ValidatingWebhookConfiguration, ``SWI_POLICY_WEBHOOK=true``) and labels new workloads
(``swi_operator.workload_webhook``, a MutatingWebhookConfiguration of its own,
``SWI_WORKLOAD_WEBHOOK=true``): one port, one certificate.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import ipaddress
import logging
import os
import re
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jsonpatch
import kopf
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes import client as k8s
from kubernetes import config as kube_config
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from swi_operator import metrics
from swi_operator.injection import (
    ANNOTATION_PREFIX,
    AUTHORITY_HOST_SETTING,
    USE_LABEL,
    InjectionConfigError,
    InjectionError,
    InjectionSettings,
    admission_warnings,
    authority_host_for_cloud,
    authority_host_from_env,
    plan,
    service_account_name,
)
from swi_operator.readiness import Readiness
from swi_operator.readiness import of as readiness_of
from swi_operator.service_account_cache import ServiceAccountCache

log = logging.getLogger(__name__)

WEBHOOK_ID = "inject-workload-identity"  # kopf's handler id: the last segment of the URL path
WEBHOOK_NAME = "inject-workload-identity.sqlidentity.io"  # the entry in the configuration
DEFAULT_CONFIGURATION = "sql-workload-identity-operator-injection"
# The SqlIdentityPolicy check (swi_operator.policy_webhook) is served by the same server.
POLICY_WEBHOOK_ID = "validate-sqlworkloadidentity"
POLICY_WEBHOOK_NAME = "validate-sqlworkloadidentity.sqlidentity.io"
DEFAULT_POLICY_CONFIGURATION = "sql-workload-identity-operator-policy"
# The workload labelling webhook (swi_operator.workload_webhook), served by the same server too.
WORKLOAD_WEBHOOK_ID = "label-workloads"
WORKLOAD_WEBHOOK_NAME = "label-workloads.sqlidentity.io"
DEFAULT_WORKLOAD_CONFIGURATION = "sql-workload-identity-operator-workloads"
DEFAULT_SERVICE = "sql-workload-identity-operator-webhook"
DEFAULT_SECRET = "sql-workload-identity-operator-webhook-tls"  # noqa: S105 (a name)
DEFAULT_PORT = 9443
MEMO_KEY = "injection_webhook"
REQUEST_TIMEOUT_S = 5.0

CA_VALIDITY = dt.timedelta(days=3650)
CERT_VALIDITY = dt.timedelta(days=365)  # SWI_WEBHOOK_CERT_VALIDITY
RENEW_BEFORE = dt.timedelta(days=30)  # SWI_WEBHOOK_CERT_RENEW_BEFORE
MIN_CERT_VALIDITY = dt.timedelta(seconds=10)
CONFIG_CHECK_INTERVAL_S = 5.0  # how often each configuration's client config is put back
TLS_FILE_CHECK_INTERVAL_S = 10.0  # provided mode: how often the mounted files are re-read
# kopf's own watch of the certificate files restarts its server (a moment with the port closed,
# so admissions fail); the rotation below loads renewed files into the live SSL context instead.
KOPF_FILE_CHECK_OFF_S = 10.0**9


class WebhookConfigError(ValueError):
    """A webhook setting is missing or invalid; the message names the environment variable."""


@dataclass(frozen=True)
class WebhookTarget:
    """One webhook entry of one configuration that this server answers."""

    kind: Literal["mutating", "validating"]
    configuration: str
    entry: str  # the webhook's name in the configuration
    handler_id: str  # kopf's handler id: the last segment of the URL path


@dataclass(frozen=True)
class WebhookSettings:
    injection: InjectionSettings = field(default_factory=InjectionSettings)
    addr: str = "0.0.0.0"
    port: int = DEFAULT_PORT  # 0: any free port (tests)
    namespace: str = "default"  # the operator's: the Secret and the Service live there
    service: str = DEFAULT_SERVICE
    secret: str = DEFAULT_SECRET
    tls_dir: Path | None = None  # provided certificates; None: self-managed
    configuration: str | None = DEFAULT_CONFIGURATION  # None: leave the configuration alone
    url_host: str | None = None  # outside a cluster: point the configuration at this host
    inject: bool = True  # the pod injection webhook is on (its configuration is kept in line)
    policy_configuration: str | None = None  # the policy webhook's; None: off, or not managed
    workload_configuration: str | None = None  # the workload labelling one's; None: off
    cert_validity: dt.timedelta = CERT_VALIDITY  # self-managed serving certificate's lifetime
    renew_before: dt.timedelta = RENEW_BEFORE  # re-issued when less than this is left
    config_check_interval: float = CONFIG_CHECK_INTERVAL_S

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WebhookSettings:
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            return env.get(name, "").strip() or None

        port_raw = get("SWI_WEBHOOK_PORT") or str(DEFAULT_PORT)
        try:
            port = int(port_raw)
        except ValueError:
            port = -1
        if not 0 <= port <= 65535:
            raise WebhookConfigError(f"SWI_WEBHOOK_PORT must be a port number, got {port_raw!r}")
        tls_dir = Path(get("SWI_WEBHOOK_TLS_DIR") or "") if get("SWI_WEBHOOK_TLS_DIR") else None
        if tls_dir is not None:
            missing = [n for n in ("tls.crt", "tls.key") if not (tls_dir / n).is_file()]
            if missing:
                raise WebhookConfigError(
                    f"SWI_WEBHOOK_TLS_DIR={tls_dir}: missing {' and '.join(missing)}"
                )
        try:
            authority = authority_host_from_env(env)
        except InjectionConfigError as exc:
            raise WebhookConfigError(str(exc)) from None
        validity = parse_duration(
            "SWI_WEBHOOK_CERT_VALIDITY", get("SWI_WEBHOOK_CERT_VALIDITY"), CERT_VALIDITY
        )
        renew_before = parse_duration(
            "SWI_WEBHOOK_CERT_RENEW_BEFORE", get("SWI_WEBHOOK_CERT_RENEW_BEFORE"), RENEW_BEFORE
        )
        check_validity(validity, renew_before)
        configuration = env.get("SWI_WEBHOOK_CONFIGURATION", DEFAULT_CONFIGURATION).strip()
        policy = env.get("SWI_POLICY_WEBHOOK", "false").strip().lower() == "true"
        policy_configuration = env.get(
            "SWI_POLICY_CONFIGURATION", DEFAULT_POLICY_CONFIGURATION
        ).strip()
        return cls(
            injection=InjectionSettings(
                authority_host=authority,
                audience=get("SWI_INJECTION_AUDIENCE") or InjectionSettings.audience,
                default_tenant_id=get("AZURE_TENANT_ID"),
            ),
            addr=get("SWI_WEBHOOK_ADDR") or "0.0.0.0",
            port=port,
            namespace=get("SWI_WEBHOOK_NAMESPACE") or get("POD_NAMESPACE") or "default",
            service=get("SWI_WEBHOOK_SERVICE") or DEFAULT_SERVICE,
            secret=get("SWI_WEBHOOK_SECRET") or DEFAULT_SECRET,
            tls_dir=tls_dir,
            configuration=configuration or None,
            url_host=get("SWI_WEBHOOK_URL_HOST"),
            # `kopf run -m swi_operator.webhooks` serves the injection; the operator says itself.
            inject=env.get("SWI_INJECTION_WEBHOOK", "true").strip().lower() != "false",
            policy_configuration=(policy_configuration or None) if policy else None,
            cert_validity=validity,
            renew_before=renew_before,
        )

    @property
    def tls_check_interval(self) -> float:
        """Seconds between checks of the served certificate (Secret, or provided files)."""
        if self.tls_dir is not None:
            return TLS_FILE_CHECK_INTERVAL_S
        # Four chances inside the renewal window, at most a minute apart, at least a second.
        return min(60.0, max(1.0, self.renew_before.total_seconds() / 4))

    @property
    def targets(self) -> list[WebhookTarget]:
        """The configurations whose client config this server keeps pointing at itself."""
        found = []
        if self.inject and self.configuration:
            found.append(WebhookTarget("mutating", self.configuration, WEBHOOK_NAME, WEBHOOK_ID))
        if self.policy_configuration:
            found.append(
                WebhookTarget(
                    "validating", self.policy_configuration, POLICY_WEBHOOK_NAME, POLICY_WEBHOOK_ID
                )
            )
        if self.workload_configuration:
            found.append(
                WebhookTarget(
                    "mutating",
                    self.workload_configuration,
                    WORKLOAD_WEBHOOK_NAME,
                    WORKLOAD_WEBHOOK_ID,
                )
            )
        return found

    @property
    def dns_names(self) -> list[str]:
        """The names the serving certificate must carry: the Service's, and the URL host."""
        names = [
            f"{self.service}.{self.namespace}.svc",
            f"{self.service}.{self.namespace}.svc.cluster.local",
        ]
        if self.url_host and not _is_ip(self.url_host):
            names.append(self.url_host)
        return names

    @property
    def ip_addresses(self) -> list[str]:
        return [self.url_host] if self.url_host and _is_ip(self.url_host) else []


_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(name: str, raw: str | None, default: dt.timedelta) -> dt.timedelta:
    """``90``, ``90s``, ``15m``, ``12h`` or ``365d``; unset: ``default``."""
    if raw is None:
        return default
    found = _DURATION.match(raw.strip().lower())
    if not found or int(found.group(1)) <= 0:
        raise WebhookConfigError(
            f"{name} must be a positive duration such as 365d, 12h, 15m or 40s, got {raw!r}"
        )
    return dt.timedelta(seconds=int(found.group(1)) * _UNIT_S[found.group(2)])


def check_validity(validity: dt.timedelta, renew_before: dt.timedelta) -> None:
    """The serving certificate's lifetime and renewal window must leave time to serve it."""
    if not MIN_CERT_VALIDITY <= validity <= CA_VALIDITY / 2:
        raise WebhookConfigError(
            f"SWI_WEBHOOK_CERT_VALIDITY must be between {MIN_CERT_VALIDITY.total_seconds():.0f}s "
            f"and {(CA_VALIDITY / 2).days}d, got {validity}"
        )
    if renew_before >= validity:
        raise WebhookConfigError(
            f"SWI_WEBHOOK_CERT_RENEW_BEFORE ({renew_before}) must be shorter than "
            f"SWI_WEBHOOK_CERT_VALIDITY ({validity}): a new certificate would be due at once; "
            "e.g. a third or half of the validity"
        )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --- self-managed certificates --------------------------------------------------------------


@dataclass(frozen=True)
class TlsBundle:
    ca_crt: bytes
    ca_key: bytes
    tls_crt: bytes
    tls_key: bytes

    def as_secret_data(self) -> dict[str, bytes | str]:
        return {
            name: base64.b64encode(value).decode()
            for name, value in (
                ("ca.crt", self.ca_crt),
                ("ca.key", self.ca_key),
                ("tls.crt", self.tls_crt),
                ("tls.key", self.tls_key),
            )
        }

    @classmethod
    def from_secret_data(cls, data: Mapping[str, bytes | str] | None) -> TlsBundle | None:
        data = data or {}
        try:
            return cls(
                *(base64.b64decode(data[k]) for k in ("ca.crt", "ca.key", "tls.crt", "tls.key"))
            )
        except (KeyError, ValueError):
            return None


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _new_ca(now: dt.datetime) -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sql-workload-identity webhook CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def issue_bundle(
    dns_names: list[str],
    ip_addresses: list[str],
    ca: tuple[bytes, bytes] | None = None,
    now: dt.datetime | None = None,
    validity: dt.timedelta = CERT_VALIDITY,
) -> TlsBundle:
    """A serving certificate for the names, signed by ``ca`` (PEM cert, key) or a new CA.

    ``ca``'s certificate PEM may be a bundle: the first certificate signs, the whole bundle is
    kept as ``ca_crt`` (the CA bundle the configurations trust).
    """
    now = now or dt.datetime.now(dt.UTC)
    ca_crt, ca_key_pem = ca or _new_ca(now)
    ca_cert = x509.load_pem_x509_certificate(ca_crt)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    assert isinstance(ca_key, rsa.RSAPrivateKey)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    cert = (
        x509.CertificateBuilder()
        # SANs are what clients check; the common name is only a label (and at most 64 chars).
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0][:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + validity, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return TlsBundle(
        ca_crt, ca_key_pem, cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)
    )


def renewal_due(not_after: dt.datetime, now: dt.datetime, renew_before: dt.timedelta) -> bool:
    """Whether a certificate valid until ``not_after`` is inside its renewal window."""
    return not_after - now < renew_before


def needs_reissue(
    bundle: TlsBundle,
    dns_names: list[str],
    ip_addresses: list[str],
    now: dt.datetime,
    renew_before: dt.timedelta = RENEW_BEFORE,
) -> bool:
    """Whether the serving certificate expires soon or lacks a name the API server will dial."""
    cert = x509.load_pem_x509_certificate(bundle.tls_crt)
    if renewal_due(cert.not_valid_after_utc, now, renew_before):
        return True
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return True
    have_dns = set(sans.get_values_for_type(x509.DNSName))
    have_ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    return not (set(dns_names) <= have_dns and set(ip_addresses) <= have_ips)


def _ca_still_good(bundle: TlsBundle, now: dt.datetime, validity: dt.timedelta) -> bool:
    ca = x509.load_pem_x509_certificate(bundle.ca_crt)
    return ca.not_valid_after_utc - now > validity


def _new_ca_keeping_old(current: TlsBundle | None, now: dt.datetime) -> tuple[bytes, bytes]:
    """A new CA whose bundle still carries the old CA while that is valid: replicas still serving
    a certificate of the old one stay trusted until they read the Secret again."""
    ca_crt, ca_key = _new_ca(now)
    if current is not None:
        old = x509.load_pem_x509_certificate(current.ca_crt)
        if old.not_valid_after_utc > now:
            ca_crt += old.public_bytes(serialization.Encoding.PEM)
    return ca_crt, ca_key


def ensure_tls_secret(api: ApiClient, settings: WebhookSettings) -> TlsBundle:
    """Read the webhook's Secret, creating it or re-issuing its certificate when needed."""
    core = k8s.CoreV1Api(api)
    names, ips = settings.dns_names, settings.ip_addresses
    validity, renew_before = settings.cert_validity, settings.renew_before
    for _attempt in range(5):
        now = dt.datetime.now(dt.UTC)
        try:
            secret = core.read_namespaced_secret(
                settings.secret, settings.namespace, _request_timeout=REQUEST_TIMEOUT_S
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            fresh = issue_bundle(names, ips, now=now, validity=validity)
            body = k8s.V1Secret(
                metadata=k8s.V1ObjectMeta(
                    name=settings.secret,
                    labels={"app.kubernetes.io/name": "sql-workload-identity-operator"},
                ),
                type="Opaque",
                data=fresh.as_secret_data(),
            )
            try:
                core.create_namespaced_secret(
                    settings.namespace, body, _request_timeout=REQUEST_TIMEOUT_S
                )
            except ApiException as create_exc:
                if create_exc.status == 409:  # another replica was first: use its certificate
                    continue
                raise
            log.info("created the webhook TLS Secret %s/%s", settings.namespace, settings.secret)
            return fresh
        current = TlsBundle.from_secret_data(secret.data)
        if current is not None and not needs_reissue(current, names, ips, now, renew_before):
            return current
        keep_ca = current is not None and _ca_still_good(current, now, validity)
        ca = (
            (current.ca_crt, current.ca_key)
            if current is not None and keep_ca
            else _new_ca_keeping_old(current, now)
        )
        renewed = issue_bundle(names, ips, ca=ca, now=now, validity=validity)
        secret.data = renewed.as_secret_data()
        try:
            core.replace_namespaced_secret(
                settings.secret, settings.namespace, secret, _request_timeout=REQUEST_TIMEOUT_S
            )
        except ApiException as replace_exc:
            if replace_exc.status == 409:  # a replica renewed it meanwhile: read theirs
                continue
            raise
        log.info("re-issued the webhook certificate in %s/%s", settings.namespace, settings.secret)
        return renewed
    raise RuntimeError(f"the webhook Secret {settings.namespace}/{settings.secret} kept changing")


def write_tls_files(bundle: TlsBundle, directory: Path) -> tuple[Path, Path, Path]:
    """Write the certificate, key and CA where kopf's server reads them (key: owner-only)."""
    paths = (directory / "tls.crt", directory / "tls.key", directory / "ca.crt")
    for path, data in zip(paths, (bundle.tls_crt, bundle.tls_key, bundle.ca_crt), strict=True):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    return paths


# --- the webhook configuration ----------------------------------------------------------------


def client_config_patch(
    kopf_config: Mapping[str, Any], settings: WebhookSettings, target: WebhookTarget | None = None
) -> dict[str, Any]:
    """The strategic-merge patch that points our webhook entry at this server and trusts its CA."""
    target = target or WebhookTarget("mutating", "", WEBHOOK_NAME, WEBHOOK_ID)
    client_config: dict[str, Any] = {}
    if kopf_config.get("caBundle"):
        client_config["caBundle"] = kopf_config["caBundle"]
    if settings.url_host:
        client_config["url"] = f"{str(kopf_config['url']).rstrip('/')}/{target.handler_id}"
        client_config["service"] = None
    return {"webhooks": [{"name": target.entry, "clientConfig": client_config}]}


def _apply_patch(api: ApiClient, target: WebhookTarget, patch: dict[str, Any]) -> Any:
    """The strategic-merge patch; returns the configuration as it is now (ApiException: as is)."""
    admission = k8s.AdmissionregistrationV1Api(api)
    apply = (
        admission.patch_mutating_webhook_configuration
        if target.kind == "mutating"
        else admission.patch_validating_webhook_configuration
    )
    return apply(
        target.configuration,
        patch,
        _content_type="application/strategic-merge-patch+json",
        _request_timeout=REQUEST_TIMEOUT_S,
    )


def _missing_configuration(target: WebhookTarget) -> None:
    log.error(
        "%s%sWebhookConfiguration %s not found: install it from deploy/ (or the chart); "
        "%s meanwhile",
        target.kind[0].upper(),
        target.kind[1:],
        target.configuration,
        {
            WEBHOOK_ID: "pods are not injected",
            POLICY_WEBHOOK_ID: "SqlWorkloadIdentities are checked against policies only at "
            "reconcile",
            WORKLOAD_WEBHOOK_ID: "new workloads are labelled by the drift check only",
        }[target.handler_id],
    )


def patch_configuration(api: ApiClient, target: WebhookTarget, patch: dict[str, Any]) -> bool:
    """Apply ``patch`` to the configuration; False (and a log line) if it is not installed."""
    try:
        _apply_patch(api, target, patch)
    except ApiException as exc:
        if exc.status != 404:
            raise
        _missing_configuration(target)
        return False
    return True


# --- serving, and keeping the certificate and the configurations current ----------------------


def server_ssl_context() -> ssl.SSLContext:
    """The webhook server's context: TLS 1.3 only (as azure-workload-identity's webhook); kopf
    loads the certificate into it at start, ``ServedCertificate`` loads renewed ones."""
    context = ssl.create_default_context(purpose=ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def ca_bundle_of(ca_crt: bytes | None, tls_crt: bytes) -> str:
    """The configurations' caBundle: the CA, or (no ca.crt) the certificate itself, as kopf."""
    return base64.b64encode(ca_crt or tls_crt).decode("ascii")


def _serial(tls_crt: bytes) -> str:
    return format(x509.load_pem_x509_certificate(tls_crt).serial_number, "x")


class ServedCertificate:
    """The certificate the server presents, and where a newer one comes from.

    ``refresh`` (blocking: call it in a thread) looks for a newer certificate -- self-managed:
    ``ensure_tls_secret`` (re-issues into the Secret when the renewal window is reached, or
    returns what another replica wrote there); provided: the mounted files' contents -- and
    loads it into a new SSL context. The listening context kopf was given stays as it is; its
    ``sni_callback`` (called at every ClientHello, with or without SNI) hands each new
    connection the newest context. So the port never closes, open connections keep their
    session, every later handshake gets the new certificate, and a certificate whose key does not
    match (a half-written update) changes nothing: ``load_cert_chain`` into the live context
    would have left it with the new certificate and the old key, failing every handshake.
    """

    def __init__(
        self,
        settings: WebhookSettings,
        api: ApiClient,
        context: ssl.SSLContext,
        files: tuple[Path, Path, Path | None],
        bundle: TlsBundle | None,
    ) -> None:
        self.settings = settings
        self.api = api
        self.certfile, self.keyfile, self.cafile = files
        self.bundle = bundle  # self-managed: what is served
        self.digest = self._files_digest() if bundle is None else ""
        self.ca_bundle = self._read_ca_bundle()
        self.served_crt = self.certfile.read_bytes()  # the certificate (public) being served
        self.current: ssl.SSLContext | None = None  # None: the listening context's own
        context.sni_callback = self._choose

    def _choose(self, connection: ssl.SSLObject, _name: str | None, _: ssl.SSLContext) -> None:
        current = self.current
        if current is not None:
            connection.context = current

    def _files_digest(self) -> str:
        hasher = hashlib.sha256()  # of the files together: the key is not kept in memory
        for path in (self.certfile, self.keyfile, self.cafile):
            if path is not None:
                hasher.update(path.read_bytes())
        return hasher.hexdigest()

    def _read_ca_bundle(self) -> str:
        ca = self.cafile.read_bytes() if self.cafile is not None else None
        return ca_bundle_of(ca, self.certfile.read_bytes())

    @property
    def serial(self) -> str:
        return _serial(self.certfile.read_bytes())

    def refresh(self, trust_new_ca: Callable[[], None] | None = None) -> bool:
        """Load a newer certificate if there is one; True if the served one changed.

        When the CA bundle changes too, ``trust_new_ca`` runs first (the configurations get the
        new bundle before any handshake presents a certificate only it trusts).
        """
        if self.bundle is not None:
            fresh = ensure_tls_secret(self.api, self.settings)
            if fresh.tls_crt == self.bundle.tls_crt:
                return False
            write_tls_files(fresh, self.certfile.parent)
            self.bundle = fresh
        else:
            digest = self._files_digest()
            if digest == self.digest:
                return False
        ca_bundle = self._read_ca_bundle()
        new_crt, old_crt = self.certfile.read_bytes(), self.served_crt
        if ca_bundle != self.ca_bundle:
            self.ca_bundle = ca_bundle
            if trust_new_ca is not None:
                self.served_crt = new_crt  # what the configurations must trust from now on
                try:
                    trust_new_ca()
                finally:
                    self.served_crt = old_crt
        # Secrets mounted in a pod are swapped at once (a symlink); should a certificate and key
        # ever not match, load_cert_chain raises here and the old pair is still served.
        fresh_context = server_ssl_context()
        fresh_context.load_cert_chain(self.certfile, self.keyfile)
        self.current = fresh_context
        self.served_crt = new_crt
        if self.bundle is None:
            self.digest = digest
        return True


def bundle_trusts(ca_bundle: str | None, served_crt: bytes) -> bool:
    """Whether a configuration's caBundle (base64 PEM) trusts the certificate: it holds the
    certificate's issuer (a signature check, not a name match) or the certificate itself."""
    if not ca_bundle:
        return False
    try:
        cas = x509.load_pem_x509_certificates(base64.b64decode(ca_bundle))
    except ValueError:
        return False
    served = x509.load_pem_x509_certificate(served_crt)
    for ca in cas:
        if ca == served:
            return True
        try:
            served.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def client_config_in_line(
    live: Mapping[str, Any], wanted: Mapping[str, Any], served_crt: bytes | None
) -> bool:
    """Whether a configuration entry's live ``clientConfig`` already does what ``wanted`` (our
    patch's) would: the same URL (sandbox mode), and a caBundle that is ours or trusts the served
    certificate anyway. The latter leaves alone a bundle another replica (or cert-manager's CA
    injector) wrote with a newer CA next to ours, instead of taking turns overwriting it."""
    if "url" in wanted and (live.get("url") != wanted["url"] or live.get("service")):
        return False
    have, want = live.get("caBundle"), wanted.get("caBundle")
    if want is None or have == want:
        return True
    return served_crt is not None and bundle_trusts(have, served_crt)


def _reason(exc: Exception) -> str:
    """An error for the log: an API error by status only (its body is the server's to word)."""
    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


class InjectionServer:
    """kopf's HTTPS server, plus: the configurations are brought in line at start, and kept so.

    kopf's own "managed" mode would rewrite the whole configuration without a namespaceSelector
    or reinvocationPolicy; this keeps the manifest's and patches only the client config. While
    the server runs, a task (``maintain``) re-checks the certificate every
    ``settings.tls_check_interval`` and loads a renewed one into the live context, and every
    ``settings.config_check_interval`` reads each configuration and patches its client config
    when it is out of line (``client_config_in_line``): a re-created configuration (kubectl apply
    of deploy/, a helm upgrade: no caBundle) gets it back within seconds; one in line is not
    written (its resourceVersion stays).
    """

    def __init__(
        self,
        server: kopf.WebhookServer,
        api: ApiClient,
        settings: WebhookSettings,
        readiness: Readiness | None = None,
        served: ServedCertificate | None = None,
    ) -> None:
        self._server = server
        self._api = api
        self._settings = settings
        self._readiness = readiness
        self.served = served
        self.task: asyncio.Task[None] | None = None
        self._url: str | None = None
        self._known: dict[WebhookTarget, str | None] = {}  # uid last patched; None: missing
        self._errors: dict[str, str | None] = {}  # the last failure of each check, as logged

    def _patches(self) -> list[tuple[WebhookTarget, dict[str, Any]]]:
        kopf_config: dict[str, Any] = {"url": self._url}
        if self.served is not None:
            kopf_config["caBundle"] = self.served.ca_bundle
        return [
            (target, client_config_patch(kopf_config, self._settings, target))
            for target in self._settings.targets
        ]

    def keep_configurations(self) -> None:
        """Bring each configuration's client config in line; log when one was re-created, changed
        or is gone. An empty patch reads it (the RBAC rules grant ``patch``, not ``get``); only a
        configuration out of line is written."""
        for target, patch in self._patches():
            try:
                live = _apply_patch(self._api, target, {})
            except ApiException as exc:
                if exc.status != 404:
                    raise
                if self._known.get(target, "") is not None:  # log once per disappearance
                    _missing_configuration(target)
                self._known[target] = None
                continue
            raw = self._api.sanitize_for_serialization(live)  # type: ignore[no-untyped-call]
            uid = (raw.get("metadata") or {}).get("uid")
            entry = next(
                (w for w in raw.get("webhooks") or [] if w.get("name") == target.entry), None
            )
            if entry is None:
                if self._known.get(target) != uid:  # once per configuration
                    log.error(
                        "webhook configuration %s has no webhook named %s: install it from "
                        "deploy/ (or the chart)",
                        target.configuration,
                        target.entry,
                    )
                self._known[target] = uid
                continue
            wanted = patch["webhooks"][0]["clientConfig"]
            served = self.served.served_crt if self.served is not None else None
            if not client_config_in_line(entry.get("clientConfig") or {}, wanted, served):
                _apply_patch(self._api, target, patch)
                log.warning(
                    "webhook configuration %s %s: its client config (caBundle%s) is restored",
                    target.configuration,
                    "was re-created or re-installed"
                    if self._known.get(target) != uid
                    else "had its client config changed",
                    ", url" if self._settings.url_host else "",
                )
            self._known[target] = uid

    async def maintain(self) -> None:
        """Until cancelled: the certificate renewed in time, the configurations kept in line."""
        tls_every = self._settings.tls_check_interval
        config_every = self._settings.config_check_interval
        loop = asyncio.get_running_loop()
        next_tls = loop.time() + tls_every
        while True:
            await asyncio.sleep(min(tls_every, config_every))
            if self.served is not None and loop.time() >= next_tls:
                next_tls = loop.time() + tls_every
                try:
                    if await asyncio.to_thread(self.served.refresh, self.keep_configurations):
                        log.info(
                            "serving the renewed webhook certificate (serial %s)",
                            self.served.serial,
                        )
                    self._failing("certificate", None)
                except Exception as exc:  # the upkeep must outlive any one error
                    self._failing("certificate", exc)
            try:
                await asyncio.to_thread(self.keep_configurations)
                self._failing("configurations", None)
            except Exception as exc:  # as above
                self._failing("configurations", exc)

    def _failing(self, what: str, exc: Exception | None) -> None:
        """Log a failed check once per distinct reason (a warning every 5 s says nothing new),
        and the recovery."""
        reason = None if exc is None else _reason(exc)
        before = self._errors.get(what)
        if reason == before:
            return
        self._errors[what] = reason
        if reason is None:
            log.info("the webhook %s check works again", what)
        else:
            log.warning("the webhook %s check failed, retrying: %s", what, reason)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        async with self._server as server:
            try:
                async for kopf_config in server(fn):
                    self._url = str(kopf_config.get("url"))
                    for target in self._settings.targets:
                        patch = client_config_patch(kopf_config, self._settings, target)
                        if not await asyncio.to_thread(
                            patch_configuration, self._api, target, patch
                        ):
                            self._known[target] = None  # logged; logged again once it is back
                        else:
                            log.info(
                                "webhook configuration %s points at %s",
                                target.configuration,
                                patch["webhooks"][0]["clientConfig"].get("url")
                                or f"service {self._settings.namespace}/{self._settings.service}",
                            )
                    await asyncio.to_thread(self.keep_configurations)  # remember what is there
                    if self._readiness is not None:  # listening, configurations point here
                        self._readiness.listening(self._settings.addr, self._url)
                    if self.task is None:
                        self.task = asyncio.create_task(self.maintain(), name="webhook-upkeep")
                    yield kopf_config
            finally:
                await self.stop()


# --- kopf wiring -------------------------------------------------------------------------------


def build_kube_api() -> ApiClient:
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        kube_config.load_incluster_config()  # type: ignore[no-untyped-call]
        return ApiClient()
    # KUBECONFIG is read now, not when the kubernetes package was imported.
    api: ApiClient = kube_config.new_client_from_config(  # type: ignore[no-untyped-call]
        config_file=os.environ.get("KUBECONFIG")
    )
    return api


@dataclass
class WebhookState:
    settings: WebhookSettings
    api: ApiClient
    tls_dir: tempfile.TemporaryDirectory[str] | None = None
    server: InjectionServer | None = None
    # Watch-fed; None: every admission reads the service account live (start_cache starts it).
    service_accounts: ServiceAccountCache | None = None

    def start_cache(self, readiness: Readiness | None) -> None:
        """Start the service account cache of the pod injection webhook; readiness waits for it."""
        if not self.settings.inject or self.service_accounts is not None:
            return
        self.service_accounts = ServiceAccountCache(self.api)
        self.service_accounts.start()
        if readiness is not None:
            readiness.wait_for("the service account cache has not listed yet", self.cache_synced)

    def cache_synced(self) -> bool:
        return self.service_accounts is not None and self.service_accounts.synced

    def stop_cache(self) -> None:
        if self.service_accounts is not None:
            self.service_accounts.stop()

    async def find_service_account(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The pod's service account for ``plan``: from the cache when it holds the account with
        its client id, else read live (a miss, an account without the client id, or a cache that
        is not following the API server: the operator may have annotated it a moment ago)."""
        if self.service_accounts is not None:
            cached = self.service_accounts.lookup(namespace, name)
            if cached is not None:
                metrics.SERVICE_ACCOUNT_READS.labels("cache").inc()
                return cached
        metrics.SERVICE_ACCOUNT_READS.labels("api").inc()
        try:
            return await asyncio.to_thread(self.read_service_account, namespace, name)
        except ApiException as exc:
            cache = self.service_accounts
            if exc.status != 401 or cache is None or not cache.fresh:
                raise
            # Our own token refused: this replica's pod was deleted (with --force its token is
            # void at once) while the Service still routes admissions to it for a moment. The
            # cache's watch, authenticated before, still follows the API server and holds no
            # client id for the account: answer as for an account without one, rather than
            # refuse the pod (failurePolicy Fail).
            metrics.SERVICE_ACCOUNT_READS.labels("cache_after_401").inc()
            return {"metadata": {"name": name, "namespace": namespace, "annotations": {}}}

    def read_service_account(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The service account's metadata as ``plan`` reads it; None when it does not exist."""
        core = k8s.CoreV1Api(self.api)
        try:
            sa = core.read_namespaced_service_account(
                name, namespace, _request_timeout=REQUEST_TIMEOUT_S
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        annotations = {
            key: value
            for key, value in ((sa.metadata.annotations if sa.metadata else None) or {}).items()
            if key.startswith(ANNOTATION_PREFIX)
        }
        return {"metadata": {"name": name, "namespace": namespace, "annotations": annotations}}


def build_server(
    settings: WebhookSettings,
    api: ApiClient,
    state: WebhookState,
    readiness: Readiness | None = None,
) -> InjectionServer:
    bundle: TlsBundle | None = None
    if settings.tls_dir is not None:
        ca = settings.tls_dir / "ca.crt"
        certfile, pkeyfile, cafile = (
            settings.tls_dir / "tls.crt",
            settings.tls_dir / "tls.key",
            ca if ca.is_file() else None,
        )
    else:
        bundle = ensure_tls_secret(api, settings)
        state.tls_dir = tempfile.TemporaryDirectory(prefix="swi-webhook-")
        certfile, pkeyfile, cafile = write_tls_files(bundle, Path(state.tls_dir.name))
    context = server_ssl_context()
    server = kopf.WebhookServer(
        addr=settings.addr,
        port=settings.port or None,
        host=settings.url_host,
        certfile=str(certfile),
        pkeyfile=str(pkeyfile),
        cafile=str(cafile) if cafile is not None else None,
        context=context,
        file_check_interval=KOPF_FILE_CHECK_OFF_S,
    )
    served = ServedCertificate(settings, api, context, (certfile, pkeyfile, cafile), bundle)
    state.server = InjectionServer(server, api, settings, readiness, served)
    return state.server


@kopf.on.startup()
async def start_webhook(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    webhook = WebhookSettings.from_env()
    config = memo.get("config")  # the operator's, when run by python -m swi_operator
    if config is not None:
        policy = os.environ.get("SWI_POLICY_CONFIGURATION", DEFAULT_POLICY_CONFIGURATION).strip()
        workloads = os.environ.get(
            "SWI_WORKLOAD_CONFIGURATION", DEFAULT_WORKLOAD_CONFIGURATION
        ).strip()
        injection = webhook.injection
        if config.azure_environment and not os.environ.get(AUTHORITY_HOST_SETTING, "").strip():
            # --azure-environment (validated at start-up) may be a flag, not in the environment.
            injection = dataclasses.replace(
                injection,
                authority_host=authority_host_for_cloud(config.azure_environment, os.environ),
            )
        webhook = dataclasses.replace(
            webhook,
            injection=injection,
            inject=config.injection_webhook,
            policy_configuration=(policy or None) if config.policy_webhook else None,
            workload_configuration=(workloads or None) if config.workload_webhook else None,
        )
    api = await asyncio.to_thread(build_kube_api)
    state = WebhookState(webhook, api)
    ready = readiness_of(memo)  # the same one handlers.start serves, whichever runs first
    state.start_cache(ready)
    settings.admission.server = await asyncio.to_thread(build_server, webhook, api, state, ready)
    memo[MEMO_KEY] = state
    log.info(
        "admission webhooks on %s:%s (TLS: %s; configurations: %s)",
        webhook.addr,
        webhook.port or "(any)",
        f"provided in {webhook.tls_dir}"
        if webhook.tls_dir
        else f"self-managed in Secret {webhook.namespace}/{webhook.secret}",
        ", ".join(t.configuration for t in webhook.targets) or "(not managed)",
    )


@kopf.on.cleanup()
async def stop_webhook(memo: kopf.Memo, **_: Any) -> None:
    state: WebhookState | None = memo.get(MEMO_KEY)
    if state is None:
        return
    if state.server is not None:
        await state.server.stop()
    await asyncio.to_thread(state.stop_cache)
    if state.tls_dir is not None:
        state.tls_dir.cleanup()
    state.api.close()  # type: ignore[no-untyped-call]


@kopf.on.mutate("", "v1", "pods", id=WEBHOOK_ID, operations=["CREATE"], labels={USE_LABEL: "true"})
@metrics.observed_webhook(WEBHOOK_ID, kopf.AdmissionError)
async def inject(
    body: kopf.Body,
    patch: kopf.Patch,
    memo: kopf.Memo,
    namespace: str | None,
    warnings: list[str],
    logger: logging.Logger | logging.LoggerAdapter[Any],
    **_: Any,
) -> None:
    started = time.perf_counter()
    state: WebhookState = memo[MEMO_KEY]
    pod: dict[str, Any] = dict(body)
    sa_name = service_account_name(pod)
    if not namespace:
        raise kopf.AdmissionError("the pod has no namespace", code=400)
    try:
        service_account = await state.find_service_account(namespace, sa_name)
    except ApiException as exc:
        raise kopf.AdmissionError(
            f"reading service account {namespace}/{sa_name} failed: {exc.status} {exc.reason}",
            code=500,
        ) from exc
    try:
        ops = plan(pod, service_account, state.settings.injection)
    except InjectionError as exc:
        raise kopf.AdmissionError(str(exc), code=400) from exc
    warnings.extend(admission_warnings(pod))
    if ops:
        patch.fns.append(lambda raw: jsonpatch.apply_patch(raw, ops, in_place=True))
    with contextlib.suppress(Exception):
        logger.debug(
            "%s for service account %s in %.1f ms",
            f"injected ({len(ops)} patch operations)" if ops else "nothing to inject",
            sa_name,
            (time.perf_counter() - started) * 1000,
        )
