"""Workload identity pod injection: a pod and its service account in, a JSONPatch out.

On AKS the workload identity add-on mutates every new pod labelled
``azure.workload.identity/use: "true"``. Clusters without it get the same injection from the
operator's optional webhook (``webhooks``), and this module decides what that injection is. It is
pure: no I/O, no kopf; the webhook finds the service account and applies the patch.

The contract is the add-on's, read from azure-workload-identity v1.6.0 (``pkg/webhook/consts.go``,
``webhook.go`` and ``pkg/config/config.go``), so a pod behaves the same on AKS and elsewhere:

* every container and init container not named in the pod annotation
  ``azure.workload.identity/skip-containers`` (``;``-separated) gets the environment variables
  ``AZURE_CLIENT_ID`` (service account annotation ``azure.workload.identity/client-id``),
  ``AZURE_TENANT_ID`` (annotation ``.../tenant-id``, else the cluster's tenant),
  ``AZURE_FEDERATED_TOKEN_FILE`` and ``AZURE_AUTHORITY_HOST``, each only when the container does
  not set it already (by name, whether by value or ``valueFrom``) and only when it is not empty:
  a service account without the client-id annotation still gets the other three, the volume and
  the mount (an app that picks its client id itself works);
* ``AZURE_AUTHORITY_HOST`` is the Entra endpoint of the cloud named by ``AZURE_ENVIRONMENT``
  (``AzurePublicCloud``, the default, ``AzureChinaCloud``, ``AzureUSGovernmentCloud``,
  ``AzureGermanCloud``, any case; ``AzureStackCloud`` reads ``activeDirectoryEndpoint`` from the
  JSON file ``AZURE_ENVIRONMENT_FILEPATH``), as go-autorest's ``EnvironmentFromName`` maps them for
  the add-on; ``authority_host_from_env`` also takes an explicit URL (below);
* and a read-only mount of the volume ``azure-workload-identity-reserved-<sha256 of the pod name>``
  (truncated to 63 characters; the pod name is ``generateName + " (prefix)"`` while the API server
  has not named the pod yet, as for every pod a controller creates) at
  ``/var/run/secrets/azure/wi``;
* the pod gets that volume: a projected service-account token for the audience
  ``api://AzureADTokenExchange`` at ``token/azure-identity-token``, valid for the seconds in the
  annotation ``azure.workload.identity/service-account-token-expiration`` of the pod, else of the
  service account, else 3600; a value outside 3600-86400 or not an integer rejects the pod.

Where this module deliberately differs from the add-on (docs/deploy.md says why):

* the pod annotation ``azure.workload.identity/inject-proxy-sidecar`` (the add-on's IMDS proxy:
  a privileged init container and a sidecar) rejects the pod, with the fix in the message, instead
  of being silently ignored; ``azure.workload.identity/proxy-sidecar-port`` alone does nothing on
  the add-on either, and admits the pod with an admission warning (``admission_warnings``);
* a service account that does not exist leaves the pod untouched (the add-on rejects it; the API
  server refuses such a pod anyway);
* the patch is idempotent: a pod that already carries the injection yields an empty patch, and a
  reserved volume that is already there (the pod was named between two invocations) is reused
  rather than doubled;
* a container that already mounts something at ``/var/run/secrets/azure/wi`` keeps its mount;
* an empty tenant-id annotation means the cluster's tenant (the add-on injects no tenant then).

The patch only adds (and, for a reserved volume or mount that differs from what it should be,
replaces), so fields the operator's client library does not know survive untouched.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

USE_LABEL = "azure.workload.identity/use"
CLIENT_ID_ANNOTATION = "azure.workload.identity/client-id"
TENANT_ID_ANNOTATION = "azure.workload.identity/tenant-id"
TOKEN_EXPIRATION_ANNOTATION = "azure.workload.identity/service-account-token-expiration"  # noqa: S105
SKIP_CONTAINERS_ANNOTATION = "azure.workload.identity/skip-containers"
INJECT_PROXY_SIDECAR_ANNOTATION = "azure.workload.identity/inject-proxy-sidecar"
PROXY_SIDECAR_PORT_ANNOTATION = "azure.workload.identity/proxy-sidecar-port"
# Every annotation of the add-on's starts so; the webhook's live read keeps only these.
ANNOTATION_PREFIX = "azure.workload.identity/"

CLIENT_ID_ENV = "AZURE_CLIENT_ID"
TENANT_ID_ENV = "AZURE_TENANT_ID"
TOKEN_FILE_ENV = "AZURE_FEDERATED_TOKEN_FILE"  # noqa: S105
AUTHORITY_HOST_ENV = "AZURE_AUTHORITY_HOST"

VOLUME_NAME_PREFIX = "azure-workload-identity-reserved-"
MOUNT_PATH = "/var/run/secrets/azure/wi"
TOKEN_PATH = "token/azure-identity-token"  # noqa: S105
TOKEN_FILE = f"{MOUNT_PATH}/{TOKEN_PATH}"
DEFAULT_AUDIENCE = "api://AzureADTokenExchange"
# What the add-on injects on Azure's public cloud (go-autorest's ActiveDirectoryEndpoint).
PUBLIC_AUTHORITY_HOST = "https://login.microsoftonline.com/"

# The add-on's cloud setting (its ConfigMap's AZURE_ENVIRONMENT, default AzurePublicCloud) and the
# ActiveDirectoryEndpoint go-autorest's EnvironmentFromName gives each name (compared upper-case).
AZURE_ENVIRONMENT_ENV = "AZURE_ENVIRONMENT"
AZURE_ENVIRONMENT_FILEPATH_ENV = "AZURE_ENVIRONMENT_FILEPATH"
AZURE_STACK_CLOUD = "AzureStackCloud"
CLOUD_AUTHORITY_HOSTS = {
    "AzurePublicCloud": PUBLIC_AUTHORITY_HOST,
    "AzureChinaCloud": "https://login.chinacloudapi.cn/",
    "AzureUSGovernmentCloud": "https://login.microsoftonline.us/",
    "AzureGermanCloud": "https://login.microsoftonline.de/",
}
# An explicit injected AZURE_AUTHORITY_HOST (the emulator, a private cloud) beats the cloud name.
AUTHORITY_HOST_SETTING = "SWI_INJECTION_AUTHORITY_HOST"

MIN_TOKEN_EXPIRATION_S = 3600
MAX_TOKEN_EXPIRATION_S = 86400
DEFAULT_TOKEN_EXPIRATION_S = 3600

_MAX_VOLUME_NAME = 63

JsonPatchOp = dict[str, Any]


class InjectionError(ValueError):
    """The pod or its service account asks for something invalid; the pod must be rejected."""


class InjectionConfigError(ValueError):
    """A cluster-wide injection setting is invalid; the message names the variable and the fix."""


def authority_host_for_cloud(name: str, environ: Mapping[str, str]) -> str:
    """The injected ``AZURE_AUTHORITY_HOST`` for the cloud ``name`` (``AZURE_ENVIRONMENT``)."""
    wanted = name.strip()
    if wanted.upper() == AZURE_STACK_CLOUD.upper():
        return _stack_authority_host(environ.get(AZURE_ENVIRONMENT_FILEPATH_ENV, "").strip())
    for cloud, host in CLOUD_AUTHORITY_HOSTS.items():
        if cloud.upper() == wanted.upper():
            return host
    raise InjectionConfigError(
        f"{AZURE_ENVIRONMENT_ENV}={name!r} names no Azure cloud: expected one of "
        f"{', '.join([*CLOUD_AUTHORITY_HOSTS, AZURE_STACK_CLOUD])} (any case), or set "
        f"{AUTHORITY_HOST_SETTING} to the authority URL itself"
    )


def _stack_authority_host(path: str) -> str:
    where = f"{AZURE_ENVIRONMENT_ENV}={AZURE_STACK_CLOUD} reads {AZURE_ENVIRONMENT_FILEPATH_ENV}"
    if not path:
        raise InjectionConfigError(
            f"{where}, which is not set: point it at the Azure Stack environment JSON file, or set "
            f"{AUTHORITY_HOST_SETTING} instead"
        )
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except (OSError, ValueError) as exc:
        raise InjectionConfigError(f"{where}={path!r}, which cannot be read: {exc}") from None
    host = document.get("activeDirectoryEndpoint") if isinstance(document, Mapping) else None
    if not isinstance(host, str) or not host.startswith("https://"):
        raise InjectionConfigError(
            f"{where}={path!r}: its activeDirectoryEndpoint must be an https:// URL, got {host!r}"
        )
    return host


def authority_host_from_env(environ: Mapping[str, str]) -> str:
    """The injected ``AZURE_AUTHORITY_HOST``: ``SWI_INJECTION_AUTHORITY_HOST`` if set, else the
    cloud ``AZURE_ENVIRONMENT`` names (the add-on's setting), else the operator's own
    ``AZURE_AUTHORITY_HOST``, else Azure's public cloud."""

    def get(name: str) -> str:
        return environ.get(name, "").strip()

    if get(AUTHORITY_HOST_SETTING):
        authority, source = get(AUTHORITY_HOST_SETTING), AUTHORITY_HOST_SETTING
    elif get(AZURE_ENVIRONMENT_ENV):
        return authority_host_for_cloud(get(AZURE_ENVIRONMENT_ENV), environ)
    else:
        authority = get(AUTHORITY_HOST_ENV) or PUBLIC_AUTHORITY_HOST
        source = AUTHORITY_HOST_ENV
    if not authority.startswith("https://"):
        raise InjectionConfigError(f"{source} must be an https:// URL, got {authority!r}")
    return authority


@dataclass(frozen=True)
class InjectionSettings:
    """Cluster-wide values: what the add-on takes from its own configuration."""

    authority_host: str = PUBLIC_AUTHORITY_HOST
    audience: str = DEFAULT_AUDIENCE
    # AZURE_TENANT_ID for service accounts without the tenant-id annotation.
    default_tenant_id: str | None = None


def _meta(obj: Mapping[str, Any], key: str) -> Mapping[str, str]:
    value = (obj.get("metadata") or {}).get(key) or {}
    return value if isinstance(value, Mapping) else {}


def wants_injection(pod: Mapping[str, Any]) -> bool:
    """The pod opted in with the label (the webhook configuration's objectSelector says so too)."""
    return _meta(pod, "labels").get(USE_LABEL) == "true"


def service_account_name(pod: Mapping[str, Any]) -> str:
    """The pod's service account; an unset one means ``default``, as the API server decides."""
    return str((pod.get("spec") or {}).get("serviceAccountName") or "default")


def pod_name(pod: Mapping[str, Any]) -> str:
    """The name the volume hash is taken of, exactly as the add-on spells it."""
    metadata = pod.get("metadata") or {}
    return str(metadata.get("name") or f"{metadata.get('generateName') or ''} (prefix)")


def volume_name(pod: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(pod_name(pod).encode()).hexdigest()
    return VOLUME_NAME_PREFIX + digest[: _MAX_VOLUME_NAME - len(VOLUME_NAME_PREFIX)]


def refuse_proxy_sidecar(pod: Mapping[str, Any]) -> None:
    """The add-on's IMDS proxy sidecar is not something this webhook injects: say so, with the fix.

    The add-on injects it whenever the annotation is present, whatever its value, so any value is
    refused here: admitting the pod would start an app that waits for a proxy that never comes.
    """
    annotations = _meta(pod, "annotations")
    if INJECT_PROXY_SIDECAR_ANNOTATION in annotations:
        raise InjectionError(
            f"pod annotation {INJECT_PROXY_SIDECAR_ANNOTATION}="
            f"{annotations[INJECT_PROXY_SIDECAR_ANNOTATION]!r} asks for azure-workload-identity's "
            "proxy sidecar, which this webhook does not inject (azure-workload-identity injects it "
            "whatever the value): remove the annotation and let the app read "
            f"{TOKEN_FILE_ENV} (every current Azure Identity library does), or run the pod on a "
            "cluster with the AKS workload identity add-on"
        )


def admission_warnings(pod: Mapping[str, Any]) -> list[str]:
    """What the API server should tell whoever created the pod (admitted anyway)."""
    annotations = _meta(pod, "annotations")
    found = []
    if (
        PROXY_SIDECAR_PORT_ANNOTATION in annotations
        and INJECT_PROXY_SIDECAR_ANNOTATION not in annotations
    ):
        found.append(
            f"pod annotation {PROXY_SIDECAR_PORT_ANNOTATION} has no effect: no proxy sidecar is "
            f"injected (without {INJECT_PROXY_SIDECAR_ANNOTATION} azure-workload-identity ignores "
            "it too, and this webhook never injects the proxy); remove it"
        )
    return found


def skip_containers(pod: Mapping[str, Any]) -> frozenset[str]:
    raw = _meta(pod, "annotations").get(SKIP_CONTAINERS_ANNOTATION) or ""
    return frozenset(name.strip() for name in raw.split(";") if name.strip())


def token_expiration(pod: Mapping[str, Any], service_account: Mapping[str, Any]) -> int:
    """Seconds from the pod's annotation, else the service account's, else the default."""
    for owner, owner_annotations in (
        ("pod", _meta(pod, "annotations")),
        ("service account", _meta(service_account, "annotations")),
    ):
        raw = owner_annotations.get(TOKEN_EXPIRATION_ANNOTATION)
        if not raw:
            continue
        try:
            seconds = int(raw, 10)
        except ValueError:
            raise InjectionError(
                f"{owner} annotation {TOKEN_EXPIRATION_ANNOTATION}={raw!r} is not a number of "
                "seconds"
            ) from None
        if not MIN_TOKEN_EXPIRATION_S <= seconds <= MAX_TOKEN_EXPIRATION_S:
            raise InjectionError(
                f"{owner} annotation {TOKEN_EXPIRATION_ANNOTATION}={seconds} is out of range: "
                f"expected {MIN_TOKEN_EXPIRATION_S} to {MAX_TOKEN_EXPIRATION_S}"
            )
        return seconds
    return DEFAULT_TOKEN_EXPIRATION_S


def desired_env(
    service_account: Mapping[str, Any], settings: InjectionSettings
) -> list[dict[str, str]]:
    """The variables the add-on injects, in its order, without the empty ones."""
    annotations = _meta(service_account, "annotations")
    values = (
        (CLIENT_ID_ENV, annotations.get(CLIENT_ID_ANNOTATION)),
        (TENANT_ID_ENV, annotations.get(TENANT_ID_ANNOTATION) or settings.default_tenant_id),
        (TOKEN_FILE_ENV, TOKEN_FILE),
        (AUTHORITY_HOST_ENV, settings.authority_host),
    )
    return [{"name": name, "value": value} for name, value in values if value]


def token_volume(name: str, expiration: int, audience: str) -> dict[str, Any]:
    return {
        "name": name,
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "path": TOKEN_PATH,
                        "expirationSeconds": expiration,
                        "audience": audience,
                    }
                }
            ]
        },
    }


def token_mount(name: str) -> dict[str, Any]:
    return {"name": name, "mountPath": MOUNT_PATH, "readOnly": True}


def _covers(current: Any, desired: Any) -> bool:
    """Whether ``current`` says everything ``desired`` says; API defaults may add fields to it."""
    if isinstance(desired, Mapping):
        return isinstance(current, Mapping) and all(
            _covers(current.get(key), value) for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(current, list)
            and len(current) == len(desired)
            and all(_covers(c, d) for c, d in zip(current, desired, strict=True))
        )
    return bool(current == desired)


def _list_ops(
    path: str, current: Sequence[Any] | None, additions: Iterable[Any]
) -> list[JsonPatchOp]:
    """Append ``additions`` to the list at ``path``, creating it when the pod has none."""
    items = list(additions)
    if not items:
        return []
    if current is None:
        return [{"op": "add", "path": path, "value": items}]
    return [{"op": "add", "path": f"{path}/-", "value": item} for item in items]


def _container_ops(
    path: str,
    container: Mapping[str, Any],
    env: Sequence[Mapping[str, str]],
    mount: Mapping[str, Any],
) -> list[JsonPatchOp]:
    present = {item.get("name") for item in container.get("env") or ()}
    ops = _list_ops(
        f"{path}/env", container.get("env"), (e for e in env if e["name"] not in present)
    )

    mounts: list[Mapping[str, Any]] = list(container.get("volumeMounts") or ())
    ours = next((i for i, m in enumerate(mounts) if m.get("name") == mount["name"]), None)
    if ours is not None:
        if not _covers(mounts[ours], mount):
            ops.append({"op": "replace", "path": f"{path}/volumeMounts/{ours}", "value": mount})
    elif not any(m.get("mountPath") == MOUNT_PATH for m in mounts):
        ops += _list_ops(f"{path}/volumeMounts", container.get("volumeMounts"), [mount])
    return ops


def plan(
    pod: Mapping[str, Any],
    service_account: Mapping[str, Any] | None,
    settings: InjectionSettings,
) -> list[JsonPatchOp]:
    """The JSONPatch (RFC 6902) that injects workload identity into ``pod``; ``[]`` if none.

    ``service_account`` is the pod's (``service_account_name``) as read from the API server, or
    None when it does not exist; one without the client-id annotation gets everything but
    ``AZURE_CLIENT_ID``. Raises ``InjectionError`` for an invalid expiration annotation or the
    proxy sidecar annotation.
    """
    if not wants_injection(pod):
        return []
    refuse_proxy_sidecar(pod)
    if service_account is None:
        return []
    expiration = token_expiration(pod, service_account)
    spec: Mapping[str, Any] = pod.get("spec") or {}
    volumes: list[Mapping[str, Any]] = list(spec.get("volumes") or ())

    # A reserved volume already there (a second invocation) keeps its name: the mounts point at it.
    existing = next(
        (i for i, v in enumerate(volumes) if str(v.get("name", "")).startswith(VOLUME_NAME_PREFIX)),
        None,
    )
    name = str(volumes[existing]["name"]) if existing is not None else volume_name(pod)
    env = desired_env(service_account, settings)
    mount = token_mount(name)
    skipped = skip_containers(pod)

    ops: list[JsonPatchOp] = []
    for field in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(field) or ()):
            if container.get("name") in skipped:
                continue
            ops += _container_ops(f"/spec/{field}/{index}", container, env, mount)

    volume = token_volume(name, expiration, settings.audience)
    if existing is None:
        ops += _list_ops("/spec/volumes", spec.get("volumes"), [volume])
    elif not _covers(volumes[existing], volume):
        ops.append({"op": "replace", "path": f"/spec/volumes/{existing}", "value": volume})
    return ops
