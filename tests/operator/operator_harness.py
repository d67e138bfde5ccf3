"""Helpers for the operator's integration tests (fixtures are in conftest.py): the sandbox world's
principals, the Entra emulator as the tenant admin sees it, the test's namespace through the
Kubernetes API and kubectl, and the environment the operator runs with."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "sqlidentity.io", "v1alpha1", "sqlworkloadidentities"
CRD_FILE = "sqlidentity.io_sqlworkloadidentities.yaml"
POLICY_PLURAL = "sqlidentitypolicies"
POLICY_CRD_FILE = "sqlidentity.io_sqlidentitypolicies.yaml"
POOL_PLURAL = "sqlidentitypools"
POOL_CRD_FILE = "sqlidentity.io_sqlidentitypools.yaml"
AUDIENCE = "api://AzureADTokenExchange"
DRIFT_INTERVAL_S = 2.0


@dataclass(frozen=True)
class Principal:
    name: str
    client_id: str
    object_id: str  # application object id, or the managed identity's resource id
    secret: str | None = None


@dataclass(frozen=True)
class World:
    tenant: str
    subscription: str
    operator: Principal
    admin: Principal
    demo_app: Principal  # SP-AZURESQL-USER
    customer_api: Principal  # an app with no credentials yet
    payroll: Principal  # not owned by the operator
    customer_identity: Principal  # managed identity the operator may write
    finance_identity: Principal  # managed identity it may not


def load_world() -> World:
    from sandbox.entra.state import load_world

    world = load_world(ROOT / "sandbox" / "world.yaml")
    by_name = {p.name: p for p in world.principals}

    def app(name: str) -> Principal:
        p = by_name[name]
        return Principal(
            name, p.client_id, str(p.app_object_id), p.secrets[0] if p.secrets else None
        )

    def identity(name: str) -> Principal:
        p = by_name[name]
        resource_id = (
            f"/subscriptions/{world.subscription_id}/resourceGroups/{p.resource_group}/providers/"
            f"Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
        )
        return Principal(name, p.client_id, resource_id)

    return World(
        tenant=by_name["sql-workload-identity-operator"].tenant_id,
        subscription=world.subscription_id,
        operator=app("sql-workload-identity-operator"),
        admin=app("sandbox-admin"),
        demo_app=app("SP-AZURESQL-USER"),
        customer_api=app("customer-api"),
        payroll=app("payroll-app"),
        customer_identity=identity("customer-api-identity"),
        finance_identity=identity("finance-identity"),
    )


class Entra:
    """The emulator's admin API plus Graph and ARM as the tenant admin (out-of-band changes)."""

    def __init__(self, state_dir: Path, world: World) -> None:
        from sandbox.entra.ctl import AdminClient

        self.admin = AdminClient.from_state_dir(state_dir)
        self.world = world
        self.ca = str(state_dir / "ca.crt")
        self._tokens: dict[str, str] = {}

    def credentials(self, principal: Principal) -> list[dict[str, Any]]:
        state = self.admin.call("GET", "state")
        found = next(p for p in state["principals"] if p["clientId"] == principal.client_id)
        return list(found["credentials"])

    def _token(self, scope: str) -> str:
        if scope not in self._tokens:
            response = requests.post(
                f"{os.environ['AZURE_AUTHORITY_HOST']}/{self.world.tenant}/oauth2/v2.0/token",
                data={
                    "grant_type": "client_credentials",
                    "client_id": self.world.admin.client_id,
                    "client_secret": self.world.admin.secret,
                    "scope": scope,
                },
                verify=self.ca,
                timeout=10,
            )
            response.raise_for_status()
            self._tokens[scope] = response.json()["access_token"]
        return self._tokens[scope]

    def graph(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> requests.Response:
        return requests.request(
            method,
            f"{os.environ['SANDBOX_GRAPH_URL']}{path}",
            json=body,
            headers={
                "Authorization": f"Bearer {self._token('https://graph.microsoft.com/.default')}"
            },
            verify=self.ca,
            timeout=10,
        )

    def arm(self, method: str, path: str, body: dict[str, Any] | None = None) -> requests.Response:
        return requests.request(
            method,
            f"{os.environ['SANDBOX_ARM_URL']}{path}",
            params={"api-version": "2024-11-30"},
            json=body,
            headers={
                "Authorization": f"Bearer {self._token('https://management.azure.com/.default')}"
            },
            verify=self.ca,
            timeout=10,
        )

    def add_app_credential(self, app: Principal, name: str, issuer: str, subject: str) -> None:
        body = {"name": name, "issuer": issuer, "subject": subject, "audiences": [AUDIENCE]}
        response = self.graph(
            "POST", f"/applications/{app.object_id}/federatedIdentityCredentials", body
        )
        assert response.status_code == 201, response.text

    def delete_app_credential(self, app: Principal, name: str) -> None:
        response = self.graph(
            "DELETE", f"/applications/{app.object_id}/federatedIdentityCredentials(name='{name}')"
        )
        assert response.status_code == 204, response.text

    def delete_identity_credential(self, identity: Principal, name: str) -> None:
        response = self.arm("DELETE", f"{identity.object_id}/federatedIdentityCredentials/{name}")
        assert response.status_code in (200, 204), response.text

    def exchange(self, client_id: str, assertion: str) -> requests.Response:
        """The token exchange a workload's azure-identity performs with its projected token."""
        return requests.post(
            f"{os.environ['AZURE_AUTHORITY_HOST']}/{self.world.tenant}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": client_id,
                "scope": "https://database.windows.net/.default",
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": assertion,
            },
            verify=self.ca,
            timeout=10,
        )


class OperatorGraph:
    """Graph as the operator's own app (Application.ReadWrite.OwnedBy): what it creates, it owns."""

    def __init__(self, world: World, entra: Entra) -> None:
        self.ca = entra.ca
        token = requests.post(
            f"{os.environ['AZURE_AUTHORITY_HOST']}/{world.tenant}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": world.operator.client_id,
                "client_secret": world.operator.secret,
                "scope": "https://graph.microsoft.com/.default",
            },
            verify=self.ca,
            timeout=10,
        )
        token.raise_for_status()
        self.headers = {"Authorization": f"Bearer {token.json()['access_token']}"}

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = requests.request(
            method,
            f"{os.environ['SANDBOX_GRAPH_URL']}{path}",
            json=body,
            headers=self.headers,
            verify=self.ca,
            timeout=10,
        )
        assert response.status_code < 300, response.text
        return response.json() if response.content else None

    def app(self, name: str) -> dict[str, Any]:
        made = self.call("POST", "/applications", {"displayName": name})
        self.call("POST", "/servicePrincipals", {"appId": made["appId"]})
        return dict(made)

    def credentials(self, app: dict[str, Any]) -> list[dict[str, Any]]:
        listed = self.call("GET", f"/applications/{app['id']}/federatedIdentityCredentials")
        return list(listed["value"])


def pool_manifest(name: str, client_ids: list[str], **spec: Any) -> dict[str, Any]:
    """A SqlIdentityPool of these app registrations (``spec``: reservedPerMember, growth)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SqlIdentityPool",
        "metadata": {"name": name},
        "spec": {"members": [{"applicationClientId": c} for c in client_ids], **spec},
    }


def operator_environment(sandbox: Any, world: World, namespace: str) -> dict[str, str]:
    """What the operator needs to run against the sandbox (sandbox/launcher.py sets the same)."""
    return {
        "AZURE_TENANT_ID": world.tenant,
        "AZURE_CLIENT_ID": world.operator.client_id,
        "AZURE_CLIENT_SECRET": str(world.operator.secret),
        "AZURE_AUTHORITY_HOST": sandbox.env["AZURE_AUTHORITY_HOST"],
        "SWI_GRAPH_URL": sandbox.env["SANDBOX_GRAPH_URL"],
        "SWI_ARM_URL": sandbox.env["SANDBOX_ARM_URL"],
        "AZURE_SUBSCRIPTION_ID": world.subscription,
        "SWI_CA_BUNDLE": str(sandbox.ca),
        "SWI_NAMESPACES": namespace,
        "SWI_DRIFT_INTERVAL": str(DRIFT_INTERVAL_S),
        "SWI_RETRY_BACKOFF_MAX": "2",
        "SWI_DELETION_TIMEOUT": "30",
        # Identities no SqlIdentityPolicy names are unrestricted here; the guardrail tests
        # (test_policy_*.py) turn requirePolicy on and create the policies they need.
        "SWI_REQUIRE_POLICY": "false",
    }


class Cluster:
    """The test's namespace through the admin's kubernetes client and the sandbox's kubectl."""

    def __init__(self, kube: Any, kubectl: Path, namespace: str) -> None:
        from kubernetes import client

        self.namespace = namespace
        self.kubectl_path = kubectl
        self.custom = client.CustomObjectsApi(kube)
        self.core = client.CoreV1Api(kube)
        self.apps = client.AppsV1Api(kube)

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.kubectl_path), "-n", self.namespace, *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
        )

    def create(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "SqlWorkloadIdentity",
            "metadata": {"name": name},
            "spec": spec,
        }
        created = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, body
        )
        return cast(dict[str, Any], created)

    def get(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            found = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return cast(dict[str, Any], found)

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            name,
            {"spec": spec},
            _content_type="application/merge-patch+json",
        )

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def condition(self, name: str, type_: str = "Ready") -> dict[str, Any] | None:
        body = self.get(name) or {}
        for cond in (body.get("status") or {}).get("conditions") or []:
            if cond.get("type") == type_:
                return dict(cond)
        return None

    def wait_condition(
        self,
        name: str,
        status: str = "True",
        type_: str = "Ready",
        reason: str | None = None,
        timeout: float = 30.0,
        generation: int | None = None,
    ) -> dict[str, Any]:
        """The condition once it has ``status`` (and ``reason``), written for ``generation`` when
        given (a spec change is seen in Entra before the status of its reconcile is written)."""

        def matches() -> dict[str, Any] | None:
            cond = self.condition(name, type_)
            if (
                cond
                and cond["status"] == status
                and (reason is None or cond["reason"] == reason)
                and (generation is None or cond.get("observedGeneration") == generation)
            ):
                return cond
            return None

        found: dict[str, Any] = eventually(
            matches,
            timeout,
            f"{name}: {type_}={status} {reason or ''}"
            + (f" for generation {generation}" if generation else ""),
        )
        return found

    def wait_gone(self, name: str, timeout: float = 30.0) -> None:
        eventually(lambda: self.get(name) is None, timeout, f"{name} deleted")

    def service_account(self, name: str) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.core.read_namespaced_service_account(name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def events(self, name: str) -> list[Any]:
        items = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}"
        ).items
        return list(items)

    def reasons(self, name: str) -> list[str]:
        """What the Events of ``name`` say happened: each reason, and inside an Event that folds
        one pass's changes (swi_operator.events) each change's reason."""
        from swi_operator.events import reasons

        return [r for e in self.events(name) for r in reasons(e.reason, e.message or "")]

    def token(self, service_account: str, audience: str = AUDIENCE) -> str:
        """A real TokenRequest token for the service account, as the kubelet would project it."""
        from kubernetes.client import AuthenticationV1TokenRequest, V1TokenRequestSpec

        request = AuthenticationV1TokenRequest(
            spec=V1TokenRequestSpec(audiences=[audience], expiration_seconds=600)
        )
        made = self.core.create_namespaced_service_account_token(
            service_account, self.namespace, request
        )
        assert made.status is not None
        return str(made.status.token)


def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def delete_all(cluster: Cluster) -> None:
    listed = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL)
    items: list[dict[str, Any]] = cast(dict[str, Any], listed)["items"]
    for item in items:
        cluster.delete(item["metadata"]["name"])
    for item in items:
        cluster.wait_gone(item["metadata"]["name"], timeout=40)
