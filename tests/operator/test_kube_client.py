"""``kube.KubernetesClient`` on its aiohttp session (``kube_http``) against the sandbox's real API
server: answers, the API server's errors as the operator classifies them, and credentials taken
from the official client's configuration at every request (a rotating service-account token)."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client import ApiClient
from swi_operator.errors import PermanentError, Reason, ReconcileError, TransientError
from swi_operator.kube import KubernetesClient


def claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


async def test_reads_writes_and_the_api_servers_errors(kube: ApiClient, namespace: str) -> None:
    client = KubernetesClient(kube)
    try:
        assert await client.get_service_account(namespace, "app") is None  # 404: None
        await client.create_service_account(namespace, "app", {"example.com/a": "1"})
        account = await client.get_service_account(namespace, "app")
        assert account is not None and account.annotations == {"example.com/a": "1"}
        assert account.resource_version

        await client.patch_service_account(namespace, "app", {"example.com/a": None, "b": "2"})
        again = await client.get_service_account(namespace, "app")
        assert again is not None and again.annotations == {"b": "2"}

        # A patch made from a stale view: the API server's 409, retried soon.
        with pytest.raises(TransientError) as stale:
            await client.patch_service_account(
                namespace, "app", {"c": "3"}, resource_version=account.resource_version
            )
        assert stale.value.status == 409 and stale.value.delay == 1.0
        assert "annotate service account" in stale.value.message

        # An invalid name: the API server's 422 with its own message, not retried.
        with pytest.raises(PermanentError) as invalid:
            await client.create_service_account(namespace, "Not_Valid", {})
        assert invalid.value.reason is Reason.KUBERNETES_REJECTED
        assert "Not_Valid" in invalid.value.message and "422" not in invalid.value.message

        token = await client.request_token(namespace, "app", "api://AzureADTokenExchange", 600)
        assert claims(token)["sub"] == f"system:serviceaccount:{namespace}:app"

        await client.patch_config_map(namespace, "ledger", {"k": "v"})  # created when missing
        await client.patch_config_map(namespace, "ledger", {"k": None, "l": "w"})
        assert await client.read_config_map(namespace, "ledger") == {"l": "w"}
    finally:
        await client.close()


async def test_a_bearer_token_is_read_from_the_configuration_at_every_request(
    kube: ApiClient, namespace: str
) -> None:
    """In a pod the client's configuration refreshes the service-account token as the kubelet
    rotates it; the session must send the token the configuration has now."""
    k8s.CoreV1Api(kube).create_namespaced_service_account(
        namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="reader"))
    )
    k8s.RbacAuthorizationV1Api(kube).create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "reader"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "view",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    made = k8s.CoreV1Api(kube).create_namespaced_service_account_token(
        "reader", namespace, k8s.AuthenticationV1TokenRequest(spec={"expirationSeconds": 600})
    )  # for the API server's own audiences
    token = made.status.token

    configuration = copy.copy(kube.configuration)
    configuration.cert_file = configuration.key_file = None  # only the token authenticates
    configuration.api_key = {"authorization": "Bearer not-a-token"}
    refreshed: list[int] = []

    def refresh(config: k8s.Configuration) -> None:
        refreshed.append(1)
        if len(refreshed) > 1:  # the first request still has the old (invalid) token
            config.api_key = {"authorization": f"Bearer {token}"}

    configuration.refresh_api_key_hook = refresh
    reader = KubernetesClient(ApiClient(configuration))
    try:
        with pytest.raises(ReconcileError) as refused:
            await reader.get_service_account(namespace, "reader")
        assert refused.value.status == 401
        account = await reader.get_service_account(namespace, "reader")
        assert account is not None and account.name == "reader"
        with pytest.raises(PermanentError) as forbidden:  # "view" cannot write
            await reader.create_service_account(namespace, "other", {})
        assert forbidden.value.reason is Reason.PERMISSION_DENIED
        assert len(refreshed) == 3
    finally:
        await reader.close()
