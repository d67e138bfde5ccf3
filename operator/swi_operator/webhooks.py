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

TLS, one of two ways (docs/deploy.md):

* provided: ``SWI_WEBHOOK_TLS_DIR`` holds ``tls.crt``, ``tls.key`` and, if the issuer is not the
  certificate itself, ``ca.crt`` (a cert-manager Certificate's Secret, mounted). kopf re-reads the
  files when they change.
* self-managed (default): the operator keeps a CA and a serving certificate in the Secret
  ``SWI_WEBHOOK_SECRET`` of its own namespace, creates it on first start and re-issues the serving
  certificate from the same CA when it has less than 30 days left at a start. Replicas share it
  (the first one to create it wins; the others read it).

Either way the operator then writes the CA bundle into its MutatingWebhookConfiguration
(``SWI_WEBHOOK_CONFIGURATION``, shipped in deploy/), and the policy one into its
ValidatingWebhookConfiguration: a strategic-merge patch of each one webhook entry's
``clientConfig``, leaving rules, selectors and failurePolicy to the manifest. Outside a cluster
(the sandbox), ``SWI_WEBHOOK_URL_HOST`` makes that patch point the API server at
``https://<host>:<port>/...`` instead of the Service.

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
import ipaddress
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jsonpatch
import kopf
from cryptography import x509
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
CERT_VALIDITY = dt.timedelta(days=365)
RENEW_BEFORE = dt.timedelta(days=30)


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
        )

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
) -> TlsBundle:
    """A serving certificate for the names, signed by ``ca`` (PEM cert, key) or a new CA."""
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
        .not_valid_after(min(now + CERT_VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return TlsBundle(
        ca_crt, ca_key_pem, cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)
    )


def needs_reissue(
    bundle: TlsBundle, dns_names: list[str], ip_addresses: list[str], now: dt.datetime
) -> bool:
    """Whether the serving certificate expires soon or lacks a name the API server will dial."""
    cert = x509.load_pem_x509_certificate(bundle.tls_crt)
    if cert.not_valid_after_utc - now < RENEW_BEFORE:
        return True
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return True
    have_dns = set(sans.get_values_for_type(x509.DNSName))
    have_ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    return not (set(dns_names) <= have_dns and set(ip_addresses) <= have_ips)


def _ca_still_good(bundle: TlsBundle, now: dt.datetime) -> bool:
    ca = x509.load_pem_x509_certificate(bundle.ca_crt)
    return ca.not_valid_after_utc - now > CERT_VALIDITY


def ensure_tls_secret(api: ApiClient, settings: WebhookSettings) -> TlsBundle:
    """Read the webhook's Secret, creating it or re-issuing its certificate when needed."""
    core = k8s.CoreV1Api(api)
    names, ips = settings.dns_names, settings.ip_addresses
    for _attempt in range(5):
        now = dt.datetime.now(dt.UTC)
        try:
            secret = core.read_namespaced_secret(
                settings.secret, settings.namespace, _request_timeout=REQUEST_TIMEOUT_S
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            fresh = issue_bundle(names, ips, now=now)
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
        if current is not None and not needs_reissue(current, names, ips, now):
            return current
        keep_ca = current is not None and _ca_still_good(current, now)
        ca = (current.ca_crt, current.ca_key) if current is not None and keep_ca else None
        renewed = issue_bundle(names, ips, ca=ca, now=now)
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


def patch_configuration(api: ApiClient, target: WebhookTarget, patch: dict[str, Any]) -> bool:
    """Apply ``patch`` to the configuration; False (and a log line) if it is not installed."""
    admission = k8s.AdmissionregistrationV1Api(api)
    apply = (
        admission.patch_mutating_webhook_configuration
        if target.kind == "mutating"
        else admission.patch_validating_webhook_configuration
    )
    try:
        apply(
            target.configuration,
            patch,
            _content_type="application/strategic-merge-patch+json",
            _request_timeout=REQUEST_TIMEOUT_S,
        )
    except ApiException as exc:
        if exc.status != 404:
            raise
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
        return False
    return True


class InjectionServer:
    """kopf's HTTPS server, plus: after each (re)start, the configuration is brought in line.

    kopf's own "managed" mode would rewrite the whole configuration without a namespaceSelector
    or reinvocationPolicy; this keeps the manifest's and patches only the client config.
    """

    def __init__(
        self,
        server: kopf.WebhookServer,
        api: ApiClient,
        settings: WebhookSettings,
        readiness: Readiness | None = None,
    ) -> None:
        self._server = server
        self._api = api
        self._settings = settings
        self._readiness = readiness

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        async with self._server as server:
            async for kopf_config in server(fn):
                for target in self._settings.targets:
                    patch = client_config_patch(kopf_config, self._settings, target)
                    if await asyncio.to_thread(patch_configuration, self._api, target, patch):
                        log.info(
                            "webhook configuration %s points at %s",
                            target.configuration,
                            patch["webhooks"][0]["clientConfig"].get("url")
                            or f"service {self._settings.namespace}/{self._settings.service}",
                        )
                if self._readiness is not None:  # listening, and the configurations point here
                    self._readiness.listening(self._settings.addr, str(kopf_config.get("url")))
                yield kopf_config


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
        return await asyncio.to_thread(self.read_service_account, namespace, name)

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
    server = kopf.WebhookServer(
        addr=settings.addr,
        port=settings.port or None,
        host=settings.url_host,
        certfile=str(certfile),
        pkeyfile=str(pkeyfile),
        cafile=str(cafile) if cafile is not None else None,
    )
    return InjectionServer(server, api, settings, readiness)


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
    state.start_cache(memo.get("readiness"))
    settings.admission.server = await asyncio.to_thread(
        build_server, webhook, api, state, memo.get("readiness")
    )
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
