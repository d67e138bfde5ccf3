"""The sandbox control plane is a real Kubernetes API server: tokens, controllers, RBAC, CRDs."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any

import jwt
import pytest
import requests
from kubernetes import client
from kubernetes.client.exceptions import ApiException

AUDIENCE = "api://AzureADTokenExchange"


def _wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def test_token_request_verifies_against_anonymous_discovery(sandbox, kube, namespace):
    core = client.CoreV1Api(kube)
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="reader"))
    )
    token = core.create_namespaced_service_account_token(
        "reader",
        namespace,
        client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[AUDIENCE], expiration_seconds=3600)
        ),
    ).status.token

    # Discovery and keys are fetched the way Entra does: anonymously, trusting only the sandbox CA.
    session = requests.Session()
    session.trust_env = False
    discovery = session.get(
        f"{sandbox.issuer}/.well-known/openid-configuration", verify=str(sandbox.ca), timeout=10
    )
    assert discovery.status_code == 200, discovery.text
    doc = discovery.json()
    assert doc["issuer"] == sandbox.issuer
    assert "RS256" in doc["id_token_signing_alg_values_supported"]
    jwks = session.get(doc["jwks_uri"], verify=str(sandbox.ca), timeout=10)
    assert jwks.status_code == 200, jwks.text

    kid = jwt.get_unverified_header(token)["kid"]
    keys = {k["kid"]: k for k in jwks.json()["keys"]}
    assert kid in keys
    claims = jwt.decode(
        token,
        key=jwt.PyJWK(keys[kid]).key,
        algorithms=["RS256"],
        audience=AUDIENCE,
        issuer=sandbox.issuer,
        options={"require": ["exp", "iat", "nbf", "sub", "iss", "aud"]},
    )
    assert claims["sub"] == f"system:serviceaccount:{namespace}:reader"
    assert claims["aud"] == [AUDIENCE]
    assert 3000 < claims["exp"] - time.time() <= 3600

    # A token for another audience must not verify as ours.
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(token, key=jwt.PyJWK(keys[kid]).key, algorithms=["RS256"], audience="other")


def test_deployment_gets_replicaset_and_pods_and_namespace_deletion_finishes(kube):
    core = client.CoreV1Api(kube)
    apps = client.AppsV1Api(kube)
    ns = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    labels = {"app": "web"}
    apps.create_namespaced_deployment(
        ns,
        client.V1Deployment(
            metadata=client.V1ObjectMeta(name="web"),
            spec=client.V1DeploymentSpec(
                replicas=2,
                selector=client.V1LabelSelector(match_labels=labels),
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels=labels),
                    spec=client.V1PodSpec(
                        containers=[client.V1Container(name="web", image="example/web:1")]
                    ),
                ),
            ),
        ),
    )
    _wait_for("a ReplicaSet", lambda: apps.list_namespaced_replica_set(ns).items)
    pods = _wait_for(
        "two pods",
        lambda: len(core.list_namespaced_pod(ns).items) == 2 and core.list_namespaced_pod(ns).items,
    )
    # Pods were created by the controller-manager from the ReplicaSet: owner references prove it.
    assert all(p.metadata.owner_references[0].kind == "ReplicaSet" for p in pods)

    core.delete_namespace(ns)

    def gone() -> bool:
        try:
            core.read_namespace(ns)
        except ApiException as exc:
            return exc.status == 404
        return False

    _wait_for("the namespace to be deleted", gone, timeout=90)


def test_rbac_refuses_a_user_without_bindings(kube, namespace):
    core = client.CoreV1Api(kube)
    with pytest.raises(ApiException) as refused:
        core.list_namespaced_pod(namespace, _headers={"Impersonate-User": "nobody@example.com"})
    assert refused.value.status == 403
    assert "nobody@example.com" in refused.value.body
    # The admin identity the sandbox hands out still can.
    core.list_namespaced_pod(namespace)


TEST_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.sandbox-test.sqlidentity.io"},
    "spec": {
        "group": "sandbox-test.sqlidentity.io",
        "scope": "Namespaced",
        "names": {
            "plural": "widgets",
            "singular": "widget",
            "kind": "Widget",
            "shortNames": ["wdg"],
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Colour", "type": "string", "jsonPath": ".spec.colour"},
                    {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
                ],
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["colour"],
                                "properties": {
                                    "colour": {"type": "string", "enum": ["red", "blue"]}
                                },
                            },
                            "status": {
                                "type": "object",
                                "properties": {"ready": {"type": "string"}},
                            },
                        },
                    }
                },
            }
        ],
    },
}


def test_crd_with_schema_status_and_printer_columns(sandbox, kube, namespace):
    ext = client.ApiextensionsV1Api(kube)
    try:
        ext.create_custom_resource_definition(TEST_CRD)
    except ApiException as exc:
        if exc.status != 409:
            raise

    def established() -> bool:
        crd = ext.read_custom_resource_definition(TEST_CRD["metadata"]["name"])
        return any(
            c.type == "Established" and c.status == "True" for c in crd.status.conditions or []
        )

    _wait_for("the CRD to be established", established)
    custom = client.CustomObjectsApi(kube)
    group, version, plural = "sandbox-test.sqlidentity.io", "v1", "widgets"
    body = {
        "apiVersion": f"{group}/{version}",
        "kind": "Widget",
        "metadata": {"name": "w1"},
        "spec": {"colour": "red"},
    }
    _wait_for(
        "the widgets endpoint",
        lambda: _try_create(custom, group, version, namespace, plural, body),
        timeout=30,
    )
    # The schema is enforced by the API server.
    with pytest.raises(ApiException) as invalid:
        custom.create_namespaced_custom_object(
            group,
            version,
            namespace,
            plural,
            {**body, "metadata": {"name": "w2"}, "spec": {"colour": "green"}},
        )
    assert invalid.value.status == 422
    assert "spec.colour" in invalid.value.body
    # Status is a subresource: a main-resource update does not change it, the status one does.
    custom.patch_namespaced_custom_object_status(
        group, version, namespace, plural, "w1", {"status": {"ready": "True"}}
    )
    shown = subprocess.run(
        [str(sandbox.kubectl), "--kubeconfig", sandbox.kubeconfig, "get", "wdg", "-n", namespace],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert shown[0].split() == ["NAME", "COLOUR", "READY"]
    assert shown[1].split() == ["w1", "red", "True"]


def _try_create(custom, group, version, namespace, plural, body) -> bool:  # type: ignore[no-untyped-def]
    try:
        custom.create_namespaced_custom_object(group, version, namespace, plural, body)
    except ApiException as exc:
        if exc.status == 404:  # discovery of the new resource not yet served
            return False
        raise
    return True
