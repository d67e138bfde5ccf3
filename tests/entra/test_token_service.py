"""The token service through azure-identity: secrets, client assertions, discovery, failures.

Every failure must reach the caller as ``ClientAuthenticationError`` carrying Entra's AADSTS code,
because that is what the operator and the workload turn into status reasons.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import (
    ClientAssertionCredential,
    ClientSecretCredential,
    WorkloadIdentityCredential,
)
from entra_harness import REPO_ROOT, EntraService, OidcIssuer

GRAPH = "https://graph.microsoft.com/.default"
SQL = "https://database.windows.net/.default"
SUBJECT = "system:serviceaccount:workload-demo:customer-reader"
APP = "customer-api"


def _verify(entra: EntraService, token: str, audience: str) -> dict[str, Any]:
    """Verify a token the way a resource (the SQL emulator) does: v1 discovery, then JWKS."""
    context = ssl.create_default_context(cafile=str(entra.ca))
    discovery = entra.http.get(
        f"{entra.url}/{entra.tenant_id}/.well-known/openid-configuration", timeout=10
    ).json()
    signing_key = jwt.PyJWKClient(
        discovery["jwks_uri"], ssl_context=context
    ).get_signing_key_from_jwt(token)
    claims: dict[str, Any] = jwt.decode(
        token, signing_key, algorithms=["RS256"], audience=audience, issuer=discovery["issuer"]
    )
    return claims


def _assertion_credential(
    entra: EntraService, token: str, app: str = APP
) -> ClientAssertionCredential:
    return ClientAssertionCredential(
        entra.tenant_id,
        entra.principal(app).client_id,
        lambda: token,
        authority=entra.url,
        connection_verify=str(entra.ca),
    )


# -- client secrets ------------------------------------------------------------------------------
def test_client_secret_token_carries_v1_claims(entra: EntraService) -> None:
    demo = entra.principal("SP-AZURESQL-USER")
    token = entra.secret_credential(demo.name).get_token(GRAPH)
    claims = _verify(entra, token.token, "https://graph.microsoft.com")
    assert claims["iss"] == f"https://sts.windows.net/{entra.tenant_id}/"
    assert (claims["tid"], claims["oid"], claims["appid"], claims["ver"]) == (
        entra.tenant_id,
        demo.sp_object_id,
        demo.client_id,
        "1.0",
    )
    assert token.expires_on > time.time() + 3000


def test_sql_token_audience_and_graph_roles(entra: EntraService) -> None:
    sql_token = entra.secret_credential("sandbox-sql-server").get_token(SQL)
    assert _verify(entra, sql_token.token, "https://database.windows.net/")["aud"] == (
        "https://database.windows.net/"
    )
    graph_token = entra.secret_credential("sandbox-sql-server").get_token(GRAPH)
    claims = _verify(entra, graph_token.token, "https://graph.microsoft.com")
    assert claims["roles"] == ["Application.Read.All", "GroupMember.Read.All"]


def test_authority_from_environment(entra: EntraService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_AUTHORITY_HOST", entra.env["AZURE_AUTHORITY_HOST"])
    demo = entra.principal("SP-AZURESQL-USER")
    credential = ClientSecretCredential(
        entra.env["AZ_TENANT_ID"],
        entra.env["AZ_CLIENT_ID"],
        entra.env["AZ_CLIENT_SECRET"],
        disable_instance_discovery=True,
        connection_verify=str(entra.ca),
    )
    assert (
        _verify(entra, credential.get_token(GRAPH).token, "https://graph.microsoft.com")["appid"]
        == demo.client_id
    )


@pytest.fixture
def proxy(entra: EntraService, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The sandbox CONNECT proxy in front of this emulator, exported as HTTPS_PROXY."""
    process = subprocess.Popen(
        [sys.executable, "-m", "sandbox.proxy", "serve", "--state-dir", str(entra.state_dir)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    assert line.startswith("READY url="), line
    url = line.removeprefix("READY url=")
    for name in ("HTTPS_PROXY", "https_proxy"):  # both: lower case wins when both are set
        monkeypatch.setenv(name, url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "localhost,127.0.0.1")
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_default_authority_through_proxy(entra: EntraService, proxy: str) -> None:
    """No authority, no disable_instance_discovery: login.microsoftonline.com via the proxy."""
    demo = entra.principal("SP-AZURESQL-USER")
    credential = ClientSecretCredential(
        entra.tenant_id, demo.client_id, demo.secrets[0], connection_verify=str(entra.ca)
    )
    claims = _verify(entra, credential.get_token(GRAPH).token, "https://graph.microsoft.com")
    assert claims["oid"] == demo.sp_object_id
    counts = entra.admin.requests("login.*")["counts"]
    assert counts["login.discovery"] >= 1 and counts["login.token"] == 1


def test_instance_discovery_for_emulator_host(entra: EntraService, proxy: str) -> None:
    """A localhost authority with instance discovery on: MSAL asks login.microsoftonline.com."""
    credential = entra.secret_credential("SP-AZURESQL-USER", disable_instance_discovery=False)
    credential.get_token(GRAPH)
    log = entra.admin.requests("login.*")["log"]
    assert [r["route"] for r in log][:3] == ["login.instance", "login.discovery", "login.token"]


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"client_id": "0b9f5d1e-0000-4000-8000-0000000000ff"}, 700016),
        ({"tenant_id": "2c4e6a8b-1d3f-4a5b-9c7d-e1f2a3b4c5d6"}, 700016),  # app of another tenant
        ({"client_secret": "not-the-secret"}, 7000215),
    ],
)
def test_client_secret_failures(entra: EntraService, overrides: dict[str, str], code: int) -> None:
    credential = entra.secret_credential("SP-AZURESQL-USER", **overrides)
    with pytest.raises(ClientAuthenticationError, match=f"AADSTS{code}"):
        credential.get_token(GRAPH)


def test_unknown_tenant(entra: EntraService, fresh_issuer: OidcIssuer) -> None:
    """MSAL reports a failed tenant discovery in its own words (as against Entra); the token
    endpoint itself, which assertion credentials call directly, answers AADSTS90002."""
    unknown = "0b9f5d1e-0000-4000-8000-000000000000"
    with pytest.raises(ClientAuthenticationError, match="Unable to get authority configuration"):
        entra.secret_credential("SP-AZURESQL-USER", tenant_id=unknown).get_token(GRAPH)
    credential = ClientAssertionCredential(
        unknown,
        entra.principal(APP).client_id,
        lambda: fresh_issuer.mint(SUBJECT),
        authority=entra.url,
        connection_verify=str(entra.ca),
    )
    with pytest.raises(ClientAuthenticationError, match="AADSTS90002: Tenant '0b9f5d1e"):
        credential.get_token(GRAPH)


def test_unknown_resource(entra: EntraService) -> None:
    with pytest.raises(ClientAuthenticationError, match="AADSTS500011"):
        entra.secret_credential("SP-AZURESQL-USER").get_token("https://vault.example/.default")


# -- client assertions (workload identity federation) ----------------------------------------------
def test_workload_identity_credential_with_token_file(
    entra: EntraService, fresh_issuer: OidcIssuer, tmp_path: Path
) -> None:
    entra.add_app_credential(
        APP, "cluster-a", fresh_issuer.url, SUBJECT, "api://AzureADTokenExchange"
    )
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text(fresh_issuer.mint(SUBJECT))
    app = entra.principal(APP)
    credential = WorkloadIdentityCredential(
        tenant_id=entra.tenant_id,
        client_id=app.client_id,
        token_file_path=str(token_file),
        authority=entra.url,
        connection_verify=str(entra.ca),
    )
    claims = _verify(entra, credential.get_token(SQL).token, "https://database.windows.net/")
    assert (claims["oid"], claims["appid"], claims["appidacr"]) == (
        app.sp_object_id,
        app.client_id,
        "2",
    )


def _federate(entra: EntraService, issuer: OidcIssuer) -> None:
    entra.add_app_credential(APP, "cluster-a", issuer.url, SUBJECT, "api://AzureADTokenExchange")


@pytest.mark.parametrize(
    ("mint", "code"),
    [
        ({"issuer": "https://127.0.0.1:9/other-cluster"}, 700211),
        ({"subject": "system:serviceaccount:workload-demo:someone-else"}, 700213),
        ({"subject": SUBJECT.upper()}, 7002138),
        ({"audience": "api://SomethingElse"}, 700212),
        ({"issued_at": time.time() - 7200, "lifetime": 600}, 700024),
        ({"unpublished_key": True}, 7000272),
    ],
)
def test_assertion_failures(
    entra: EntraService, fresh_issuer: OidcIssuer, mint: dict[str, Any], code: int
) -> None:
    _federate(entra, fresh_issuer)
    token = fresh_issuer.mint(mint.pop("subject", SUBJECT), **mint)
    with pytest.raises(ClientAuthenticationError, match=f"AADSTS{code}:"):
        _assertion_credential(entra, token).get_token(GRAPH)


def test_no_federated_credential_is_70021(entra: EntraService, fresh_issuer: OidcIssuer) -> None:
    with pytest.raises(ClientAuthenticationError, match=r"AADSTS70021:.*Assertion Subject"):
        _assertion_credential(entra, fresh_issuer.mint(SUBJECT)).get_token(GRAPH)


def test_unknown_kid_refetches_keys_once(entra: EntraService, fresh_issuer: OidcIssuer) -> None:
    _federate(entra, fresh_issuer)
    _assertion_credential(entra, fresh_issuer.mint(SUBJECT)).get_token(GRAPH)  # warms the cache
    with pytest.raises(ClientAuthenticationError, match="AADSTS7000272:"):
        _assertion_credential(entra, fresh_issuer.mint(SUBJECT, unpublished_key=True)).get_token(
            GRAPH
        )
    assert fresh_issuer.fetches.count("/openid/v1/jwks") == 2
    # The issuer rotates: the new key is published and found after one refetch.
    fresh_issuer.published.append(fresh_issuer.unpublished)
    _assertion_credential(entra, fresh_issuer.mint(SUBJECT, unpublished_key=True)).get_token(GRAPH)
    assert fresh_issuer.fetches.count("/openid/v1/jwks") == 3
    assert fresh_issuer.fetches.count("/.well-known/openid-configuration") == 1


def test_issuer_unreachable_is_90061(entra: EntraService, fresh_issuer: OidcIssuer) -> None:
    _federate(entra, fresh_issuer)
    fresh_issuer.discovery_up = False
    with pytest.raises(ClientAuthenticationError, match="AADSTS90061: Request to External OIDC"):
        _assertion_credential(entra, fresh_issuer.mint(SUBJECT)).get_token(GRAPH)


def test_propagation_delay(entra: EntraService, fresh_issuer: OidcIssuer) -> None:
    entra.admin.controls(propagationSeconds=1.5)
    _federate(entra, fresh_issuer)
    token = fresh_issuer.mint(SUBJECT)
    with pytest.raises(ClientAuthenticationError, match="AADSTS70021:"):
        _assertion_credential(entra, token).get_token(GRAPH)
    time.sleep(1.6)
    assert _assertion_credential(entra, token).get_token(GRAPH).token


def test_clock_skew_makes_assertion_not_yet_valid(
    entra: EntraService, fresh_issuer: OidcIssuer
) -> None:
    _federate(entra, fresh_issuer)
    entra.admin.controls(clockSkewSeconds=-3600)
    with pytest.raises(ClientAuthenticationError, match="AADSTS700024:"):
        _assertion_credential(entra, fresh_issuer.mint(SUBJECT)).get_token(GRAPH)


# -- injected faults -------------------------------------------------------------------------------
def test_429_retry_after_is_honoured(entra: EntraService) -> None:
    entra.admin.fail("login.token", status=429, count=1, retry_after=1)
    started = time.monotonic()
    assert entra.secret_credential("SP-AZURESQL-USER").get_token(GRAPH).token
    assert time.monotonic() - started >= 1.0
    log = entra.admin.requests("login.token")["log"]
    assert [(r["status"], r["injected"]) for r in log] == [(429, True), (200, False)]


def test_503_is_retried(entra: EntraService) -> None:
    entra.admin.fail("login.token", status=503, count=1, retry_after=0)
    assert entra.secret_credential("SP-AZURESQL-USER").get_token(GRAPH).token
    assert [r["status"] for r in entra.admin.requests("login.token")["log"]] == [503, 200]


# -- the raw wire contract -------------------------------------------------------------------------
def test_error_body_and_v1_endpoint(entra: EntraService) -> None:
    demo = entra.principal("SP-AZURESQL-USER")
    form = {"grant_type": "client_credentials", "client_id": demo.client_id}
    failed = entra.http.post(
        f"{entra.url}/{entra.tenant_id}/oauth2/v2.0/token",
        data={**form, "client_secret": "wrong", "scope": GRAPH},
        headers={"client-request-id": "c0ffee00-0000-4000-8000-000000000001"},
        timeout=10,
    )
    body = failed.json()
    assert (failed.status_code, body["error"], body["error_codes"]) == (
        401,
        "invalid_client",
        [7000215],
    )
    assert body["error_description"].startswith("AADSTS7000215: Invalid client secret provided.")
    assert body["correlation_id"] == "c0ffee00-0000-4000-8000-000000000001"
    assert body["trace_id"] and body["timestamp"]

    v1 = entra.http.post(
        f"{entra.url}/{entra.tenant_id}/oauth2/token",
        data={
            **form,
            "client_secret": demo.secrets[0],
            "resource": "https://database.windows.net/",
        },
        timeout=10,
    ).json()
    assert v1["resource"] == "https://database.windows.net/" and int(v1["expires_on"]) > time.time()
    assert _verify(entra, v1["access_token"], "https://database.windows.net/")["appidacr"] == "1"


# -- the front end: what Entra's token endpoint accepts in its URL --------------------------------
def _v1_through_proxy(entra: EntraService, proxy: str, url: str) -> Any:
    demo = entra.principal("SP-AZURESQL-USER")
    return requests.post(
        url,
        data={
            "grant_type": "client_credentials",
            "client_id": demo.client_id,
            "client_secret": demo.secrets[0],
            "resource": "https://database.windows.net/",
        },
        proxies={"https": proxy},
        verify=str(entra.ca),
        timeout=10,
    )


@pytest.mark.parametrize(
    "authority",
    [
        # An explicit default port, as ODBC Driver 18's STS URL handling and hand-built URLs send.
        "https://login.microsoftonline.com:443/{tenant}",
        # Tenant ids are GUIDs: any case names the same tenant.
        "https://login.microsoftonline.com/{TENANT}",
        # A verified domain of the tenant instead of its id (documented for the {tenant} segment).
        "https://login.microsoftonline.com/sandbox.onmicrosoft.com",
        "https://login.windows.net/{tenant}",
    ],
)
def test_v1_token_endpoint_accepts_what_entras_front_end_accepts(
    entra: EntraService, proxy: str, authority: str
) -> None:
    url = authority.format(tenant=entra.tenant_id, TENANT=entra.tenant_id.upper())
    response = _v1_through_proxy(entra, proxy, f"{url}/oauth2/token")
    assert response.status_code == 200, response.text
    body = response.json()
    # The v1 endpoint's shape: every number a string, the resource echoed.
    assert body["expires_in"] == "3599" and body["resource"] == "https://database.windows.net/"
    claims = _verify(entra, body["access_token"], "https://database.windows.net/")
    assert claims["tid"] == entra.tenant_id


def test_a_domain_no_tenant_has_verified_is_90002(entra: EntraService, proxy: str) -> None:
    url = "https://login.microsoftonline.com/not-verified.example/oauth2/token"
    response = _v1_through_proxy(entra, proxy, url)
    body = response.json()
    assert (response.status_code, body["error"], body["error_codes"]) == (
        400,
        "invalid_tenant",
        [90002],
    )
    assert body["error_description"].startswith("AADSTS90002: Tenant 'not-verified.example'")
