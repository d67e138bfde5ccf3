"""Workload identity pod injection: a pod and its service account in, a JSONPatch out.

On AKS the workload identity add-on mutates every new pod labelled
``azure.workload.identity/use: "true"``. Clusters without it get the same injection from the
operator's optional webhook (``webhooks``), and this module decides what that injection is. It is
pure: no I/O, no kopf; the webhook fetches the service account and applies the patch.

The contract is the add-on's, read from azure-workload-identity v1.6.0 (``pkg/webhook/consts.go``
and ``webhook.go``), so a pod behaves the same on AKS and elsewhere:

* every container and init container not named in the pod annotation
  ``azure.workload.identity/skip-containers`` (``;``-separated) gets the environment variables
  ``AZURE_CLIENT_ID`` (service account annotation ``azure.workload.identity/client-id``),
  ``AZURE_TENANT_ID`` (annotation ``.../tenant-id``, else the cluster's tenant),
  ``AZURE_FEDERATED_TOKEN_FILE`` and ``AZURE_AUTHORITY_HOST``, each only when the container does
  not set it already (by name, whether by value or ``valueFrom``) and only when it is not empty;
* and a read-only mount of the volume ``azure-workload-identity-reserved-<sha256 of the pod name>``
  (truncated to 63 characters; the pod name is ``generateName + " (prefix)"`` while the API server
  has not named the pod yet, as for every pod a controller creates) at
  ``/var/run/secrets/azure/wi``;
* the pod gets that volume: a projected service-account token for the audience
  ``api://AzureADTokenExchange`` at ``token/azure-identity-token``, valid for the seconds in the
  annotation ``azure.workload.identity/service-account-token-expiration`` of the pod, else of the
  service account, else 3600; a value outside 3600-86400 or not an integer rejects the pod.

Where this module deliberately differs from the add-on (docs/deploy.md says why):

* a pod whose service account has no client-id annotation is left untouched (the add-on would
  still add the volume and the tenant and authority variables);
* the patch is idempotent: a pod that already carries the injection yields an empty patch, and a
  reserved volume that is already there (the pod was named between two invocations) is reused
  rather than doubled;
* a container that already mounts something at ``/var/run/secrets/azure/wi`` keeps its mount.

The patch only adds (and, for a reserved volume or mount that differs from what it should be,
replaces), so fields the operator's client library does not know survive untouched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

USE_LABEL = "azure.workload.identity/use"
CLIENT_ID_ANNOTATION = "azure.workload.identity/client-id"
TENANT_ID_ANNOTATION = "azure.workload.identity/tenant-id"
TOKEN_EXPIRATION_ANNOTATION = "azure.workload.identity/service-account-token-expiration"  # noqa: S105
SKIP_CONTAINERS_ANNOTATION = "azure.workload.identity/skip-containers"

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

MIN_TOKEN_EXPIRATION_S = 3600
MAX_TOKEN_EXPIRATION_S = 86400
DEFAULT_TOKEN_EXPIRATION_S = 3600

_MAX_VOLUME_NAME = 63

JsonPatchOp = dict[str, Any]


class InjectionError(ValueError):
    """The pod or its service account asks for something invalid; the pod must be rejected."""


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
    None when it does not exist. Raises ``InjectionError`` for an invalid expiration annotation.
    """
    if not wants_injection(pod) or service_account is None:
        return []
    if not _meta(service_account, "annotations").get(CLIENT_ID_ANNOTATION):
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
