"""Operator configuration: flags, or environment variables of the same meaning, checked at start-up.

Every setting has a flag and an environment variable; a flag wins. The operator's own Azure
credential and tenant use azure-identity's standard variables (``AZURE_TENANT_ID``,
``AZURE_CLIENT_ID``, ``AZURE_CLIENT_SECRET`` or ``AZURE_FEDERATED_TOKEN_FILE``,
``AZURE_AUTHORITY_HOST``), so the same Deployment works with the AKS workload identity webhook.
A client secret is read from the environment only, never from a flag (flags show in ``ps``).
Everything is validated before kopf starts, and each message names the flag and variable to fix.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from swi_operator import version
from swi_operator.injection import InjectionConfigError, authority_host_for_cloud
from swi_operator.spec import is_guid

PUBLIC_AUTHORITY = "https://login.microsoftonline.com"
PUBLIC_GRAPH_URL = "https://graph.microsoft.com/v1.0"
PUBLIC_ARM_URL = "https://management.azure.com"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
ARM_SCOPE = "https://management.azure.com/.default"

# Azure SQL's host suffixes (public, US Government, China) and the operator's own loopback.
DEFAULT_SQL_SERVERS = (
    ".database.windows.net",
    ".database.usgovcloudapi.net",
    ".database.chinacloudapi.cn",
    "localhost",
    "127.0.0.1",
)

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_HOST_OR_SUFFIX = re.compile(r"^\.?[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names it (flag and environment variable)."""


@dataclass(frozen=True)
class Config:
    tenant_id: str
    client_id: str
    client_secret: str | None = field(default=None, repr=False)  # never in a repr or a log
    federated_token_file: Path | None = None
    authority_host: str = PUBLIC_AUTHORITY
    graph_url: str = PUBLIC_GRAPH_URL
    graph_scope: str = GRAPH_SCOPE
    arm_url: str = PUBLIC_ARM_URL
    arm_scope: str = ARM_SCOPE
    subscription_id: str | None = None
    issuer: str | None = None
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    drift_interval: float = 600.0
    sweep_interval: float = 300.0  # seconds between sweeps of this cluster's credentials (sweep.py)
    peering: str | None = None  # None: standalone, no peering objects needed
    # Where the ledger ConfigMap lives (ledger.py): a namespace no tenant writes, the operator's.
    ledger_namespace: str = "default"
    posting_level: int = logging.INFO
    cloud_concurrency: int = 8
    max_reconciles: int = 64  # reconciles running at once; kopf starts one per resource at once
    # Azure's write quotas (shared/docs/scale.md); writes are paced to them, 0 paces nothing.
    graph_write_rate: float = 20.0  # per operator app and tenant: ~3,000 per 2.5 minutes
    arm_write_rate: float = 2.0  # managed identity provider, per subscription
    arm_identity_write_rate: float = 0.25  # managed identity provider, per identity
    retry_backoff_max: float = 120.0
    deletion_timeout: float = 600.0
    verify_interval: float = 3600.0  # seconds between probes of a Verified resource
    propagation_timeout: float = 900.0  # AADSTS70021 this long after a credential write: a failure
    pod_token_grace: float = 120.0  # a pod this long without the token: WorkloadsReady False
    sql_user_form: str = "sid"  # CREATE USER ... WITH SID, or FROM EXTERNAL PROVIDER (object-id)
    sql_concurrency: int = 4  # ODBC sessions working at once (threads of their own)
    sql_lock_timeout: float = 5.0  # SET LOCK_TIMEOUT of every operator statement, in seconds
    sql_statement_timeout: float = 30.0  # ODBC query timeout of every operator statement
    # Where an Entra token for Azure SQL may be sent (spec.sql.server comes from users).
    allowed_sql_servers: tuple[str, ...] = DEFAULT_SQL_SERVERS
    liveness_endpoint: str | None = None
    readiness_endpoint: str | None = None  # swi_operator.readiness
    metrics_port: int = 0  # Prometheus metrics (swi_operator.metrics); 0: not served
    metrics_address: str = "0.0.0.0"
    log_format: str = "text"  # text (kopf's) or json: one JSON object per line
    install_crds: Path | None = None
    injection_webhook: bool = False  # serve the pod injection webhook (swi_operator.webhooks)
    # The cloud whose Entra endpoint the injection webhook injects (azure-workload-identity's
    # AZURE_ENVIRONMENT); None: the webhook's environment decides (docs/deploy.md).
    azure_environment: str | None = None
    require_policy: bool = True  # refuse what no SqlIdentityPolicy allows (swi_operator.policy)
    policy_webhook: bool = False  # serve the validating webhook (swi_operator.policy_webhook)
    workload_webhook: bool = False  # label workloads at admission (swi_operator.workload_webhook)
    ca_bundle: Path | None = None  # None: the system's trust store

    @property
    def authority_is_public(self) -> bool:
        return urlsplit(self.authority_host).hostname in {
            "login.microsoftonline.com",
            "login.microsoftonline.us",
            "login.chinacloudapi.cn",
        }

    def redacted(self) -> dict[str, object]:
        """The settings for the start-up log line, without the secret."""
        return {
            "tenant": self.tenant_id,
            "client": self.client_id,
            "credential": "client secret" if self.client_secret else "workload identity",
            "authority": self.authority_host,
            "graph": self.graph_url,
            "arm": self.arm_url,
            "issuer": self.issuer or "(discovered)",
            "namespaces": ",".join(self.namespaces) or "(all)",
            "drift_interval": self.drift_interval,
            "sweep_interval": self.sweep_interval,
            "peering": self.peering or "(standalone)",
            "ledger_namespace": self.ledger_namespace,
            "require_policy": self.require_policy,
            "metrics": f"{self.metrics_address}:{self.metrics_port}"
            if self.metrics_port
            else "(off)",
        }


@dataclass(frozen=True)
class _Setting:
    dest: str
    flag: str
    env: str
    help: str
    default: str | None = None
    repeat: bool = False  # flag repeatable; env comma-separated


_SETTINGS: tuple[_Setting, ...] = (
    _Setting(
        "tenant_id",
        "--tenant-id",
        "AZURE_TENANT_ID",
        "Entra tenant the operator works in (required)",
    ),
    _Setting(
        "client_id",
        "--client-id",
        "AZURE_CLIENT_ID",
        "the operator's own application (client) id (required)",
    ),
    _Setting(
        "federated_token_file",
        "--federated-token-file",
        "AZURE_FEDERATED_TOKEN_FILE",
        "token file for workload identity; alternative: AZURE_CLIENT_SECRET in the environment",
    ),
    _Setting(
        "authority_host",
        "--authority-host",
        "AZURE_AUTHORITY_HOST",
        "Entra token endpoint host",
        PUBLIC_AUTHORITY,
    ),
    _Setting(
        "graph_url",
        "--graph-url",
        "SWI_GRAPH_URL",
        "Microsoft Graph base URL, with version",
        PUBLIC_GRAPH_URL,
    ),
    _Setting(
        "graph_scope", "--graph-scope", "SWI_GRAPH_SCOPE", "token scope for Graph", GRAPH_SCOPE
    ),
    _Setting(
        "arm_url", "--arm-url", "SWI_ARM_URL", "Azure Resource Manager endpoint", PUBLIC_ARM_URL
    ),
    _Setting("arm_scope", "--arm-scope", "SWI_ARM_SCOPE", "token scope for ARM", ARM_SCOPE),
    _Setting(
        "subscription_id",
        "--subscription-id",
        "AZURE_SUBSCRIPTION_ID",
        "subscription of the ARM client built at start-up (each managed identity's resource id "
        "names its own)",
    ),
    _Setting(
        "issuer",
        "--issuer",
        "SWI_ISSUER",
        "the cluster's service-account issuer URL; default: discovered from the API server",
    ),
    _Setting(
        "namespaces",
        "--namespace",
        "SWI_NAMESPACES",
        "namespace to watch (repeatable; default: all)",
        repeat=True,
    ),
    _Setting(
        "drift_interval",
        "--drift-interval",
        "SWI_DRIFT_INTERVAL",
        "seconds between drift checks",
        "600",
    ),
    _Setting(
        "sweep_interval",
        "--sweep-interval",
        "SWI_SWEEP_INTERVAL",
        "seconds between sweeps that delete this cluster's federated credentials no live, "
        "allowed SqlWorkloadIdentity backs (also run after each policy change and deletion)",
        "300",
    ),
    _Setting(
        "peering",
        "--peering",
        "SWI_PEERING",
        "kopf peering object name for active/standby replicas (default: standalone)",
    ),
    _Setting(
        "ledger_namespace",
        "--ledger-namespace",
        "SWI_LEDGER_NAMESPACE",
        "namespace of the ledger ConfigMap that records the database users and identities the "
        "operator made (the operator's own: no tenant may write ConfigMaps there); default: "
        "POD_NAMESPACE, else default",
    ),
    _Setting(
        "posting_level",
        "--posting-level",
        "SWI_POSTING_LEVEL",
        f"lowest level posted as Events ({'/'.join(_LEVELS)})",
        "INFO",
    ),
    _Setting(
        "cloud_concurrency",
        "--cloud-concurrency",
        "SWI_CLOUD_CONCURRENCY",
        "Graph/ARM requests in flight at most, each",
        "8",
    ),
    _Setting(
        "max_reconciles",
        "--max-reconciles",
        "SWI_MAX_RECONCILES",
        "reconciles (and clean-ups) running at once; the others wait their turn, first come first "
        "served",
        "64",
    ),
    _Setting(
        "graph_write_rate",
        "--graph-write-rate",
        "SWI_GRAPH_WRITE_RATE",
        "Graph credential writes per second at most (Graph's write quota per app and tenant is "
        "about 3,000 per 2.5 minutes); 0: no pacing",
        "20",
    ),
    _Setting(
        "arm_write_rate",
        "--arm-write-rate",
        "SWI_ARM_WRITE_RATE",
        "managed identity credential writes per second and subscription at most (ARM's quota: "
        "about 2); 0: no pacing",
        "2",
    ),
    _Setting(
        "arm_identity_write_rate",
        "--arm-identity-write-rate",
        "SWI_ARM_IDENTITY_WRITE_RATE",
        "credential writes per second on one managed identity at most (ARM's quota: about "
        "0.25); 0: no pacing",
        "0.25",
    ),
    _Setting(
        "retry_backoff_max",
        "--retry-backoff-max",
        "SWI_RETRY_BACKOFF_MAX",
        "cap in seconds of the backoff after errors",
        "120",
    ),
    _Setting(
        "deletion_timeout",
        "--deletion-timeout",
        "SWI_DELETION_TIMEOUT",
        "seconds the finalizer retries transient errors before it lets a deletion through",
        "600",
    ),
    _Setting(
        "verify_interval",
        "--verify-interval",
        "SWI_VERIFY_INTERVAL",
        "seconds between end-to-end probes of a Verified resource (sooner after any change)",
        "3600",
    ),
    _Setting(
        "propagation_timeout",
        "--propagation-timeout",
        "SWI_PROPAGATION_TIMEOUT",
        "seconds Entra may keep refusing a new federated credential (Propagating) before "
        "Verified says NoMatchingFederatedCredential",
        "900",
    ),
    _Setting(
        "pod_token_grace",
        "--pod-token-grace",
        "SWI_POD_TOKEN_GRACE",
        "seconds a pod of a resource's service account may run without the injected token "
        "(a rollout replacing it) before WorkloadsReady says PodsWithoutToken",
        "120",
    ),
    _Setting(
        "sql_user_form",
        "--sql-user-form",
        "SWI_SQL_USER_FORM",
        "how database users are created: sid (WITH SID, no directory read) or object-id (FROM "
        "EXTERNAL PROVIDER WITH OBJECT_ID: the server's identity must read the directory)",
        "sid",
    ),
    _Setting(
        "sql_concurrency",
        "--sql-concurrency",
        "SWI_SQL_CONCURRENCY",
        "Azure SQL sessions working at once (each in a thread of its own)",
        "4",
    ),
    _Setting(
        "sql_lock_timeout",
        "--sql-lock-timeout",
        "SWI_SQL_LOCK_TIMEOUT",
        "seconds each of the operator's SQL statements waits for a lock another session holds "
        "(SET LOCK_TIMEOUT) before it fails with 1222 and is retried later",
        "5",
    ),
    _Setting(
        "sql_statement_timeout",
        "--sql-statement-timeout",
        "SWI_SQL_STATEMENT_TIMEOUT",
        "seconds each of the operator's SQL statements may run (the ODBC query timeout)",
        "30",
    ),
    _Setting(
        "allowed_sql_servers",
        "--allowed-sql-server",
        "SWI_ALLOWED_SQL_SERVERS",
        "host name, or .suffix, of the SQL servers spec.sql.server may name: the operator's "
        "token (and the probe's) is sent to no other (repeatable; default: "
        f"{','.join(DEFAULT_SQL_SERVERS)})",
        repeat=True,
    ),
    _Setting(
        "ca_bundle",
        "--ca-bundle",
        "SWI_CA_BUNDLE",
        "PEM file of the CAs to trust for Entra, Graph and ARM (default: the system's)",
    ),
    _Setting(
        "liveness_endpoint",
        "--liveness",
        "SWI_LIVENESS",
        "serve a liveness probe, e.g. http://0.0.0.0:8080/healthz",
    ),
    _Setting(
        "readiness_endpoint",
        "--readiness",
        "SWI_READINESS",
        "serve a readiness probe (start-up done, webhook server answering), e.g. "
        "http://0.0.0.0:8081/readyz",
    ),
    _Setting(
        "metrics_port",
        "--metrics-port",
        "SWI_METRICS_PORT",
        "port of the Prometheus metrics endpoint (/metrics, plain HTTP), e.g. 9090 as deploy/ "
        "and the chart set it; 0 serves none",
        "0",
    ),
    _Setting(
        "metrics_address",
        "--metrics-address",
        "SWI_METRICS_ADDRESS",
        "address the metrics endpoint listens on (127.0.0.1: this machine only)",
        "0.0.0.0",
    ),
    _Setting(
        "log_format",
        "--log-format",
        "SWI_LOG_FORMAT",
        "text (kopf's lines) or json (one JSON object per line, for log collectors)",
        "text",
    ),
    _Setting(
        "install_crds",
        "--install-crds",
        "SWI_INSTALL_CRDS",
        "directory of CRD manifests to create or replace at start-up (development only)",
    ),
    _Setting(
        "injection_webhook",
        "--injection-webhook",
        "SWI_INJECTION_WEBHOOK",
        "true: also serve the pod injection webhook, for clusters without the AKS workload "
        "identity add-on (its SWI_WEBHOOK_* settings: docs/deploy.md)",
        "false",
    ),
    _Setting(
        "azure_environment",
        "--azure-environment",
        "AZURE_ENVIRONMENT",
        "the Azure cloud whose Entra endpoint the injection webhook injects as "
        "AZURE_AUTHORITY_HOST, as azure-workload-identity names it: AzurePublicCloud (default), "
        "AzureChinaCloud, AzureUSGovernmentCloud, AzureGermanCloud, AzureStackCloud (with "
        "AZURE_ENVIRONMENT_FILEPATH); SWI_INJECTION_AUTHORITY_HOST, a URL, wins over it",
    ),
    _Setting(
        "require_policy",
        "--require-policy",
        "SWI_REQUIRE_POLICY",
        "true: a SqlWorkloadIdentity no SqlIdentityPolicy allows is refused (NotAuthorized); "
        "false: only identities some policy names are restricted (docs/security.md)",
        "true",
    ),
    _Setting(
        "policy_webhook",
        "--policy-webhook",
        "SWI_POLICY_WEBHOOK",
        "true: also serve the validating admission webhook that refuses unauthorised "
        "SqlWorkloadIdentities at kubectl apply (docs/security.md)",
        "false",
    ),
    _Setting(
        "workload_webhook",
        "--workload-webhook",
        "SWI_WORKLOAD_WEBHOOK",
        "true: also serve the mutating admission webhook that labels a new workload's pod "
        "template before its first pod is created (docs/operator.md)",
        "false",
    ),
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="swi-operator",
        description=(
            "Reconcile SqlWorkloadIdentity resources into Entra federated credentials, annotated "
            "service accounts and labelled workloads. Talks to the cluster of the current "
            "kubeconfig (KUBECONFIG), or the in-cluster service account."
        ),
        epilog=(
            "The operator authenticates to Entra with AZURE_CLIENT_ID plus AZURE_CLIENT_SECRET "
            "(environment only) or AZURE_FEDERATED_TOKEN_FILE. Every flag can also be given as "
            "the environment variable in brackets."
        ),
    )
    for s in _SETTINGS:
        default_note = f"; default: {s.default}" if s.default else ""
        p.add_argument(
            s.flag,
            dest=s.dest,
            action="append" if s.repeat else "store",
            metavar=s.flag.removeprefix("--").upper().replace("-", "_"),
            default=None,
            help=f"{s.help} [{s.env}]{default_note}",
        )
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    return p


def load(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[Config, argparse.Namespace]:
    """Parse ``argv`` over ``environ``; raise ``ConfigError`` naming the first bad setting."""
    env = os.environ if environ is None else environ
    args = parser().parse_args(argv)
    raw: dict[str, str | list[str] | None] = {}
    for s in _SETTINGS:
        value = getattr(args, s.dest)
        if value is None and env.get(s.env):
            value = (
                [v.strip() for v in env[s.env].split(",") if v.strip()] if s.repeat else env[s.env]
            )
        raw[s.dest] = value if value is not None else s.default
    return _validate(raw, env), args


def _name(dest: str) -> str:
    s = next(s for s in _SETTINGS if s.dest == dest)
    return f"{s.flag} / {s.env}"


def _guid(raw: Mapping[str, object], dest: str, required: bool) -> str | None:
    value = raw.get(dest)
    if value is None:
        if required:
            raise ConfigError(f"{_name(dest)} is required")
        return None
    if not isinstance(value, str) or not is_guid(value):
        raise ConfigError(f"{_name(dest)} must be a GUID, got {value!r}")
    return value.lower()


def _https_url(raw: Mapping[str, object], dest: str) -> str:
    value = str(raw.get(dest))
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(f"{_name(dest)} must be an https:// URL, got {value!r}")
    return value.rstrip("/")


def _number(raw: Mapping[str, object], dest: str, minimum: float) -> float:
    try:
        value = float(str(raw.get(dest)))
    except ValueError:
        raise ConfigError(f"{_name(dest)} must be a number, got {raw.get(dest)!r}") from None
    if value < minimum:
        raise ConfigError(f"{_name(dest)} must be at least {minimum:g}, got {value:g}")
    return value


def _choice(raw: Mapping[str, object], dest: str, allowed: Sequence[str]) -> str:
    value = str(raw.get(dest)).lower()
    if value not in allowed:
        raise ConfigError(f"{_name(dest)} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _sql_servers(raw: Mapping[str, object]) -> tuple[str, ...]:
    listed = raw.get("allowed_sql_servers")
    if not isinstance(listed, list):
        return DEFAULT_SQL_SERVERS
    servers = tuple(str(entry).lower() for entry in listed)
    for entry in servers:
        if not _HOST_OR_SUFFIX.match(entry):
            raise ConfigError(
                f"{_name('allowed_sql_servers')}: {entry!r} is not a host name or .suffix"
            )
    return servers


def _validate(raw: Mapping[str, object], env: Mapping[str, str]) -> Config:
    tenant = _guid(raw, "tenant_id", required=True)
    client = _guid(raw, "client_id", required=True)
    assert tenant is not None and client is not None
    secret = env.get("AZURE_CLIENT_SECRET") or None
    token_file_raw = raw.get("federated_token_file")
    token_file = Path(str(token_file_raw)) if token_file_raw else None
    if secret and token_file:
        raise ConfigError(
            "set only one operator credential: AZURE_CLIENT_SECRET or "
            f"{_name('federated_token_file')}, not both"
        )
    if not secret and not token_file:
        raise ConfigError(
            "no operator credential: set AZURE_CLIENT_SECRET (environment) or "
            f"{_name('federated_token_file')} (workload identity)"
        )
    if token_file and not token_file.is_file():
        raise ConfigError(f"{_name('federated_token_file')}: no such file {str(token_file)!r}")

    issuer = raw.get("issuer")
    if issuer is not None:
        parts = urlsplit(str(issuer))
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigError(f"{_name('issuer')} must be an https:// URL, got {issuer!r}")

    listed = raw.get("namespaces")
    namespaces = tuple(str(ns) for ns in listed) if isinstance(listed, list) else ()
    for ns in namespaces:
        if not _DNS1123_LABEL.match(ns):
            raise ConfigError(f"{_name('namespaces')}: {ns!r} is not a namespace name")

    level = str(raw.get("posting_level")).upper()
    if level not in _LEVELS:
        raise ConfigError(
            f"{_name('posting_level')} must be one of {', '.join(_LEVELS)}, got {level!r}"
        )

    peering = raw.get("peering")
    if peering is not None and not _DNS1123_LABEL.match(str(peering)):
        raise ConfigError(f"{_name('peering')} must be a DNS label, got {peering!r}")

    ledger_namespace = str(raw.get("ledger_namespace") or env.get("POD_NAMESPACE") or "default")
    if not _DNS1123_LABEL.match(ledger_namespace):
        raise ConfigError(
            f"{_name('ledger_namespace')} must be a namespace name, got {ledger_namespace!r}"
        )

    crds = raw.get("install_crds")
    if crds is not None and not Path(str(crds)).is_dir():
        raise ConfigError(f"{_name('install_crds')}: no such directory {crds!r}")

    injection = str(raw.get("injection_webhook")).lower()
    if injection not in ("true", "false"):
        raise ConfigError(f"{_name('injection_webhook')} must be true or false, got {injection!r}")

    azure_environment = raw.get("azure_environment")
    if azure_environment is not None and injection == "true":  # only the injection reads it
        try:
            authority_host_for_cloud(str(azure_environment), env)
        except InjectionConfigError as exc:
            raise ConfigError(
                f"{_name('azure_environment')}: {str(exc).removeprefix('AZURE_ENVIRONMENT=')}"
            ) from None

    flags = {}
    for dest in ("require_policy", "policy_webhook", "workload_webhook"):
        value = str(raw.get(dest)).lower()
        if value not in ("true", "false"):
            raise ConfigError(f"{_name(dest)} must be true or false, got {value!r}")
        flags[dest] = value == "true"

    ca_bundle = raw.get("ca_bundle")
    if ca_bundle is not None and not Path(str(ca_bundle)).is_file():
        raise ConfigError(f"{_name('ca_bundle')}: no such file {ca_bundle!r}")

    liveness = raw.get("liveness_endpoint")
    if liveness is not None and urlsplit(str(liveness)).scheme not in ("http", "https"):
        raise ConfigError(
            f"{_name('liveness_endpoint')} must be an http(s):// URL, got {liveness!r}"
        )

    readiness = raw.get("readiness_endpoint")
    if readiness is not None and urlsplit(str(readiness)).scheme != "http":
        raise ConfigError(
            f"{_name('readiness_endpoint')} must be an http:// URL, got {readiness!r}"
        )

    metrics_port = _number(raw, "metrics_port", 0)
    if metrics_port > 65535 or metrics_port != int(metrics_port):
        raise ConfigError(
            f"{_name('metrics_port')} must be a port number (0 to 65535), got {metrics_port:g}"
        )
    for key, endpoint in (("liveness_endpoint", liveness), ("readiness_endpoint", readiness)):
        if endpoint is not None and metrics_port and urlsplit(str(endpoint)).port == metrics_port:
            raise ConfigError(
                f"{_name('metrics_port')} {metrics_port:g} is the port of {_name(key)}: "
                "give them different ports"
            )
    metrics_address = str(raw.get("metrics_address"))
    try:
        ipaddress.ip_address(metrics_address)
    except ValueError:
        raise ConfigError(
            f"{_name('metrics_address')} must be an IP address such as 0.0.0.0 or 127.0.0.1, "
            f"got {metrics_address!r}"
        ) from None

    return Config(
        tenant_id=tenant,
        client_id=client,
        client_secret=secret,
        federated_token_file=token_file,
        authority_host=_https_url(raw, "authority_host"),
        graph_url=_https_url(raw, "graph_url"),
        graph_scope=str(raw.get("graph_scope")),
        arm_url=_https_url(raw, "arm_url"),
        arm_scope=str(raw.get("arm_scope")),
        subscription_id=_guid(raw, "subscription_id", required=False),
        issuer=str(issuer) if issuer is not None else None,
        namespaces=namespaces,
        drift_interval=_number(raw, "drift_interval", 1),
        sweep_interval=_number(raw, "sweep_interval", 1),
        peering=str(peering) if peering is not None else None,
        ledger_namespace=ledger_namespace,
        posting_level=getattr(logging, level),
        cloud_concurrency=int(_number(raw, "cloud_concurrency", 1)),
        max_reconciles=int(_number(raw, "max_reconciles", 1)),
        graph_write_rate=_number(raw, "graph_write_rate", 0),
        arm_write_rate=_number(raw, "arm_write_rate", 0),
        arm_identity_write_rate=_number(raw, "arm_identity_write_rate", 0),
        retry_backoff_max=_number(raw, "retry_backoff_max", 1),
        deletion_timeout=_number(raw, "deletion_timeout", 0),
        verify_interval=_number(raw, "verify_interval", 1),
        propagation_timeout=_number(raw, "propagation_timeout", 0),
        pod_token_grace=_number(raw, "pod_token_grace", 0),
        sql_user_form=_choice(raw, "sql_user_form", ("sid", "object-id")),
        sql_concurrency=int(_number(raw, "sql_concurrency", 1)),
        sql_lock_timeout=_number(raw, "sql_lock_timeout", 0),
        sql_statement_timeout=_number(raw, "sql_statement_timeout", 1),
        allowed_sql_servers=_sql_servers(raw),
        liveness_endpoint=str(liveness) if liveness is not None else None,
        readiness_endpoint=str(readiness) if readiness is not None else None,
        metrics_port=int(metrics_port),
        metrics_address=metrics_address,
        log_format=_choice(raw, "log_format", ("text", "json")),
        install_crds=Path(str(crds)) if crds is not None else None,
        injection_webhook=injection == "true",
        azure_environment=str(azure_environment) if azure_environment is not None else None,
        require_policy=flags["require_policy"],
        policy_webhook=flags["policy_webhook"],
        workload_webhook=flags["workload_webhook"],
        ca_bundle=Path(str(ca_bundle)) if ca_bundle is not None else None,
    )
