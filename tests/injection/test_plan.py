"""``injection.plan`` without a cluster: what goes into a pod, and what never does.

Patches are applied with the independent ``jsonpatch`` library, so every test also proves the
operations are valid RFC 6902 against the pod they were planned for.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from swi_operator.injection import (
    CLIENT_ID_ANNOTATION,
    INJECT_PROXY_SIDECAR_ANNOTATION,
    MOUNT_PATH,
    PROXY_SIDECAR_PORT_ANNOTATION,
    SKIP_CONTAINERS_ANNOTATION,
    TENANT_ID_ANNOTATION,
    TOKEN_EXPIRATION_ANNOTATION,
    TOKEN_FILE,
    USE_LABEL,
    VOLUME_NAME_PREFIX,
    InjectionConfigError,
    InjectionError,
    InjectionSettings,
    admission_warnings,
    authority_host_for_cloud,
    authority_host_from_env,
    plan,
    volume_name,
)

CLIENT_ID = "5e0c1d9a-7b3f-4c2e-9a1d-000000000002"
TENANT_ID = "8a1f3c2e-5b7d-4e90-a1c3-0f2e4d6b8a10"
SETTINGS = InjectionSettings(
    authority_host="https://login.microsoftonline.com/", default_tenant_id=TENANT_ID
)
INJECTED = (
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_AUTHORITY_HOST",
)


def make_pod(
    *containers: dict[str, Any],
    init: tuple[dict[str, Any], ...] = (),
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    name: str | None = None,
    volumes: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "namespace": "workload-demo",
        "labels": {USE_LABEL: "true"} if labels is None else labels,
    }
    if name:
        metadata["name"] = name
    else:
        metadata["generateName"] = "customer-api-5d9c7b-"
    if annotations:
        metadata["annotations"] = annotations
    spec: dict[str, Any] = {
        "serviceAccountName": "customer-reader",
        "containers": list(containers) or [{"name": "app", "image": "app:1"}],
    }
    if init:
        spec["initContainers"] = list(init)
    if volumes is not None:
        spec["volumes"] = volumes
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def make_sa(**annotations: str) -> dict[str, Any]:
    base = {CLIENT_ID_ANNOTATION: CLIENT_ID}
    base.update({k.replace("_", "-"): v for k, v in annotations.items()})
    return {"metadata": {"name": "customer-reader", "annotations": base}}


def inject(pod: dict[str, Any], sa: dict[str, Any] | None, s: InjectionSettings = SETTINGS):
    ops = plan(pod, sa, s)
    return ops, jsonpatch.apply_patch(copy.deepcopy(pod), ops)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "<valueFrom>") for e in container.get("env", [])}


def test_every_container_gets_env_mount_and_the_pod_a_token_volume() -> None:
    pod = make_pod({"name": "app", "image": "app:1"}, {"name": "sidecar", "image": "proxy:1"})
    _, out = inject(pod, make_sa())
    name = volume_name(pod)
    for container in out["spec"]["containers"]:
        assert env_of(container) == {
            "AZURE_CLIENT_ID": CLIENT_ID,
            "AZURE_TENANT_ID": TENANT_ID,
            "AZURE_FEDERATED_TOKEN_FILE": "/var/run/secrets/azure/wi/token/azure-identity-token",
            "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.com/",
        }
        assert container["volumeMounts"] == [
            {"name": name, "mountPath": "/var/run/secrets/azure/wi", "readOnly": True}
        ]
    assert out["spec"]["volumes"] == [
        {
            "name": name,
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "path": "token/azure-identity-token",
                            "expirationSeconds": 3600,
                            "audience": "api://AzureADTokenExchange",
                        }
                    }
                ]
            },
        }
    ]


def test_volume_name_is_the_add_ons_hash_of_the_pod_name() -> None:
    unnamed = make_pod()
    expected = hashlib.sha256(b"customer-api-5d9c7b- (prefix)").hexdigest()
    assert volume_name(unnamed) == (VOLUME_NAME_PREFIX + expected)[:63]
    named = make_pod(name="customer-api-0")
    assert (
        volume_name(named)
        == (VOLUME_NAME_PREFIX + hashlib.sha256(b"customer-api-0").hexdigest())[:63]
    )
    assert len(volume_name(named)) == 63


def test_init_containers_are_injected_too() -> None:
    pod = make_pod(init=({"name": "migrate", "image": "migrate:1"},))
    _, out = inject(pod, make_sa())
    assert set(env_of(out["spec"]["initContainers"][0])) == set(INJECTED)
    assert out["spec"]["initContainers"][0]["volumeMounts"][0]["mountPath"] == MOUNT_PATH


def test_skip_containers_are_left_alone() -> None:
    pod = make_pod(
        {"name": "app", "image": "app:1"},
        {"name": "istio-proxy", "image": "proxy:1"},
        init=({"name": "istio-init", "image": "proxy:1"},),
        annotations={SKIP_CONTAINERS_ANNOTATION: "istio-proxy; istio-init"},
    )
    _, out = inject(pod, make_sa())
    assert "env" not in out["spec"]["containers"][1]
    assert "volumeMounts" not in out["spec"]["containers"][1]
    assert "env" not in out["spec"]["initContainers"][0]
    assert set(env_of(out["spec"]["containers"][0])) == set(INJECTED)


def test_env_the_pod_sets_wins() -> None:
    own = [
        {"name": "AZURE_CLIENT_ID", "value": "mine"},
        {"name": "AZURE_TENANT_ID", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "t"}}},
        {"name": "OTHER", "value": "x"},
    ]
    pod = make_pod({"name": "app", "image": "app:1", "env": copy.deepcopy(own)})
    _, out = inject(pod, make_sa())
    env = out["spec"]["containers"][0]["env"]
    assert env[:3] == own  # untouched, in place
    assert [e["name"] for e in env[3:]] == ["AZURE_FEDERATED_TOKEN_FILE", "AZURE_AUTHORITY_HOST"]


def test_tenant_annotation_beats_the_cluster_tenant() -> None:
    other = "2c4e6a8b-1d3f-4a5b-9c7d-e1f2a3b4c5d6"
    _, out = inject(make_pod(), make_sa(**{TENANT_ID_ANNOTATION: other}))
    assert env_of(out["spec"]["containers"][0])["AZURE_TENANT_ID"] == other


def test_empty_values_are_not_injected() -> None:
    _, out = inject(make_pod(), make_sa(), InjectionSettings(default_tenant_id=None))
    assert "AZURE_TENANT_ID" not in env_of(out["spec"]["containers"][0])


def test_second_call_is_a_no_op() -> None:
    pod = make_pod(
        {"name": "app", "image": "app:1"},
        init=({"name": "migrate", "image": "m:1"},),
        volumes=[{"name": "kube-api-access-x", "projected": {"sources": []}}],
    )
    ops, once = inject(pod, make_sa())
    assert ops
    assert plan(once, make_sa(), SETTINGS) == []


def test_second_call_after_defaulting_is_a_no_op() -> None:
    """The API server defaults fields (defaultMode) before a reinvocation: still nothing to do."""
    _, once = inject(make_pod(), make_sa())
    once["spec"]["volumes"][0]["projected"]["defaultMode"] = 420
    once["spec"]["containers"][0]["volumeMounts"][0]["mountPropagation"] = "None"
    assert plan(once, make_sa(), SETTINGS) == []


def test_a_pod_named_between_invocations_keeps_one_reserved_volume() -> None:
    _, once = inject(make_pod(), make_sa())
    once["metadata"]["name"] = "customer-api-5d9c7b-abcde"
    ops, twice = inject(once, make_sa())
    assert ops == []
    assert len(twice["spec"]["volumes"]) == 1


def test_changed_expiration_replaces_the_reserved_volume() -> None:
    _, once = inject(make_pod(), make_sa())
    ops, twice = inject(once, make_sa(**{TOKEN_EXPIRATION_ANNOTATION: "7200"}))
    assert [op["op"] for op in ops] == ["replace"]
    token = twice["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["expirationSeconds"] == 7200


@pytest.mark.parametrize(
    ("pod_value", "sa_value", "expected"),
    [(None, None, 3600), (None, "86400", 86400), ("3600", "86400", 3600), ("5000", None, 5000)],
)
def test_token_expiration_from_pod_then_service_account(pod_value, sa_value, expected) -> None:
    pod = make_pod(annotations={TOKEN_EXPIRATION_ANNOTATION: pod_value} if pod_value else None)
    sa = make_sa(**({TOKEN_EXPIRATION_ANNOTATION: sa_value} if sa_value else {}))
    _, out = inject(pod, sa)
    token = out["spec"]["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["expirationSeconds"] == expected


@pytest.mark.parametrize("value", ["3599", "86401", "1h", "-1"])
def test_invalid_expiration_rejects_the_pod(value: str) -> None:
    with pytest.raises(InjectionError, match="service-account-token-expiration"):
        plan(make_pod(annotations={TOKEN_EXPIRATION_ANNOTATION: value}), make_sa(), SETTINGS)


@pytest.mark.parametrize(
    ("labels", "sa"),
    [
        ({}, make_sa()),
        ({USE_LABEL: "false"}, make_sa()),
        ({USE_LABEL: "True"}, make_sa()),  # the add-on's objectSelector is exact too
        ({USE_LABEL: "true"}, None),  # no such service account
    ],
)
def test_pods_not_asking_or_without_a_service_account_are_untouched(labels, sa) -> None:
    assert plan(make_pod(labels=labels), sa, SETTINGS) == []


@pytest.mark.parametrize(
    "sa",
    [
        {"metadata": {"name": "customer-reader"}},  # no annotations at all
        {"metadata": {"annotations": {CLIENT_ID_ANNOTATION: ""}}},  # an empty client id
    ],
)
def test_without_a_client_id_everything_but_azure_client_id_is_injected(sa) -> None:
    """As azure-workload-identity: the app may pick its client id itself (parity, issue 19)."""
    pod = make_pod()
    _, out = inject(pod, sa)
    container = out["spec"]["containers"][0]
    assert env_of(container) == {
        "AZURE_TENANT_ID": TENANT_ID,
        "AZURE_FEDERATED_TOKEN_FILE": TOKEN_FILE,
        "AZURE_AUTHORITY_HOST": "https://login.microsoftonline.com/",
    }
    assert container["volumeMounts"][0]["name"] == volume_name(pod)
    assert [v["name"] for v in out["spec"]["volumes"]] == [volume_name(pod)]
    assert plan(out, sa, SETTINGS) == []


def test_a_client_id_annotated_later_is_added_by_a_reinvocation() -> None:
    _, once = inject(make_pod(), {"metadata": {"name": "customer-reader"}})
    ops, twice = inject(once, make_sa())
    assert [op["path"] for op in ops] == ["/spec/containers/0/env/-"]
    assert env_of(twice["spec"]["containers"][0])["AZURE_CLIENT_ID"] == CLIENT_ID


# --- the proxy sidecar annotations ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["true", "false", ""])
def test_inject_proxy_sidecar_rejects_the_pod_naming_the_annotation_and_the_fix(value) -> None:
    """azure-workload-identity injects its proxy whenever the annotation is there, whatever the
    value; this webhook never does, so it refuses rather than start an app that waits for it."""
    pod = make_pod(annotations={INJECT_PROXY_SIDECAR_ANNOTATION: value})
    with pytest.raises(InjectionError) as caught:
        plan(pod, make_sa(), SETTINGS)
    message = str(caught.value)
    assert "azure.workload.identity/inject-proxy-sidecar" in message
    assert "remove the annotation" in message
    assert "AZURE_FEDERATED_TOKEN_FILE" in message
    # Whatever the service account: it is the pod that asks for something we do not do.
    with pytest.raises(InjectionError):
        plan(pod, None, SETTINGS)
    assert admission_warnings(pod) == []


def test_proxy_sidecar_port_alone_is_admitted_with_a_warning() -> None:
    pod = make_pod(annotations={PROXY_SIDECAR_PORT_ANNOTATION: "8000"})
    _, out = inject(pod, make_sa())
    assert set(env_of(out["spec"]["containers"][0])) == set(INJECTED)
    (warning,) = admission_warnings(pod)
    assert "azure.workload.identity/proxy-sidecar-port" in warning
    assert "remove it" in warning
    assert admission_warnings(make_pod()) == []


def test_proxy_annotations_on_a_pod_not_asking_are_not_ours() -> None:
    pod = make_pod(labels={}, annotations={INJECT_PROXY_SIDECAR_ANNOTATION: "true"})
    assert plan(pod, make_sa(), SETTINGS) == []


# --- the cloud: AZURE_ENVIRONMENT -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "host"),
    [
        ("AzurePublicCloud", "https://login.microsoftonline.com/"),
        ("AzureChinaCloud", "https://login.chinacloudapi.cn/"),
        ("AzureUSGovernmentCloud", "https://login.microsoftonline.us/"),
        ("AzureGermanCloud", "https://login.microsoftonline.de/"),
        ("azurechinacloud", "https://login.chinacloudapi.cn/"),  # go-autorest compares upper-case
        (" AZUREUSGOVERNMENTCLOUD ", "https://login.microsoftonline.us/"),
    ],
)
def test_azure_environment_picks_the_authority_host_as_the_add_on(name: str, host: str) -> None:
    assert authority_host_for_cloud(name, {}) == host
    assert authority_host_from_env({"AZURE_ENVIRONMENT": name}) == host
    # ... and the pod gets it.
    settings = InjectionSettings(
        authority_host=authority_host_from_env({"AZURE_ENVIRONMENT": name})
    )
    _, out = inject(make_pod(), make_sa(), settings)
    assert env_of(out["spec"]["containers"][0])["AZURE_AUTHORITY_HOST"] == host


@pytest.mark.parametrize("name", ["AzureCloud", "china", "AzureUSGovernment", "public"])
def test_an_unknown_azure_environment_is_a_clear_error(name: str) -> None:
    with pytest.raises(InjectionConfigError) as caught:
        authority_host_from_env({"AZURE_ENVIRONMENT": name})
    message = str(caught.value)
    assert f"AZURE_ENVIRONMENT={name!r}" in message
    assert "AzureChinaCloud" in message and "AzureUSGovernmentCloud" in message
    assert "SWI_INJECTION_AUTHORITY_HOST" in message


def test_azure_stack_cloud_reads_its_environment_file(tmp_path) -> None:
    env_file = tmp_path / "stack.json"
    env_file.write_text(
        '{"name": "AzureStackCloud", "activeDirectoryEndpoint": "https://adfs.local/"}'
    )
    environ = {"AZURE_ENVIRONMENT": "AzureStackCloud", "AZURE_ENVIRONMENT_FILEPATH": str(env_file)}
    assert authority_host_from_env(environ) == "https://adfs.local/"
    with pytest.raises(InjectionConfigError, match="AZURE_ENVIRONMENT_FILEPATH, which is not set"):
        authority_host_from_env({"AZURE_ENVIRONMENT": "azurestackcloud"})
    with pytest.raises(InjectionConfigError, match="cannot be read"):
        authority_host_from_env({**environ, "AZURE_ENVIRONMENT_FILEPATH": str(tmp_path / "no")})
    env_file.write_text('{"activeDirectoryEndpoint": "http://adfs.local/"}')
    with pytest.raises(InjectionConfigError, match="activeDirectoryEndpoint must be an https"):
        authority_host_from_env(environ)


def test_authority_host_precedence() -> None:
    china = "https://login.chinacloudapi.cn/"
    assert authority_host_from_env({}) == "https://login.microsoftonline.com/"
    assert authority_host_from_env({"AZURE_AUTHORITY_HOST": "https://e.test/"}) == "https://e.test/"
    both = {"AZURE_AUTHORITY_HOST": "https://e.test/", "AZURE_ENVIRONMENT": "AzureChinaCloud"}
    assert authority_host_from_env(both) == china
    explicit = {**both, "SWI_INJECTION_AUTHORITY_HOST": "https://x.test/"}
    assert authority_host_from_env(explicit) == "https://x.test/"
    with pytest.raises(InjectionConfigError, match="SWI_INJECTION_AUTHORITY_HOST must be an https"):
        authority_host_from_env({"SWI_INJECTION_AUTHORITY_HOST": "http://x.test/"})


def test_a_mount_path_the_pod_already_uses_is_kept() -> None:
    own = {"name": "mine", "mountPath": MOUNT_PATH}
    pod = make_pod({"name": "app", "image": "app:1", "volumeMounts": [own]})
    _, out = inject(pod, make_sa())
    assert out["spec"]["containers"][0]["volumeMounts"] == [own]
    assert env_of(out["spec"]["containers"][0])["AZURE_FEDERATED_TOKEN_FILE"] == TOKEN_FILE


def test_existing_volumes_and_mounts_are_appended_to() -> None:
    pod = make_pod(
        {"name": "app", "image": "a", "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
        volumes=[{"name": "data", "emptyDir": {}}],
    )
    ops, out = inject(pod, make_sa())
    assert all(op["op"] == "add" for op in ops)
    assert [v["name"] for v in out["spec"]["volumes"]] == ["data", volume_name(pod)]
    assert [m["name"] for m in out["spec"]["containers"][0]["volumeMounts"]] == [
        "data",
        volume_name(pod),
    ]


# --- properties ---------------------------------------------------------------------------------

_names = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)
_env_names = st.sampled_from([*INJECTED, "HOME", "PATH", "AZURE_OTHER"])
_env = st.lists(
    st.fixed_dictionaries({"name": _env_names, "value": st.text(max_size=5)}),
    max_size=5,
    unique_by=lambda e: str(e["name"]),
)
_container = st.fixed_dictionaries(
    {"name": _names, "image": st.just("img")}, optional={"env": _env}
)
_containers = st.lists(_container, min_size=1, max_size=4, unique_by=lambda c: str(c["name"]))


@st.composite
def _pods(draw: st.DrawFn) -> dict[str, Any]:
    containers = draw(_containers)
    init = draw(st.lists(_container, max_size=2, unique_by=lambda c: str(c["name"])))
    names = [str(c["name"]) for c in containers + init]
    skipped = draw(st.lists(st.sampled_from(names), max_size=len(names), unique=True))
    annotations = {SKIP_CONTAINERS_ANNOTATION: ";".join(skipped)} if skipped else None
    return make_pod(*containers, init=tuple(init), annotations=annotations)


@settings(max_examples=150, deadline=None)
@given(_pods())
def test_property_injection_is_idempotent_and_never_overwrites(pod: dict[str, Any]) -> None:
    sa = make_sa()
    _, out = inject(pod, sa)
    assert plan(out, sa, SETTINGS) == []
    skipped = set(
        pod["metadata"].get("annotations", {}).get(SKIP_CONTAINERS_ANNOTATION, "").split(";")
    )
    for field in ("containers", "initContainers"):
        for before, after in zip(
            pod["spec"].get(field, []), out["spec"].get(field, []), strict=True
        ):
            if before["name"] in skipped:
                assert after == before
                continue
            env_before, env_after = env_of(before), env_of(after)
            # Everything the pod set is there unchanged, in the same order, first.
            assert after.get("env", [])[: len(before.get("env", []))] == before.get("env", [])
            assert set(env_after) == set(env_before) | set(INJECTED)
            names = [e["name"] for e in after["env"]]
            assert len(names) == len(set(names))
            assert [m["mountPath"] for m in after["volumeMounts"]] == [MOUNT_PATH]
    assert [v["name"] for v in out["spec"]["volumes"]] == [volume_name(pod)]
